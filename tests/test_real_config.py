"""Our modules built from the real Z-Image-Turbo configs have exactly the keys and shapes of the reference
implementations (diffusers / transformers) built from the same configs — checked on the meta device."""
import torch

import model as M


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_transformer_has_the_reference_keys_shapes_and_parameter_count():
    """521 tensors, 6,154,908,736 parameters, and every key/shape equal to diffusers' ZImageTransformer2DModel."""
    from diffusers import ZImageTransformer2DModel
    raw = {k: v for k, v in M.ZIMAGE_TURBO["transformer"].items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = M.ZImageTransformer(M.DiTConfig.from_dict(raw))
        ref = ZImageTransformer2DModel(**raw)
    assert _shapes(ours) == _shapes(ref)
    assert len(_shapes(ours)) == 521
    assert sum(p.numel() for p in ours.parameters()) == 6_154_908_736


def test_real_text_encoder_has_the_reference_keys_of_the_layers_we_use():
    """Qwen3-4B: our encoder equals transformers' Qwen3Model minus the last decoder layer and the final norm,
    which never influence hidden_states[-2]."""
    from transformers import Qwen3Config, Qwen3Model
    raw = M.ZIMAGE_TURBO["text_encoder"]
    with torch.device("meta"):
        ours = M.Qwen3TextEncoder(M.TextEncoderConfig.from_dict(raw))
        ref = Qwen3Model(Qwen3Config(**{k: v for k, v in raw.items() if k != "architectures"}))
    last = raw["num_hidden_layers"] - 1
    used = {k: v for k, v in _shapes(ref).items() if k != "norm.weight" and not k.startswith(f"layers.{last}.")}
    assert _shapes(ours) == used
    all_params = sum(v.numel() for v in ref.parameters())
    assert all_params == 4_022_468_096  # Qwen3-4B's parameters without lm_head


def test_real_vae_has_the_reference_keys_shapes_and_parameter_count():
    """The FLUX.1 VAE: 244 tensors, 83,819,683 parameters, keys/shapes equal to diffusers' AutoencoderKL."""
    from diffusers import AutoencoderKL
    raw = {k: v for k, v in M.ZIMAGE_TURBO["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = M.AutoencoderKL(M.VAEConfig.from_dict(raw))
        ref = AutoencoderKL(**raw)
    assert _shapes(ours) == _shapes(ref)
    assert len(_shapes(ours)) == 244
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683
