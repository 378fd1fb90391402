"""
Two inference-time erasure baselines of the Z-Erase paper (arXiv 2603.25074) on our Z-Image DiT, as context
managers around any sampler call (sample.generate, sample.denoise, or the DiT itself):

    toks = concept_tokens(zi.tokenizer, ["Van Gogh"], prompts, negative_prompt="")
    with attention_zeroing(zi.transformer, toks):                             # §3, Fig. 3 (left)
        images = sample.generate(zi, prompts, 0, 64, 64, 8, guidance=3.0)

    layers, mass = localize(zi, ["Van Gogh"], calibration_prompts, k=2)        # DiT-Localization
    with dit_localization(zi.transformer, toks, layers, null_caption(zi)):
        images = sample.generate(zi, prompts, 0, 64, 64, 8, guidance=3.0)

    python baselines.py --method zeroing --concept "Van Gogh" --prompt "a red star in the style of Van Gogh"
    python baselines.py --method localization --k 2 --concept "Van Gogh" --out loc.png  # base, then baseline

Attention zeroing: the paper's brittle baseline, A_attn[:, :, idx] = 0 on the concept's tokens idx, taken
literally (every head, every query row, no renormalisation), in every unified layer and, by default, in the
context refiner too (see attention_zeroing for why). The concept is located as training locates it
(zerase.find_phrases on the given surface forms, then zerase.concept_token_indices on the tokenizer's
character offsets): with the canonical form alone, misspellings are not caught, the point of the baseline.

DiT-Localization (Zarei et al. 2025, "Localizing Knowledge in Diffusion Transformers"): calibrate, per unified
layer, the attention mass image queries put on the concept's tokens (zerase.AttentionProbe, Eq. 6's measure)
over a few prompts and the sampler's noise levels, keep the top-K layers, and in those layers only let the
items that name the concept attend with a neutral caption's text rows (see dit_localization).

How the hooks find the concept's rows: the prompts are tokenised when the ConceptTokens are made; each DiT
call is matched to them by its caption lengths (the prompts or, with CFG, the prompts then the negative
prompts, as sample.denoise batches `cond + uncond`), and its model.Layout gives the unified row of token j of
item i. model.py is not changed: a forward pre-hook on the DiT reads each call's inputs, forward hooks on the
value projections or pre-hooks on the attention modules edit rows. A call with no concept token is never
modified (every hook returns None), so it is the base model bit for bit, kernels included.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

import model as M
import sample
import zerase as Z

# ---------------------------------------------------------------------------------------------------------
# Where the concept sits: token indices per prompt, unified rows per DiT call


@dataclass(frozen=True)
class ConceptTokens:
    """The concept's token indices in each caption a sampler will give the DiT, and the caption lengths that
    identify them. A DiT call carries the prompts (B items) or, with CFG, the prompts then B negatives."""
    tokens: tuple[tuple[int, ...], ...]  # per prompt: indices into its chat-templated caption
    lengths: tuple[int, ...]  # per prompt: real caption tokens (what model.Tokenizer.encode returns)
    negative: tuple[int, ...] = ()  # the negative prompt's concept tokens (usually none)
    negative_length: int | None = None  # None: no CFG batches expected

    def per_item(self, cap_lens: list[int]) -> list[tuple[int, ...]]:
        """Concept tokens of each item of a DiT call whose captions have `cap_lens` real tokens."""
        items, want = list(self.tokens), list(self.lengths)
        if len(cap_lens) == 2 * len(want) and self.negative_length is not None:
            items, want = items + [self.negative] * len(want), want + [self.negative_length] * len(want)
        if list(cap_lens) != want:
            raise ValueError(f"the DiT was called with captions of {list(cap_lens)} tokens, but these "
                             f"concept tokens were made for prompts of {list(self.lengths)} tokens (negative "
                             f"prompt: {self.negative_length}); make them from the prompts being sampled.")
        return items


def locate(tokenizer: M.Tokenizer, forms: list[str], prompt: str) -> tuple[tuple[int, ...], int]:
    """(indices of the tokens overlapping a surface form, caption length): the localisation of training."""
    ids, spans = tokenizer.encode(prompt)
    return tuple(Z.concept_token_indices(spans, Z.find_phrases(prompt, forms))), len(ids)


def concept_tokens(tokenizer: M.Tokenizer, forms: list[str], prompts: list[str],
                   negative_prompt: str | None = "") -> ConceptTokens:
    """ConceptTokens for sampling `prompts` (and, unless negative_prompt is None, CFG with it)."""
    found = [locate(tokenizer, forms, p) for p in prompts]
    neg = locate(tokenizer, forms, negative_prompt) if negative_prompt is not None else ((), None)
    return ConceptTokens(tuple(t for t, _ in found), tuple(n for _, n in found), *neg)


def concept_rows(items: list[tuple[int, ...]], offsets: list[int], device=None):
    """(batch index, row) of every concept token of a DiT call, as two (n,) long tensors (indices for
    out[b, r] on a (B, S, D) tensor), token j of item i at row offsets[i] + j (unified layers:
    Layout.n_img_padded, image rows first; context refiner: 0); None when no item names the concept."""
    b = [i for i, toks in enumerate(items) for _ in toks]
    if not b:
        return None
    r = [off + j for toks, off in zip(items, offsets) for j in toks]
    return torch.tensor(b, device=device), torch.tensor(r, device=device)


def _call_inputs(args: tuple, kwargs: dict):
    """(x, t, cap_feats) of a ZImageTransformer call, positional or by name."""
    given = dict(zip(("x", "t", "cap_feats"), args)) | kwargs
    return given["x"], given["t"], given["cap_feats"]


@contextmanager
def on_each_forward(dit: M.ZImageTransformer, tokens: ConceptTokens, before, after=None):
    """Call before((x, t, cap_feats), layout, items) ahead of every call of `dit` (items: the concept tokens
    of each batch item), and after() when the call has returned. DiT calls that `before` makes itself are
    not intercepted."""
    busy = [False]

    def pre(module, args, kwargs):  # returns None: the call's inputs are never changed
        if not busy[0]:
            inputs = _call_inputs(args, kwargs)
            cap_lens = [len(c) for c in inputs[2]]
            lay = dit.layout([tuple(xi.shape[-2:]) for xi in inputs[0]], cap_lens)
            busy[0] = True
            try:
                before(inputs, lay, tokens.per_item(cap_lens))
            finally:
                busy[0] = False

    def post(module, args, kwargs, out):  # returns None: the output is never changed
        if not busy[0] and after is not None:
            after()

    handles = [dit.register_forward_pre_hook(pre, with_kwargs=True),
               dit.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def forward_hooks(pairs):
    """Register (module, hook) forward hooks for the duration of the block."""
    handles = [m.register_forward_hook(h) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# 1. Attention zeroing (§3, Fig. 3 left): A_attn[:, :, idx] = 0


@contextmanager
def attention_zeroing(dit: M.ZImageTransformer, tokens: ConceptTokens, refiner: bool = True):
    """Inside this block every unified layer (and, with `refiner`, each context-refiner layer) attends as
    if A[:, :, idx] = 0: the softmax weights of the concept's key rows idx are zero for every head and every
    query (image and caption rows), and the other weights keep their values (no renormalisation, as the
    paper writes it).

    Done on the values: the attention output is A V, and zeroing columns idx of A is the same product as
    zeroing rows idx of V (A diag(m) V = A (diag(m) V)), so the hook zeroes the concept rows of the value
    projection and the layer keeps its own attention kernel; the other items of the batch keep their values,
    and a call without concept tokens is not modified at all. Every query row, because in a single-stream
    DiT the caption queries carry a token's content to the other caption tokens of later layers.
    `refiner` (default on): the two caption-only context-refiner layers before the unified ones attend
    bidirectionally over the caption, so without it the concept reaches every caption token before the
    first unified layer; on the tiny model unified-only zeroing leaves "Van Gogh" at Acc_e 1.0, with the
    refiner included it is removed. What the causal text encoder put into the tokens after the concept is
    not removed either way."""
    rows = {}
    dev = dit.x_pad_token.device

    def before(inputs, lay, items):
        rows["unified"] = concept_rows(items, lay.n_img_padded, dev)
        rows["refiner"] = concept_rows(items, [0] * len(items), dev)  # the refiner sees the caption alone

    def zero_values(where):
        def hook(module, args, v):  # v (B, S, D): a value projection
            r = rows.get(where)
            return None if r is None else v.index_put(r, v.new_zeros(()))
        return hook

    pairs = [(layer.attention.to_v, zero_values("unified")) for layer in dit.layers]
    if refiner:
        pairs += [(layer.attention.to_v, zero_values("refiner")) for layer in dit.context_refiner]
    with on_each_forward(dit, tokens, before, rows.clear), forward_hooks(pairs):
        yield


# ---------------------------------------------------------------------------------------------------------
# 2. DiT-Localization: calibrate the layers, then intervene in those only


@torch.no_grad()
def concept_attention_mass(zi, forms: list[str], prompts: list[str], seed: int = 0, steps: int | None = None,
                           guidance: float | None = None, size: int | None = None) -> Tensor:
    """(n_layers,) float64: per unified layer, the mean attention mass image queries put on the concept's
    tokens (zerase.AttentionProbe: summed over the concept's key rows, averaged over heads and the image's
    real queries), averaged over the prompts and every model evaluation of the sampler's trajectory for
    them (its noise levels), with the model's sampling defaults unless given. Only the conditional items
    count (the empty negative prompt has no concept tokens)."""
    d = {**sample.TURBO, **zi.defaults}
    steps, guidance = steps or d["steps"], d["guidance"] if guidance is None else guidance
    height, width = (size, size) if size else (d["height"], d["width"])
    tokens = concept_tokens(zi.tokenizer, forms, prompts, "" if guidance > 0 else None)
    if missing := [p for p, t in zip(prompts, tokens.tokens) if not t]:
        raise ValueError(f"the calibration prompt {missing[0]!r} names none of {forms}; each must name it.")
    dit, probes = zi.transformer, []

    def before(inputs, lay, items):
        probes.append([Z.AttentionProbe(lay, [list(t) for t in items]) for _ in dit.layers])
        for layer, probe in zip(dit.layers, probes[-1]):
            layer.attention.probe = probe

    def after():
        for layer in dit.layers:
            layer.attention.probe = None

    noise = sample.initial_noise(len(prompts), dit.cfg.in_channels, height, width, zi.vae_scale_factor, seed)
    cond = zi.encode_prompts(prompts)
    uncond = zi.encode_prompts([""] * len(prompts)) if guidance > 0 else None
    try:
        with on_each_forward(dit, tokens, before, after):
            sample.denoise(dit, noise.to(zi.device), cond, sample.turbo_sigmas(steps, zi.scheduler.shift),
                           uncond, guidance)
    finally:
        after()
    return torch.stack([torch.stack([t for p in probes for t in p[i].terms]).double().mean()
                        for i in range(len(dit.layers))])


def localize(zi, forms: list[str], prompts: list[str], k: int, **sampling) -> tuple[tuple[int, ...], Tensor]:
    """DiT-Localization's calibration: the k unified layers whose image queries put the most attention mass
    on the concept's tokens (largest first), and every layer's mass (concept_attention_mass)."""
    mass = concept_attention_mass(zi, forms, prompts, **sampling)
    if not 1 <= k <= len(mass):
        raise ValueError(f"k must be between 1 and the {len(mass)} unified layers, got {k}.")
    return tuple(mass.topk(k).indices.tolist()), mass


def null_caption(zi, text: str = "") -> Tensor:
    """(L0, cap_feat_dim) text features of one neutral caption for every item (default: the empty prompt,
    the null condition of Eq. 5)."""
    return zi.encode_prompts([text])[0]


def without_concept(prompt: str, forms: list[str]) -> str:
    """The prompt with every occurrence of the concept's forms deleted (whitespace tidied): the reference
    method's knowledge-agnostic version of a prompt, e.g. "a red star in the style of"."""
    keep = [True] * len(prompt)
    for a, b in Z.find_phrases(prompt, forms):
        keep[a:b] = [False] * (b - a)
    return " ".join("".join(c for c, k in zip(prompt, keep) if k).split())


def clean_captions(zi, forms: list[str], prompts: list[str]) -> list[Tensor]:
    """Per prompt, the features of without_concept(prompt): neutral captions that keep the rest of the
    request (the reference's choice), for dit_localization(..., neutral=clean_captions(...))."""
    return zi.encode_prompts([without_concept(p, forms) for p in prompts])


def _pad(n: int) -> int:
    """n rounded up to the segment multiple (model.SEQ_MULTI_OF), as Layout pads captions."""
    return -(-n // M.SEQ_MULTI_OF) * M.SEQ_MULTI_OF


def _substitution(lay: M.Layout, items, owners: list[int], L0s: list[int], scope: str):
    """Rows of a chosen layer's attention input to overwrite, (batch index, unified row), and for each the
    row of the recorded null-pass rows (owner k's pad(L0s[k]) caption rows, owner after owner) to copy.
    scope "caption": caption row j of an item naming the concept (pad slots included) from neutral row
    min(j, pad(L0) - 1), the last being a pad slot; scope "concept": the concept rows from pad slot L0."""
    b, r, src, start = [], [], [], 0
    for i, L0 in zip(owners, L0s):
        js = list(range(lay.n_cap_padded[i])) if scope == "caption" else list(items[i])
        srcs = [min(j, _pad(L0) - 1) for j in js] if scope == "caption" else [L0] * len(js)
        b += [i] * len(js)
        r += [lay.n_img_padded[i] + j for j in js]
        src += [start + s for s in srcs]
        start += _pad(L0)
    return torch.tensor(b), torch.tensor(r), torch.tensor(src)


def _neutral_of(neutral, i: int) -> Tensor:
    """Item i's neutral caption: the one tensor, or the i-th of a per-prompt list."""
    if torch.is_tensor(neutral):
        return neutral
    if i >= len(neutral):
        raise ValueError("a negative prompt names the concept but the neutral captions are per prompt; pass "
                         "one neutral caption (e.g. null_caption(zi)) or a negative prompt without it.")
    return neutral[i]


@contextmanager
def dit_localization(dit: M.ZImageTransformer, tokens: ConceptTokens, layers, neutral: Tensor | list[Tensor],
                     scope: str = "caption"):
    """DiT-Localization's intervention: in the unified layers `layers` only, the items whose prompt names the
    concept attend with a neutral caption's text rows; every other layer, item and image row is untouched.

    For each such item the DiT first runs on the same x_t and t with its neutral caption (`neutral`: one
    (L0, cap_feat_dim) tensor, e.g. null_caption, or one per prompt, e.g. clean_captions): one extra DiT call
    per sampler call, on those items only. In each chosen layer, the attention input (the normed,
    adaLN-scaled hidden state that feeds to_q, to_k and to_v) at the item's caption rows is replaced by that
    null pass's, so those rows' queries, keys and values are the neutral caption's at the same RoPE
    positions; the residual stream and FFN stay the item's own. DiT-Localization's reference code does
    this: it overwrites the text part of a localised block's attention input with the knowledge-agnostic
    prompt's.

    scope "caption" (default) replaces the whole caption: the context refiner has already spread the concept
    over every caption token (see attention_zeroing). Caption rows past the neutral's padded length take its
    last pad slot; neutral rows past the caption's are unused. scope "concept" replaces only the concept's
    rows, from the neutral's first pad slot (the learned cap_pad_token after the refiner: "no text here")."""
    layers = sorted(set(layers))
    _check_localization(neutral, scope)
    state, saved = {"mode": None}, {}

    def before(inputs, lay, items):
        state["mode"] = None
        owners = [i for i, toks in enumerate(items) if toks]  # the items naming the concept, in batch order
        if not owners or not layers:
            return
        x, t, _ = inputs
        xs, caps = [x[i] for i in owners], [_neutral_of(neutral, i) for i in owners]
        null_lay = dit.layout([tuple(xi.shape[-2:]) for xi in xs], [len(c) for c in caps])
        state.update(mode="record", spans=list(zip(null_lay.n_img_padded, null_lay.n_cap_padded)))
        dit(xs, t[owners], caps)  # the null pass: same x_t and t, neutral captions
        b, r, src = _substitution(lay, items, owners, [len(c) for c in caps], scope)
        dev = x[0].device
        state.update(mode="replace", rows=(b.to(dev), r.to(dev)), src=src.to(dev))

    def after():
        state["mode"] = None
        saved.clear()

    handles = [dit.layers[i].attention.register_forward_pre_hook(_substitute_attention_input(i, state, saved))
               for i in layers]
    try:
        with on_each_forward(dit, tokens, before, after):
            yield
    finally:
        for h in handles:
            h.remove()


def _check_localization(neutral: Tensor | list[Tensor], scope: str) -> None:
    for n in [neutral] if torch.is_tensor(neutral) else neutral:
        if len(n) % M.SEQ_MULTI_OF == 0:
            raise ValueError(f"a neutral caption of {len(n)} tokens (a multiple of {M.SEQ_MULTI_OF}) has no "
                             f"pad slot; add or remove a word.")
    if scope not in ("caption", "concept"):
        raise ValueError(f"scope must be 'caption' or 'concept', got {scope!r}.")


def _substitute_attention_input(i: int, state: dict, saved: dict):
    """The pre-hook of chosen layer i's attention: in the null pass it keeps each null item's caption rows
    of the attention input (saved[i]); in the items' own pass it writes them over the rows to replace."""
    def hook(module, args):  # args[0] (B, S, D): the attention input of chosen layer i
        x = args[0]
        if state["mode"] == "record":  # (sum of padded neutral lengths, D): each null item's caption rows
            saved[i] = torch.cat([x[k, s:s + n] for k, (s, n) in enumerate(state["spans"])])
        elif state["mode"] == "replace":
            return (x.index_put(state["rows"], saved[i][state["src"]]),) + args[1:]
        return None
    return hook


# ---------------------------------------------------------------------------------------------------------
# Demo: base row, then the baseline's row, same seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Render base vs an inference-time erasure baseline: one PNG, the "
                                            "base model's row on top, the baseline's below, same seeds.")
    p.add_argument("--model", default=str(sample.DEFAULT_MODEL), help="Z-Image checkpoint directory")
    p.add_argument("--method", choices=("zeroing", "localization"), default="zeroing")
    p.add_argument("--concept", action="append", required=True,
                   help="a surface form of the concept (repeatable: every form given is located)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: the model's own prompts)")
    p.add_argument("--unified-only", action="store_true", help="zeroing: not in the context refiner")
    p.add_argument("--calibration", action="append",
                   help="localization: calibration prompt (repeatable; default: the prompts that name it)")
    p.add_argument("--k", type=int, default=2, help="localization: number of layers (the paper: 1, 2, 4)")
    p.add_argument("--neutral", choices=("empty", "clean"), default="empty",
                   help="localization: the empty caption, or each prompt without the concept")
    p.add_argument("--scope", choices=("caption", "concept"), default="caption",
                   help="localization: substitute every caption row, or the concept's rows only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="model evaluations (default: the model's)")
    p.add_argument("--out", default="baseline.png", help="output PNG")
    return p.parse_args(argv)


def baseline(zi, args, prompts: list[str], tokens: ConceptTokens, steps: int):
    """(the baseline's context manager, a description of it) for the command-line arguments."""
    if args.method == "zeroing":
        return attention_zeroing(zi.transformer, tokens, refiner=not args.unified_only), "attention zeroing"
    calib = args.calibration or [p for p, t in zip(prompts, tokens.tokens) if t]
    layers, mass = localize(zi, args.concept, calib, args.k, steps=steps)
    print("attention mass per unified layer:", " ".join(f"{m:.4f}" for m in mass.tolist()))
    neutral = null_caption(zi) if args.neutral == "empty" else clean_captions(zi, args.concept, prompts)
    return dit_localization(zi.transformer, tokens, layers, neutral, args.scope), f"DiT-Localization {layers}"


def main(argv=None) -> None:
    from checkpoint import load_zimage
    from cli import die
    args = parse_args(argv)
    try:
        zi = load_zimage(args.model)
        d = {**sample.TURBO, **zi.defaults}
        prompts, steps = args.prompt or d.get("prompts") or [], args.steps or d["steps"]
        tokens = concept_tokens(zi.tokenizer, args.concept, prompts, "" if d["guidance"] > 0 else None)
        if not any(tokens.tokens):
            raise ValueError(f"no prompt names {args.concept}; pass --prompt with one that does.")
        ctx, what = baseline(zi, args, prompts, tokens, steps)
    except (M.CheckpointError, ValueError) as e:
        die(str(e))

    def render():
        return sample.generate(zi, prompts, args.seed, d["height"], d["width"], steps, d["guidance"])

    base = render()
    with ctx:
        erased = render()
    sample.save_png(sample.grid(torch.cat([base, erased]), len(prompts)), args.out)
    print(f"wrote {args.out}: base (top) vs {what} (bottom), {len(prompts)} prompt(s), seed {args.seed}")


if __name__ == "__main__":
    main()
