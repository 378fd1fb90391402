"""Component parity with the references: our DiT, text encoder, tokenizer and VAE, loaded by OUR loader from a
random checkpoint that diffusers/transformers wrote with save_pretrained in the real layout, against the
diffusers/transformers modules loaded from the same directory. CPU, fp32.

Tolerance: max |ours - ref| <= 1e-4 * max |ref| (relative to the output scale).
"""
import pytest
import torch

import checkpoint as C
import model as M

PROMPTS = ["", "a red star", "a small blue house next to a tall green tree in the style of Van Gogh, " * 3]


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> float:
    """Assert max abs difference <= rel * output scale; return the relative error for the record."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert scale > 1e-3, "reference output is ~0: the test would not see a bug"
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def zi(random_ckpt):
    return C.load_zimage(random_ckpt)


@pytest.fixture(scope="module")
def ref_dit(random_ckpt):
    from diffusers import ZImageTransformer2DModel
    return ZImageTransformer2DModel.from_pretrained(random_ckpt, subfolder="transformer").eval()


def _ref_dit(ref, latents: list[torch.Tensor], t: torch.Tensor,
             caps: list[torch.Tensor]) -> list[torch.Tensor]:
    out = ref([x[:, None] for x in latents], t, caps, return_dict=False)[0]  # diffusers wants (C, F=1, H, W)
    return [o[:, 0] for o in out]


@pytest.mark.parametrize("sizes,cap_lens", [
    ([(6, 10)], [7]),               # 15 image tokens -> padded to 32; 7 caption tokens -> 32; non-square
    ([(8, 8)], [32]),               # exactly 32 + 32: no padding at all
    ([(16, 8)], [40]),              # 32 image tokens, 40 caption tokens -> 64
    ([(6, 10)] * 3, [7, 40, 8]),    # several captions of different lengths in one batch (key-padding mask)
    ([(6, 10), (8, 12), (4, 4)], [9, 3, 33]),  # different resolutions in one batch as well
])
def test_dit_matches_diffusers(zi, ref_dit, sizes, cap_lens):
    """Our DiT equals diffusers' ZImageTransformer2DModel with image/caption padding, batches of mixed
    caption lengths and resolutions, and non-square latents."""
    g = torch.Generator().manual_seed(sum(cap_lens))
    C, D = zi.transformer.cfg.in_channels, zi.transformer.cfg.cap_feat_dim
    latents = [torch.randn(C, h, w, generator=g) for h, w in sizes]
    caps = [torch.randn(n, D, generator=g) for n in cap_lens]
    t = torch.rand(len(sizes), generator=g)
    with torch.no_grad():
        ours = zi.transformer(latents, t, caps)
        ref = _ref_dit(ref_dit, latents, t, caps)
    for o, r in zip(ours, ref):
        close(o, r)


def test_dit_stacked_batch_equals_list_batch(zi):
    """A stacked (B, C, H, W) tensor gives the same result as the list form."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, zi.transformer.cfg.in_channels, 6, 10, generator=g)
    caps = [torch.randn(n, zi.transformer.cfg.cap_feat_dim, generator=g) for n in (5, 9)]
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        a = zi.transformer(x, t, caps)
        b = torch.stack(zi.transformer(list(x), t, caps))
    assert torch.equal(a, b)


def _ref_text(ref_te, tok, prompts):
    """The pipeline's encoding (diffusers ZImagePipeline._encode_prompt): chat template, pad to 512, mask,
    hidden_states[-2], keep the real tokens."""
    text = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=True) for p in prompts]
    inp = tok(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    mask = inp.attention_mask.bool()
    h = ref_te(input_ids=inp.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    items = range(len(prompts))
    return [h[i][mask[i]] for i in items], [inp.input_ids[i][mask[i]].tolist() for i in items]


@pytest.fixture(scope="module")
def ref_text(random_ckpt):
    from transformers import AutoTokenizer, Qwen3Model
    return (Qwen3Model.from_pretrained(random_ckpt / "text_encoder").eval(),
            AutoTokenizer.from_pretrained(random_ckpt / "tokenizer"))


def test_text_features_match_transformers(zi, ref_text):
    """hidden_states[-2] on real tokens equals transformers' Qwen3Model run as the pipeline runs it, for the
    empty prompt and several prompts of different lengths in one batch."""
    ref_te, tok = ref_text
    with torch.no_grad():
        ours = zi.encode_prompts(PROMPTS)
        ref, _ = _ref_text(ref_te, tok, PROMPTS)
    assert [len(o) for o in ours] == [len(r) for r in ref]
    for o, r in zip(ours, ref):
        close(o, r)


def test_tokenizer_ids_match_transformers_including_truncation(zi, ref_text):
    """Our chat-templated token ids equal transformers' (real tokens only), and a prompt longer than the
    512-token budget is cut from the right exactly as the pipeline cuts it."""
    _, tok = ref_text
    long_prompt = "red star blue heart " * 300
    _, ref_ids = _ref_text(ref_text[0], tok, PROMPTS + [long_prompt])
    ours = [zi.tokenizer.encode(p)[0] for p in PROMPTS + [long_prompt]]
    assert ours == ref_ids
    assert len(ours[-1]) == M.MAX_TEXT_TOKENS
    assert len(ours[0]) == 8  # the empty prompt is the 8-token template


def test_tokenizer_spans_point_into_the_prompt(zi):
    """Each token's span locates its text inside the prompt; template tokens have empty spans."""
    prompt = "a red star in the style of Van Gogh"
    ids, spans = zi.tokenizer.encode(prompt)
    pieces = [prompt[a:b] for a, b in spans if b > a]
    assert "".join(pieces) == prompt
    assert spans[:3] == [(0, 0)] * 3 and spans[-5:] == [(0, 0)] * 5


@pytest.fixture(scope="module")
def ref_vae(random_ckpt):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(random_ckpt, subfolder="vae").eval()


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_vae_decode_matches_diffusers(zi, ref_vae, h, w):
    """Decoding latents (square and non-square) equals diffusers' AutoencoderKL.decode."""
    z = torch.randn(2, zi.vae.cfg.latent_channels, h, w, generator=torch.Generator().manual_seed(h * w))
    with torch.no_grad():
        close(zi.vae.decode(z), ref_vae.decode(z).sample)


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_vae_encode_mean_matches_diffusers(zi, ref_vae, h, w):
    """The posterior mean (and clamped log-variance) equal diffusers' AutoencoderKL.encode."""
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w)) * 2 - 1
    with torch.no_grad():
        mean, logvar = zi.vae.encode(x)
        dist = ref_vae.encode(x).latent_dist
    close(mean, dist.mean)
    close(logvar, dist.logvar)


def test_dit_matches_diffusers_when_dim_exceeds_the_adaln_width(tmp_path):
    """With dim > 256 the adaLN width min(dim, 256) differs from dim (as in the real model, 3840 vs 256);
    our loader and forward still match diffusers."""
    from diffusers import ZImageTransformer2DModel
    from tests.checkpoints import make_random_checkpoint
    ckpt = make_random_checkpoint(tmp_path / "wide", seed=2, transformer={
        "dim": 288, "n_heads": 3, "n_kv_heads": 3, "axes_dims": [32, 32, 32], "n_layers": 1,
        "n_refiner_layers": 1})
    ours = C.load_transformer(ckpt / "transformer")
    ref = ZImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer").eval()
    assert ours.t_embedder.mlp[2].weight.shape[0] == 256
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, 6, 4, generator=g), torch.randn(16, 4, 4, generator=g)]
    caps = [torch.randn(n, ours.cfg.cap_feat_dim, generator=g) for n in (11, 3)]
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        for o, r in zip(ours(latents, t, caps), _ref_dit(ref, latents, t, caps)):
            close(o, r)
