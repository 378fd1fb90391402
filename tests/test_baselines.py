"""The two inference-time baselines of baselines.py, each held to the property that defines it.

Attention zeroing (§3, Fig. 3 left: A_attn[:, :, idx] = 0): without concept tokens the model is the base model
bit for bit, with no tensor edited; with them, the attention weights the layers apply to the concept's key
rows are exactly zero (read back through autograd), and the other weights keep their values (no
renormalisation); the negative half of a CFG batch and items of other caption lengths are untouched.
DiT-Localization: every block before the first chosen layer is the base model bit for bit, and so is every
item that does not name the concept; without concept tokens nothing changes (not even an extra DiT call);
the substituted rows are the neutral caption's; the chosen layers are those of largest attention mass,
measured here independently with a float64 softmax.

Where a test needs rows it works them out itself (image rows first, each segment padded to 32), not from
model.Layout.
"""

import math
from contextlib import nullcontext

import pytest
import torch
from PIL import Image

import baselines as BL
import checkpoint as C
import sample

# ---------------------------------------------------------------------------------------------------
# Helpers


def pad32(n: int) -> int:
    return -(-n // 32) * 32


def load_dit(ckpt):
    return C.load_zimage(ckpt, text_encoder=False, vae=False).transformer


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny Z-Image (real concept world, 6 unified layers)."""
    return C.load_zimage(sample.DEFAULT_MODEL)


# Two items of different resolutions and caption lengths: 6 and 16 patches, captions of 5 and 37 tokens
# (padded to 32 and 64): image pad rows, caption pad slots and batch padding all occur.
SIZES = [(4, 6), (8, 8)]
CAP_LENS = [5, 37]
CONCEPT = ((1, 3), (0, 20, 36))  # concept token indices in each item's caption
TOKENS = BL.ConceptTokens(CONCEPT, tuple(CAP_LENS))


def patches(sizes=SIZES) -> list[int]:
    return [(h // 2) * (w // 2) for h, w in sizes]


def dit_inputs(cfg, sizes=SIZES, cap_lens=CAP_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(cfg.in_channels, h, w, generator=g) for h, w in sizes]
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in cap_lens]
    return x, torch.rand(len(sizes), generator=g), caps


def caption_layers(dit):
    """(attention module, row of caption token 0 per item, real rows per item) of every layer that sees
    the caption: the unified layers (image rows, then the caption) and the context refiner (caption only)."""
    n_img = [pad32(n) for n in patches()]
    unified = [(b.attention, n_img, [a + pad32(n) for a, n in zip(n_img, CAP_LENS)]) for b in dit.layers]
    refiner = [(b.attention, [0, 0], [pad32(n) for n in CAP_LENS]) for b in dit.context_refiner]
    return unified + refiner


class Hooks:
    """Forward (pre-)hooks registered by a test, removed on exit."""

    def __init__(self):
        self.handles = []

    def post(self, module, fn, prepend=False):
        self.handles.append(module.register_forward_hook(fn, prepend=prepend))

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# Locating the concept and matching DiT calls


def test_concept_tokens_follow_the_training_localisation_and_match_calls_by_caption_length(tiny):
    """Canonical and same-letter aliases are found, a misspelling is not; a DiT call is matched by its
    caption lengths: B prompts, or B prompts then B negatives (CFG); anything else is an error."""
    prompts = ["a red star in the style of Van Gogh", "Vincent van Gogh, a tree", "a moon by VanGogh"]
    toks = BL.concept_tokens(tiny.tokenizer, ["Van Gogh"], prompts, negative_prompt="")
    words = [[tiny.tokenizer.tok.decode([tiny.tokenizer.encode(p)[0][j]]).strip() for j in t]
             for p, t in zip(prompts, toks.tokens)]
    assert words == [["Van", "Gogh"], ["van", "Gogh"], []]
    assert toks.negative == () and toks.negative_length == len(tiny.tokenizer.encode("")[0])
    lens = list(toks.lengths)
    assert toks.per_item(lens) == list(toks.tokens)
    assert toks.per_item(lens + [toks.negative_length] * 3) == list(toks.tokens) + [()] * 3
    with pytest.raises(ValueError, match="make them from the prompts"):
        toks.per_item(lens[:2])
    assert BL.without_concept(prompts[0], ["Van Gogh"]) == "a red star in the style of"


# ---------------------------------------------------------------------------------------------------
# 1. Attention zeroing


def test_zeroing_without_concept_tokens_is_the_base_model_and_edits_no_tensor(random_ckpt):
    """A call whose items name no concept token is the base model bit for bit, and every value projection's
    output reaches the attention as the very tensor the projection made (no hook replaced it)."""
    dit = load_dit(random_ckpt)
    inputs = dit_inputs(dit.cfg)
    none = BL.ConceptTokens(((), ()), tuple(CAP_LENS))
    made, replaced = {}, []
    with torch.no_grad():
        base = dit(*inputs)
        with BL.attention_zeroing(dit, none), Hooks() as hooks:
            for m, _, _ in caption_layers(dit):
                hooks.post(m.to_v, lambda mod, a, v: made.__setitem__(mod, v), prepend=True)
                hooks.post(m.to_v, lambda mod, a, v: replaced.append(v is not made[mod]))
            same = dit(*inputs)
    assert len(replaced) == len(caption_layers(dit)) and not any(replaced)
    for a, b in zip(base, same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("refiner", [True, False])
def test_the_attention_weights_applied_to_the_concept_columns_are_exactly_zero(random_ckpt, refiner):
    """Read back through autograd: a layer's value projection v enters its attention output as h = A v, so
    d(sum of item i's real rows of h) / d v[i, j] = the column sum of the applied weights A[:, :, j]. With
    zeroing it is exactly 0 for every concept row j, item and head, in every unified layer (and the context
    refiner with `refiner`), > 0 for every other real key row; without zeroing the concept's are > 0 too."""
    dit = load_dit(random_ckpt)
    layers = caption_layers(dit)
    zeroed = {m for m, _, _ in layers[:len(dit.layers)]} | ({m for m, _, _ in layers} if refiner else set())
    for zero in (False, True):
        leaves, outs = {}, {}
        with Hooks() as hooks, (BL.attention_zeroing(dit, TOKENS, refiner) if zero else nullcontext()):
            for m, _, _ in layers:  # make v a leaf before the baseline's hook sees it
                hooks.post(m.to_v, lambda mod, a, v: leaves.setdefault(mod, v.detach().requires_grad_()),
                           prepend=True)
                hooks.pre(m.to_out[0], lambda mod, a: outs.__setitem__(mod, a[0]))  # (B, S, D) = A v
            dit(*dit_inputs(dit.cfg))
        for m, offsets, real in layers:
            for i, (off, n) in enumerate(zip(offsets, real)):
                h_sum = outs[m.to_out[0]][i, :n].sum()  # item i's real rows of h
                g = torch.autograd.grad(h_sum, leaves[m.to_v], retain_graph=True)[0][i]
                cols = [off + j for j in CONCEPT[i]]
                others = [r for r in range(n) if r not in cols]
                assert (g[others] > 0).all()
                if zero and m in zeroed:
                    assert torch.equal(g[cols], torch.zeros_like(g[cols]))
                else:
                    assert (g[cols] > 0).all()


def test_zeroing_is_the_literal_column_zeroing_without_renormalisation(random_ckpt):
    """Each layer's attention output equals (A with the concept columns set to 0) V computed here in float64
    from the layer's q, k, v and batch mask, and not the renormalised version."""
    dit = load_dit(random_ckpt)
    layers = caption_layers(dit)
    calls, outs = {}, {}
    with torch.no_grad(), BL.attention_zeroing(dit, TOKENS), Hooks() as hooks:
        for m, _, _ in layers:
            hooks.pre(m, lambda mod, a: calls.__setitem__(mod, a))
            hooks.pre(m.to_out[0], lambda mod, a: outs.__setitem__(mod, a[0]))
        dit(*dit_inputs(dit.cfg))
    with torch.no_grad():  # the baseline's hooks are gone: qkv gives the layer's own q, k, v
        for m, offsets, real in layers:
            x, freqs, mask, text_rows = calls[m]
            q, k, v = (t.double() for t in m.qkv(x, freqs, text_rows))  # (B, H, S, Dh)
            a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
            if mask is not None:
                a = a.masked_fill(~mask, -math.inf)
            keep = torch.ones(a.shape[0], 1, 1, a.shape[-1], dtype=a.dtype)
            for i, off in enumerate(offsets):
                keep[i, ..., [off + j for j in CONCEPT[i]]] = 0
            w = a.softmax(-1) * keep  # A[:, :, idx] = 0
            want, renormed = w @ v, (w / w.sum(-1, keepdim=True)) @ v
            got = outs[m.to_out[0]].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
            for i, n in enumerate(real):
                torch.testing.assert_close(got[i, :, :n], want[i, :, :n], rtol=1e-5, atol=1e-5)
                assert (got[i, :, :n] - renormed[i, :, :n]).abs().max() > 1e-3


def test_zeroing_leaves_the_negative_half_of_a_cfg_batch_bit_identical(random_ckpt):
    """In a CFG call (two prompts of different lengths, then two copies of a negative prompt without the
    concept), the negative items are the base model's bit for bit and the positive items change."""
    dit = load_dit(random_ckpt)
    x, t, caps = dit_inputs(dit.cfg)
    neg = torch.randn(9, dit.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(1))
    toks = BL.ConceptTokens(CONCEPT, tuple(CAP_LENS), (), 9)
    cfg_call = (x + x, torch.cat([t, t]), caps + [neg, neg])
    with torch.no_grad():
        base = dit(*cfg_call)
        with BL.attention_zeroing(dit, toks):
            zeroed = dit(*cfg_call)
    for i in (0, 1):
        assert not torch.allclose(base[i], zeroed[i])
        assert torch.equal(base[2 + i], zeroed[2 + i])


def test_sampling_with_zeroing_changes_the_canonical_prompt_and_not_a_misspelled_one(tiny):
    """Through sample.generate (CFG, the tiny model's guidance): the image of a prompt naming "Van Gogh"
    changes, the image of the same prompt misspelled "VanGogh" (not located: the bypass of §3) does not
    change by a single bit."""
    prompts = ["a red star in the style of Van Gogh", "a red star in the style of VanGogh"]
    toks = BL.concept_tokens(tiny.tokenizer, ["Van Gogh"], prompts, "")
    for p, tk in zip(prompts, toks.tokens):
        one = BL.ConceptTokens((tk,), (len(tiny.tokenizer.encode(p)[0]),), (), toks.negative_length)
        base = sample.generate(tiny, [p], 0, 64, 64, 3, guidance=3.0)
        with BL.attention_zeroing(tiny.transformer, one):
            erased = sample.generate(tiny, [p], 0, 64, 64, 3, guidance=3.0)
        assert torch.equal(base, erased) == (not tk)


# ---------------------------------------------------------------------------------------------------
# 2. DiT-Localization


def localization_call(dit, seed=0):
    """A call with an item naming the concept (tokens 1 and 3 of 5) and one that does not (37 tokens)."""
    return dit_inputs(dit.cfg, seed=seed), BL.ConceptTokens(((1, 3), ()), tuple(CAP_LENS))


@pytest.mark.parametrize("chosen", [(3,), (4, 2), (1, 5, 2, 4)])
@pytest.mark.parametrize("scope", ["caption", "concept"])
def test_blocks_before_the_first_chosen_layer_and_other_items_are_the_base_model(tiny, chosen, scope):
    """K = 1, 2, 4 chosen layers: the refiners' and every unified block's output before the first chosen
    layer are the base model's bit for bit; from that layer on the concept item changes; the item that
    does not name the concept is the base model's at every block and at the output."""
    dit = tiny.transformer
    inputs, toks = localization_call(dit)
    blocks = list(dit.noise_refiner) + list(dit.context_refiner) + list(dit.layers)
    neutral = torch.randn(8, dit.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(2))
    runs = []
    for ctx in (nullcontext(), BL.dit_localization(dit, toks, chosen, neutral, scope)):
        seen = {b: [] for b in blocks}
        with torch.no_grad(), ctx, Hooks() as hooks:
            for b in blocks:
                hooks.post(b, lambda mod, a, out: seen[mod].append(out))
            out = dit(*inputs)
        # each block's last call: the sampler's, not the null pass
        runs.append(({b: s[-1] for b, s in seen.items()}, out))
    (base, base_out), (loc, loc_out) = runs
    first = dit.layers[min(chosen)]
    for b in blocks:
        before = blocks.index(b) < blocks.index(first)
        if b in dit.noise_refiner or b in dit.context_refiner or before:
            assert torch.equal(base[b], loc[b])
        else:
            assert not torch.equal(base[b][0], loc[b][0])
        assert torch.equal(base[b][1], loc[b][1])
    assert torch.equal(base_out[1], loc_out[1]) and not torch.equal(base_out[0], loc_out[0])


def test_dit_localization_without_concept_tokens_is_the_base_model_and_runs_no_null_pass(random_ckpt):
    """No item names the concept: outputs equal the base model's bit for bit and the DiT runs once."""
    dit = load_dit(random_ckpt)
    inputs = dit_inputs(dit.cfg)
    none = BL.ConceptTokens(((), ()), tuple(CAP_LENS))
    neutral = torch.randn(8, dit.cfg.cap_feat_dim)
    calls = []
    with torch.no_grad():
        base = dit(*inputs)
        with BL.dit_localization(dit, none, (0, 1), neutral):
            handle = dit.register_forward_pre_hook(lambda mod, a: calls.append(1))
            same = dit(*inputs)
            handle.remove()
    assert len(calls) == 1
    for a, b in zip(base, same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scope", ["caption", "concept"])
def test_the_substituted_attention_input_is_the_neutral_captions(tiny, scope):
    """In a chosen layer the concept item's attention input is, at its caption rows (scope "caption") or
    at its concept rows (scope "concept"), the attention input of the same layer in a separate call with
    the neutral caption on the same x_t and t (caption rows past it: its last pad slot; concept rows: its
    first pad slot); every other row is the unchanged input (the base model's, before any chosen layer)."""
    dit, chosen = tiny.transformer, 2
    (x, t, caps), toks = localization_call(dit)
    neutral = torch.randn(8, dit.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(3))
    attn, got = dit.layers[chosen].attention, {}
    record = lambda name: (lambda mod, a: got.__setitem__(name, a[0]))  # noqa: E731
    with torch.no_grad():
        with Hooks() as hooks:
            hooks.pre(attn, record("null"))
            dit([x[0]], t[:1], [neutral])
            hooks.handles[0].remove()
            hooks.pre(attn, record("base"))
            dit(x, t, caps)
        with BL.dit_localization(dit, toks, (chosen,), neutral, scope), Hooks() as hooks:
            hooks.pre(attn, record("loc"))  # after the baseline's pre-hook: sees the substituted input
            dit(x, t, caps)
    start = pad32(patches()[0])  # item 0's caption rows start after its padded image rows
    want = got["base"].clone()
    if scope == "caption":
        for j in range(pad32(CAP_LENS[0])):  # 32 rows, the neutral's own 8 tokens + 24 pad slots
            want[0, start + j] = got["null"][0, start + j]
    else:
        for j in (1, 3):
            want[0, start + j] = got["null"][0, start + 8]
    assert torch.equal(got["loc"], want)


@pytest.fixture(scope="module")
def measured(tiny):
    """localize's masses, and the masses computed here from each call's q and k with a float64 softmax."""
    prompts = ["An art in the style of Van Gogh", "a blue house, Van Gogh style, on a plain background"]
    calls, dit = [], tiny.transformer
    with Hooks() as hooks:
        for i, b in enumerate(dit.layers):
            hooks.pre(b.attention, lambda mod, a, i=i: calls.append((i, a)))
        _, mass = BL.localize(tiny, ["Van Gogh"], prompts, k=1, steps=2)
    toks = BL.concept_tokens(tiny.tokenizer, ["Van Gogh"], prompts)
    n_img, terms = patches([(16, 16)])[0], {i: [] for i in range(len(dit.layers))}
    with torch.no_grad():
        for i, (x, freqs, mask, text_rows) in calls:  # a CFG call: the prompts, then two empty negatives
            q, k, _ = (u.double() for u in dit.layers[i].attention.qkv(x, freqs, text_rows))
            for b, (tk, n) in enumerate(zip(toks.tokens, toks.lengths)):
                real = pad32(n_img) + pad32(n)
                p = (q[b, :, :n_img] @ k[b, :, :real].transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
                terms[i].append(p[..., [pad32(n_img) + j for j in tk]].sum(-1).mean())
    return mass, torch.stack([torch.stack(v).mean() for v in terms.values()]), len(calls)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_localize_picks_the_layers_of_largest_independently_measured_mass(tiny, measured, k):
    """The chosen layers are the top-k of an independent float64 measurement of the attention mass image
    queries put on the concept tokens (2 prompts x 2 sampler steps x CFG), which localize's masses match."""
    mass, independent, n_calls = measured
    assert n_calls == 2 * len(tiny.transformer.layers)
    torch.testing.assert_close(mass, independent, rtol=1e-5, atol=1e-7)
    order = independent.argsort(descending=True)
    assert independent[order[k - 1]] - independent[order[k]] > 1e-4  # a clear top k, not a near tie
    prompts = ["An art in the style of Van Gogh", "a blue house, Van Gogh style, on a plain background"]
    layers, _ = BL.localize(tiny, ["Van Gogh"], prompts, k=k, steps=2)
    assert layers == tuple(order[:k].tolist())


# ---------------------------------------------------------------------------------------------------
# Demo


@pytest.mark.parametrize("method", ["zeroing", "localization"])
def test_the_demo_writes_a_base_row_and_a_baseline_row(tmp_path, method):
    """`python baselines.py` renders one PNG: the base model's row, then the baseline's, one column each."""
    out = tmp_path / "b.png"
    BL.main(["--method", method, "--concept", "Van Gogh", "--prompt", "a red star in the style of Van Gogh",
             "--prompt", "a green tree", "--steps", "2", "--k", "1", "--out", str(out)])
    img = Image.open(out)
    assert img.size == (2 * 64, 2 * 64)
