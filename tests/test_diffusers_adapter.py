"""zerase_diffusers: a zerase LoRA inside a stock diffusers ZImagePipeline gives the image zerase's own
sampler gives (sample.generate + lora_file.apply_loras), its handle restores the base model bit for bit,
diffusers' own LoRA loader refuses the file, and every case the adapter cannot handle is refused with a
clear message.

The LoRA factors are random and large, so the erased image differs from the base image by far more than
the parity tolerance: an adapter that ignored the LoRA, or applied it to image rows, would fail.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoint as C
import lora_file
import sample
import zerase as Z
import zerase_diffusers as ZD
from tests.checkpoints import TRANSFORMER, load_diffusers_pipeline

SPEC = Z.LoRASpec(layers=(0, 1), rank=4, lora_alpha=4.0)
STEPS = 8


# ---------------------------------------------------------------------------------------------------
# Helpers and fixtures


def write_lora(ckpt, path, seed: int, std: float = 2.0, spec: Z.LoRASpec = SPEC):
    """A LoRA with random, large factors (as if trained hard), saved by save_lora."""
    dit = C.load_zimage(ckpt, text_encoder=False, vae=False).transformer
    Z.add_lora(dit, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in Z.lora_modules(dit).values():
            m.lora_B.normal_(0.0, std, generator=g)
    lora_file.save_lora(path, dit, spec, lora_file.base_fingerprint(dit), {"concept": f"c{seed}"})
    return path


@pytest.fixture(scope="module")
def loras(random_ckpt, tmp_path_factory):
    """Two gated LoRAs on to_q/to_k/to_v of both unified layers; one --no-gate LoRA on layer 1's to_k/to_v."""
    root = tmp_path_factory.mktemp("zd_loras")
    no_gate = Z.LoRASpec(layers=(1,), targets=("to_k", "to_v"), rank=2, lora_alpha=1.0, gated=False)
    return [write_lora(random_ckpt, root / f"l{s}.safetensors", seed=s) for s in (1, 2)] + \
        [write_lora(random_ckpt, root / "no_gate.safetensors", seed=3, spec=no_gate)]


@pytest.fixture(scope="module")
def pipe(random_ckpt):
    p = load_diffusers_pipeline(random_ckpt)
    p.set_progress_bar_config(disable=True)
    return p


def diffusers_images(pipe, prompts, seed, h, w, guidance=0.0, negative="") -> np.ndarray:
    """(B, H, W, 3) int16, called as tests/test_sample.py calls the pipeline. The prompt list is copied:
    diffusers 0.42.1's encode_prompt writes the chat-templated prompts back into the caller's list, so
    passing one list twice would template it twice."""
    kw = {"negative_prompt": [negative] * len(prompts)} if guidance > 0 else {}
    imgs = pipe(prompt=list(prompts), height=h, width=w, num_inference_steps=STEPS, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kw).images
    return np.stack([np.asarray(i) for i in imgs]).astype(np.int16)


def our_images(ckpt, loras, weights, prompts, seed, h, w, guidance=0.0, negative="") -> np.ndarray:
    zi = C.load_zimage(ckpt)
    if loras:
        lora_file.apply_loras(zi.transformer, loras, weights)
    return sample.generate(zi, prompts, seed, h, w, STEPS, guidance, negative).numpy().astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


PROMPTS = ("a red star",
           ("a green tree beside a small house at sunset in the style of Van Gogh, swirling night sky over a "
            "quiet village with thick strokes and a big yellow moon"),  # > 32 tokens
           "")


# ---------------------------------------------------------------------------------------------------
# Parity with zerase's own sampler


@pytest.mark.parametrize("n_loras, weights, guidance, h, w", [
    (1, None, 0.0, 32, 48),  # one LoRA, Turbo's guidance 0, non-square
    (2, None, 3.0, 48, 32),  # two averaged (Eq. 63), CFG with a negative prompt: 2B items per forward
    (2, [0.8, 0.5], 0.0, 32, 32),  # explicit weights
])
def test_pipeline_with_adapter_renders_our_erased_image(pipe, random_ckpt, loras, n_loras, weights, guidance,
                                                        h, w):
    """ZImagePipeline + apply_zerase gives sample.generate + apply_loras's image (every pixel within 2/255)
    for a batch of prompts of different lengths (0 to > 32 tokens), and that image is far from the base one,
    so the gate (caption rows of each item, negative captions included) is where ours puts it."""
    files = loras[:n_loras]
    ours = our_images(random_ckpt, files, weights, list(PROMPTS), 4, h, w, guidance, "blurry")
    base = diffusers_images(pipe, PROMPTS, 4, h, w, guidance, "blurry")
    with ZD.apply_zerase(pipe, files if n_loras > 1 else files[0], weights):
        erased = diffusers_images(pipe, PROMPTS, 4, h, w, guidance, "blurry")
    assert erased.std() > 5, "flat image: the comparison would not see a bug"
    assert max_diff(erased, ours) <= 2 and np.abs(erased - ours).mean() <= 0.5
    for i in range(len(PROMPTS)):  # the LoRA visibly changes every item, the empty caption's too
        assert max_diff(erased[i], base[i]) > 20 and np.abs(erased[i] - base[i]).mean() > 2, i


@pytest.mark.parametrize("which", ["two gated, averaged", "no-gate, layer 1 to_k/to_v"])
def test_transformer_outputs_match_on_mixed_sizes(pipe, random_ckpt, loras, which):
    """At the transformer level, in one batch of mixed (and non-square) latent sizes and caption lengths
    (5, exactly 32, 40 tokens; 16 image tokens, exactly 32, 64), the adapted diffusers transformer equals
    our DiT with the same LoRAs (two averaged per Eq. 63; or a --no-gate file on some projections of one
    layer) to float precision, and the LoRA moves the output."""
    files = loras[:2] if which.startswith("two") else loras[2:]
    dit = C.load_zimage(random_ckpt, text_encoder=False, vae=False).transformer
    lora_file.apply_loras(dit, files)
    cfg = dit.cfg
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(cfg.in_channels, h, w, generator=g) for h, w in [(8, 8), (8, 16), (16, 16)]]
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (5, 32, 40)]
    t = torch.rand(3, generator=g)
    with torch.no_grad():
        ours = dit(xs, t, caps)
        run = lambda: pipe.transformer([x[:, None] for x in xs], t, caps, return_dict=False)[0]
        base = run()  # x: list of (C, F=1, H, W), as the pipeline passes latents
        with ZD.apply_zerase(pipe, files):
            theirs = run()
    for o, d, b in zip(ours, theirs, base):
        scale = o.abs().max().item()
        assert (o - d[:, 0]).abs().max().item() <= 1e-4 * scale
        assert (d - b).abs().max().item() > 0.05 * scale  # the LoRA matters for every item


# ---------------------------------------------------------------------------------------------------
# The handle


def test_remove_restores_the_base_pipeline_bit_for_bit(pipe, loras):
    """After handle.remove() (and after leaving the with block) the projections are the original modules,
    no hook is left, and the pipeline renders its base image bit for bit."""
    attn = pipe.transformer.layers[0].attention
    originals = [attn.to_q, attn.to_k, attn.to_v]
    hooks = (dict(pipe.transformer._forward_pre_hooks), dict(pipe.transformer._forward_hooks))
    base = diffusers_images(pipe, PROMPTS[:2], 9, 32, 32)
    h = ZD.apply_zerase(pipe, loras[0])
    try:
        assert h.active and max_diff(diffusers_images(pipe, PROMPTS[:2], 9, 32, 32), base) > 20
    finally:
        h.remove()  # also when the assertion fails: the pipeline is shared by the tests below
    assert not h.active and [attn.to_q, attn.to_k, attn.to_v] == originals
    assert (dict(pipe.transformer._forward_pre_hooks), dict(pipe.transformer._forward_hooks)) == hooks
    assert np.array_equal(diffusers_images(pipe, PROMPTS[:2], 9, 32, 32), base)
    with ZD.apply_zerase(pipe.transformer, loras[:2]):
        pass
    assert [attn.to_q, attn.to_k, attn.to_v] == originals
    assert np.array_equal(diffusers_images(pipe, PROMPTS[:2], 9, 32, 32), base)


# ---------------------------------------------------------------------------------------------------
# diffusers' own loader and the fingerprint


def test_diffusers_load_lora_weights_refuses_a_zerase_file(pipe, loras, monkeypatch):
    """pipe.load_lora_weights(zerase file) raises, so a token-gated LoRA is never applied to image tokens as
    an ordinary LoRA. Without peft it stops at 'PEFT backend is required'; with the PEFT check passed, it
    is the file's keys (no 'lora' in 'zerase_gated.*') that diffusers refuses, before touching the model.
    With peft installed, the model-level transformer.load_lora_adapter(file) does not raise: it finds no
    key under its 'transformer.' prefix, logs a warning and loads nothing (checked here when peft is)."""
    import importlib.util

    import diffusers.utils
    attn = pipe.transformer.layers[0].attention
    before = attn.to_q
    if not diffusers.utils.USE_PEFT_BACKEND:
        with pytest.raises(ValueError, match="PEFT backend is required"):
            pipe.load_lora_weights(str(loras[0]))
        monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", True)  # as if peft were installed
    with pytest.raises(ValueError, match="Invalid adapter checkpoint"):
        pipe.load_lora_weights(str(loras[0]))
    assert attn.to_q is before and type(before) is nn.Linear
    if importlib.util.find_spec("peft") is not None:
        pipe.transformer.load_lora_adapter(str(loras[0]))  # silently loads nothing
        assert attn.to_q is before and not getattr(pipe.transformer, "peft_config", {})


def test_fingerprint_equals_ours_also_for_a_bf16_load(pipe, random_ckpt):
    """The fingerprint computed from the diffusers transformer equals lora_file.base_fingerprint of our
    loader's DiT, also when diffusers loads the fp32 checkpoint in bf16 (the stored tensors are read)."""
    from diffusers import ZImageTransformer2DModel
    ours = lora_file.base_fingerprint(C.load_zimage(random_ckpt, text_encoder=False, vae=False).transformer)
    assert ZD.diffusers_fingerprint(pipe.transformer) == ours
    bf16 = ZImageTransformer2DModel.from_pretrained(random_ckpt / "transformer", dtype=torch.bfloat16)
    assert ZD.diffusers_fingerprint(bf16) == ours


# ---------------------------------------------------------------------------------------------------
# Refusals


def tiny_transformer(**over):
    """An in-memory diffusers transformer of the fixtures' shape (not loaded from any folder)."""
    from diffusers import ZImageTransformer2DModel
    with torch.random.fork_rng(devices=[]):
        return ZImageTransformer2DModel(**{**TRANSFORMER, "cap_feat_dim": 32, "in_channels": 16, **over})


def test_refuses_another_base_model(pipe, loras):
    """A transformer with other weights (a fine-tuned pad token, or an untrained one of the same config)
    or another config (3 layers) is refused with the fingerprint message, and nothing is wrapped."""
    tuned = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        tuned.x_pad_token.add_(1e-3)  # still reports the checkpoint folder: the changed tensor is noticed
    for t in (tuned, tiny_transformer(), tiny_transformer(n_layers=3)):
        with pytest.raises(lora_file.LoRAFileError, match="trained for another base model"):
            ZD.apply_zerase(t, loras[0])
        assert type(t.layers[0].attention.to_q) is nn.Linear


def fuse(transformer):
    """Fuse q, k, v of every main layer into one to_qkv, as diffusers' Attention.fuse_projections does."""
    for layer in transformer.layers:
        layer.attention.fuse_projections()


def test_refuses_omni_fused_and_double_application(pipe, loras):
    """The omni variant (siglip, caption-first), fused qkv projections (before or after applying) and a
    second apply_zerase on an adapted transformer are each refused with a message naming the reason."""
    with pytest.raises(lora_file.LoRAFileError, match="omni"):
        ZD.apply_zerase(tiny_transformer(siglip_feat_dim=16), loras[0])
    fused = copy.deepcopy(pipe.transformer)
    fuse(fused)
    with pytest.raises(lora_file.LoRAFileError, match="fused qkv"):
        ZD.apply_zerase(fused, loras[0])
    with ZD.apply_zerase(pipe, loras[0]), pytest.raises(lora_file.LoRAFileError, match="already applied"):
        ZD.apply_zerase(pipe, loras[1])
    t = copy.deepcopy(pipe.transformer)
    ZD.apply_zerase(t, loras[0])
    fuse(t)
    with pytest.raises(ZD.ZEraseAdapterError, match="fused"):
        run_tiny(t)


def run_tiny(transformer):
    """One forward on a (C=16, F=1, 4, 4) latent and a 3-token caption: enough to reach the checks."""
    x = [torch.zeros(16, 1, 4, 4)]
    return transformer(x, torch.zeros(1), [torch.zeros(3, 32)], return_dict=False)


class BypassingProcessor:
    """An attention processor as a future diffusers might write it: q, k, v from the projections' weights
    (e.g. through a fused kernel), without calling the to_q/to_k/to_v modules."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, **kw):
        saved = {n: attn._modules[n] for n in ZD.TARGETS}
        for n, m in saved.items():
            with torch.device("meta"):
                plain = nn.Linear(m.in_features, m.out_features, bias=False)
            plain.weight = m.weight
            attn._modules[n] = plain
        try:
            return self.inner(attn, hidden_states, **kw)
        finally:
            attn._modules.update(saved)


def test_refuses_a_forward_that_never_calls_the_projections(pipe, loras):
    """If the attention no longer calls the wrapped projections, the forward raises (the LoRA would
    silently do nothing); the same when the unified sequence is built caption-first (RoPE check)."""
    t = copy.deepcopy(pipe.transformer)
    with ZD.apply_zerase(t, loras[0]):
        attn = t.layers[1].attention
        attn.processor = BypassingProcessor(attn.processor)
        with pytest.raises(ZD.ZEraseAdapterError, match=r"did not call layers\.1\.attention\.to_q"):
            run_tiny(t)
    t = copy.deepcopy(pipe.transformer)
    build = t._build_unified_sequence

    def caption_first(x, xf, xl, xn, cap, cf, cl, cn, *rest):  # [cap, x] instead of diffusers' [x, cap]
        return build(cap, cf, cl, cn, x, xf, xl, xn, *rest)

    t._build_unified_sequence = caption_first
    with ZD.apply_zerase(t, loras[0]), pytest.raises(ZD.ZEraseAdapterError, match="not its caption"):
        run_tiny(t)
