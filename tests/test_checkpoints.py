"""The random test checkpoints have the real Z-Image-Turbo layout and diffusers/transformers load them.

These tests guard the fixtures that every parity test relies on: if a checkpoint here drifted from the
real layout (Tongyi-MAI/Z-Image-Turbo's files) or from what the libraries accept, parity with diffusers
would prove nothing. Also the contract of tiny/tokenizer.py: a Qwen2-compatible tokenizer (as
transformers' Qwen2Tokenizer with Z-Image's chat template).
"""

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen2 import tokenization_qwen2 as qwen2_tokenization

from tests.checkpoints import (
    CORPUS,
    load_diffusers_pipeline,
    load_transformers_text_encoder,
    make_random_checkpoint,
    safetensors_dtypes,
)
from tiny.tokenizer import IM_END, IM_START, PAD, PRETOKENIZE_REGEX, train_tokenizer

# Files of the real repo (Tongyi-MAI/Z-Image-Turbo), shards aside.
REAL_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
SHARDED = {  # folder: (shard name pattern, index file)
    "text_encoder": (r"model-(\d{5})-of-(\d{5})\.safetensors", "model.safetensors.index.json"),
    "transformer": (
        r"diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ),
}


def template(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def stored_tensors(folder: Path) -> dict[str, str]:
    """{tensor name: shard file name} read from the safetensors files themselves."""
    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                assert k not in where, f"{k} stored twice"
                where[k] = f.name
    return where


# --------------------------------------------------------------------------------------------------
# layout


def test_checkpoint_has_exactly_the_real_layout_files(random_ckpt):
    """Every file of the real repo is there, and nothing else but the weight shards."""
    files = {p.relative_to(random_ckpt).as_posix() for p in random_ckpt.rglob("*") if p.is_file()}
    shards = {f for f in files if any(re.fullmatch(f"{d}/{pat}", f) for d, (pat, _) in SHARDED.items())}
    assert files - shards == REAL_FILES
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]


@pytest.mark.parametrize("folder", sorted(SHARDED))
def test_sharded_weights_have_several_shards_and_a_complete_index(random_ckpt, folder):
    """Transformer and text encoder are split into >= 2 numbered shards whose index maps every tensor."""
    pattern, index_name = SHARDED[folder]
    shards = sorted(p.name for p in (random_ckpt / folder).glob("*.safetensors"))
    numbers = [re.fullmatch(pattern, s).groups() for s in shards]
    n = len(shards)
    assert n >= 2
    assert numbers == [(f"{i:05d}", f"{n:05d}") for i in range(1, n + 1)]
    index = json.loads((random_ckpt / folder / index_name).read_text())
    assert index["weight_map"] == stored_tensors(random_ckpt / folder)
    files = [random_ckpt / folder / s for s in shards]
    data_bytes = sum(f.stat().st_size - _header_bytes(f) for f in files)
    assert index["metadata"]["total_size"] == data_bytes


def _header_bytes(path: Path) -> int:
    """Size of a safetensors file's 8-byte length prefix plus JSON header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_text_encoder_keys_carry_the_model_prefix_and_transformer_is_fp32(random_ckpt_bf16_te):
    """Text-encoder keys are Qwen3ForCausalLM's (`model.` prefix), stored bf16; the DiT is stored fp32."""
    te = safetensors_dtypes(random_ckpt_bf16_te / "text_encoder")
    assert te and all(k.startswith("model.") for k in te)
    assert "model.embed_tokens.weight" in te and "model.layers.0.self_attn.q_norm.weight" in te
    assert set(te.values()) == {"BF16"}
    assert set(safetensors_dtypes(random_ckpt_bf16_te / "transformer").values()) == {"F32"}


def test_component_configs_agree_with_each_other_and_the_real_conventions(random_ckpt):
    """cap_feat_dim = text hidden size, in_channels = latent channels, real axes_lens and VAE factors."""
    dit = json.loads((random_ckpt / "transformer" / "config.json").read_text())
    te = json.loads((random_ckpt / "text_encoder" / "config.json").read_text())
    vae = json.loads((random_ckpt / "vae" / "config.json").read_text())
    tok = Tokenizer.from_file(str(random_ckpt / "tokenizer" / "tokenizer.json"))
    assert dit["cap_feat_dim"] == te["hidden_size"]
    assert dit["in_channels"] == vae["latent_channels"]
    assert te["vocab_size"] == tok.get_vocab_size()
    assert dit["axes_lens"] == [1536, 512, 512]
    assert sum(dit["axes_dims"]) == dit["dim"] // dit["n_heads"]
    assert "siglip_feat_dim" not in dit
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert te["tie_word_embeddings"] and te["architectures"] == ["Qwen3ForCausalLM"]
    sched = json.loads((random_ckpt / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["shift"], sched["use_dynamic_shifting"]) == (3.0, False)


def test_every_stored_tensor_is_random_not_library_init(random_ckpt):
    """No zero or constant tensors are left (pad tokens, norm scales, final layer...)."""
    for folder in ("transformer", "text_encoder", "vae"):
        for f in (random_ckpt / folder).glob("*.safetensors"):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():
                    t = sf.get_tensor(k).float()
                    assert t.numel() > 1 and t.std() > 1e-3, f"{folder}/{k} is constant"


def test_same_seed_gives_identical_files_and_other_seed_other_weights(random_ckpt, tmp_path):
    """Checkpoints are a pure function of the seed."""
    def digest(path: Path) -> dict[str, str]:
        return {
            p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()
        }

    same = make_random_checkpoint(tmp_path / "same", seed=0)
    other = make_random_checkpoint(tmp_path / "other", seed=1)
    assert digest(same) == digest(random_ckpt)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert digest(other)[vae] != digest(random_ckpt)[vae]


# --------------------------------------------------------------------------------------------------
# the libraries load it


def test_diffusers_pipeline_loads_it_and_generates_a_prompt_dependent_image(random_ckpt):
    """ZImagePipeline.from_pretrained works; 2 steps at 32x32 give a non-constant, prompt-dependent image."""
    pipe = load_diffusers_pipeline(random_ckpt)
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert pipe.vae_scale_factor == 8  # 2 ** (len(block_out_channels) - 1): sizes must be multiples of 16

    def generate(prompt: str, height: int = 32, width: int = 32):
        return pipe(
            prompt, height=height, width=width, num_inference_steps=2, guidance_scale=0.0,
            max_sequence_length=64, output_type="np", generator=torch.Generator("cpu").manual_seed(0),
        ).images

    a, a_again = generate("A photo of a red circle"), generate("A photo of a red circle")
    b = generate("Monet")
    assert a.shape == (1, 32, 32, 3)
    assert a.std() > 0.02
    assert (a == a_again).all()
    assert abs(a - b).max() > 1e-3
    assert generate("", height=48, width=32).shape == (1, 48, 32, 3)


def test_diffusers_rejects_sizes_not_multiple_of_16(random_ckpt):
    """With a 4-level VAE the pipeline needs height and width divisible by vae_scale_factor * 2 = 16."""
    pipe = load_diffusers_pipeline(random_ckpt)
    with pytest.raises(ValueError, match="divisible by 16"):
        pipe("x", height=40, width=32, num_inference_steps=1, guidance_scale=0.0, output_type="np")


def test_bf16_text_encoder_with_top_level_rope_theta_loads_in_transformers(random_ckpt, random_ckpt_bf16_te):
    """The real repo's config form (rope_theta at top level, rope_scaling null) loads with the right theta.

    Its hidden states equal those of the fp32 checkpoint with weights rounded to bf16, and differ with
    the transformers default theta, so the top-level rope_theta is really used.
    """
    raw = json.loads((random_ckpt_bf16_te / "text_encoder" / "config.json").read_text())
    assert raw["rope_theta"] == 1000000 and raw["rope_scaling"] is None and raw["torch_dtype"] == "bfloat16"
    assert "rope_parameters" not in raw

    bf16 = load_transformers_text_encoder(random_ckpt_bf16_te)
    assert bf16.config.rope_parameters["rope_theta"] == 1e6
    fp32 = load_transformers_text_encoder(random_ckpt)
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    wrong_theta = Qwen3Model(Qwen3Config(**{**fp32.config.to_dict(), "rope_parameters": None})).eval()
    wrong_theta.load_state_dict(fp32.state_dict())
    assert wrong_theta.config.rope_parameters["rope_theta"] != 1e6

    ids = torch.arange(1, 40).unsqueeze(0)  # long enough for the rotation to matter
    with torch.no_grad():
        h_bf16, h_fp32, h_wrong = (m(ids, output_hidden_states=True).hidden_states[-2] for m in
                                   (bf16, fp32, wrong_theta))
    torch.testing.assert_close(h_bf16, h_fp32, rtol=0, atol=1e-6)
    assert (h_wrong - h_fp32).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# tokenizer (tiny/tokenizer.py, as saved in the checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(random_ckpt):
    return AutoTokenizer.from_pretrained(random_ckpt / "tokenizer")


@pytest.fixture(scope="module")
def raw_tokenizer(random_ckpt):
    return Tokenizer.from_file(str(random_ckpt / "tokenizer" / "tokenizer.json"))


def test_transformers_loads_the_tokenizer_as_qwen2_with_qwen_special_tokens(hf_tokenizer, raw_tokenizer):
    """AutoTokenizer gives Qwen2Tokenizer: eos <|im_end|>, pad <|endoftext|>, no BOS, right padding."""
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    assert hf_tokenizer.eos_token == IM_END and hf_tokenizer.pad_token == PAD
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer.pad_token_id == raw_tokenizer.token_to_id(PAD)
    assert hf_tokenizer.padding_side == "right"


@pytest.mark.parametrize("prompt", ["A photo of a red circle", "in Van Gogh's manner", "", "héllo ✓\n2"])
def test_chat_template_renders_the_z_image_string_and_ids_match_tokenizers(hf_tokenizer, raw_tokenizer,
                                                                           prompt):
    """apply_chat_template gives the exact Z-Image string; transformers and tokenizers encode it alike."""
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False, add_generation_prompt=True, enable_thinking=True,
    )
    assert text == template(prompt)
    ids = hf_tokenizer(text).input_ids
    assert ids == raw_tokenizer.encode(text).ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_role_words_are_single_ids_and_empty_prompt_is_8_tokens(raw_tokenizer):
    """<|im_start|>, <|im_end|>, <|endoftext|>, 'user', 'assistant' and '\\n' are one id each."""
    special = [raw_tokenizer.token_to_id(t) for t in (PAD, IM_START, IM_END)]
    assert special == [0, 1, 2]
    for t in (PAD, IM_START, IM_END):
        assert raw_tokenizer.encode(f"a{t}b").tokens == ["a", t, "b"]
    im_start, im_end = special[1], special[2]
    # "Ċ" is how byte-level BPE spells the newline byte
    user, assistant, nl = (raw_tokenizer.token_to_id(t) for t in ("user", "assistant", "Ċ"))
    assert None not in (user, assistant, nl)
    assert raw_tokenizer.encode(template("")).ids == [im_start, user, nl, im_end, nl, im_start, assistant, nl]


def test_pipeline_style_padding_is_right_padding_with_endoftext(hf_tokenizer, raw_tokenizer):
    """padding='max_length' (as ZImagePipeline calls it) appends <|endoftext|> with mask 0 on the right."""
    text = template("A photo of a red circle")
    n = len(raw_tokenizer.encode(text).ids)
    batch = hf_tokenizer([text], padding="max_length", max_length=n + 5, truncation=True)
    assert batch.input_ids[0] == raw_tokenizer.encode(text).ids + [raw_tokenizer.token_to_id(PAD)] * 5
    assert batch.attention_mask[0] == [1] * n + [0] * 5


def test_pre_tokenizer_regex_is_qwen2s():
    """The split pattern is character for character the one transformers' Qwen2Tokenizer uses."""
    assert PRETOKENIZE_REGEX == qwen2_tokenization.PRETOKENIZE_REGEX


def test_train_tokenizer_is_deterministic_and_reaches_the_vocab_size():
    """Same texts give byte-identical tokenizers; the vocabulary has the requested size."""
    a, b = train_tokenizer(CORPUS, 400), train_tokenizer(list(CORPUS), 400)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400
    assert a.encode("A photo of").tokens == ["A", "Ġphoto", "Ġof"]  # merges learned from the corpus
    with pytest.raises(ValueError):
        train_tokenizer(CORPUS, 100)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40).filter(lambda t: not any(s in t for s in (PAD, IM_START, IM_END))))
def test_any_text_encodes_without_unknowns_and_decodes_back(raw_tokenizer, text):
    """Byte-level BPE: any string round-trips (after NFC); no unknown token exists."""
    ids = raw_tokenizer.encode(text).ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
