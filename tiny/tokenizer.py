"""A small Qwen2-style byte-level BPE tokenizer, trained from scratch on a handful of texts.

Why: Z-Image encodes prompts with Qwen3-4B's tokenizer (a Qwen2 byte-level BPE with 151,936 ids).
The embedded tiny model (`weights/zimage-tiny`) and the random test checkpoints need a
tokenizer in exactly that format, but the real one cannot be downloaded here and its vocabulary
would dwarf a tiny text encoder. So we train a Qwen2-compatible one with a vocabulary of a few hundred:
- the same pipeline as Qwen2's `tokenizer.json`: NFC normalizer, Qwen2's split regex, byte-level
  alphabet (every string encodes, nothing is ever unknown), byte-level decoder;
- the special tokens the Z-Image chat template uses, `<|endoftext|>` (pad), `<|im_start|>` and
  `<|im_end|>` (eos), each one id and never split; no BOS and no other tokens added on encode;
- a `tokenizer_config.json` that transformers loads as `Qwen2Tokenizer`, whose chat template renders
  `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` exactly as Qwen3's does
  with `enable_thinking=True` (as diffusers' ZImagePipeline applies it).

The product reads only `tokenizer.json` (with the `tokenizers` package); the config file is there so
that diffusers' `ZImagePipeline` can load the same directory as a parity oracle.

    from tiny.tokenizer import train_tokenizer, save_tokenizer
    tok = train_tokenizer(["A photo of a red circle", "An art in the style of Monet"], vocab_size=400)
    save_tokenizer(tok, "weights/zimage-tiny/tokenizer")
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

# --------------------------------------------------------------------------------------------------
# Qwen2 conventions (transformers `models/qwen2/tokenization_qwen2.py`, Qwen2/Qwen3 tokenizer.json)

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]  # ids 0, 1, 2 in the trained vocabulary

# Qwen3's chat template, reduced to what a single-turn text prompt uses. With enable_thinking unset or
# true nothing follows the generation prompt; Qwen3 adds an empty think block only when it is false.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


# --------------------------------------------------------------------------------------------------
# training


def _template_pieces(text: str) -> list[str]:
    """The parts of the chat-formatted prompt that BPE sees, i.e. the text between special tokens.

    Training on these (rather than on the bare text) makes the role words as frequent as the prompts,
    so that, as in the real vocabulary, `user`, `assistant` and `\\n` end up as single tokens.
    """
    return ["user\n" + text, "\n", "assistant\n"]


def build_empty_tokenizer() -> Tokenizer:
    """An untrained BPE tokenizer with Qwen2's normalizer, pre-tokenizer, decoder and post-processor."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # As in Qwen2's tokenizer.json: adds no tokens and keeps offsets untrimmed.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on `texts`; deterministic for the same input.

    vocab_size counts everything: 3 special tokens + 256 byte symbols + the learned merges.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tok = build_empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    pieces = [piece for text in texts for piece in _template_pieces(text)]
    tok.train_from_iterator(pieces, trainer=trainer)
    return tok


# --------------------------------------------------------------------------------------------------
# saving


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tokenizer_config(tok: Tokenizer, model_max_length: int = 131072) -> dict:
    """The `tokenizer_config.json` of Qwen3 (model_max_length 131072 there), with our special-token ids."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 131072) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "tokenizer.json", tok.to_str(pretty=True))
    config = tokenizer_config(tok, model_max_length)
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
