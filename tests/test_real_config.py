"""Our modules built from the real Z-Image-Turbo configs have exactly the keys and shapes of the reference
implementations (diffusers / transformers) built from the same configs (checked on the meta device), and the
real widths train and sample on CPU (random weights, reduced depth)."""
import json
import math

import numpy as np
import pytest
import torch

import model as M


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_transformer_has_the_reference_keys_shapes_and_parameter_count():
    """521 tensors, 6,154,908,736 parameters, every key and shape those of diffusers'
    ZImageTransformer2DModel."""
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
    unused = lambda k: k == "norm.weight" or k.startswith(f"layers.{last}.")  # noqa: E731
    used = {k: v for k, v in _shapes(ref).items() if not unused(k)}
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


# ---------------------------------------------------------------------------------------------------
# Training and sampling at the real widths (random weights, 1 + 1 + 1 DiT blocks, 2 Qwen3 layers), on CPU


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    from tests.checkpoints import make_real_config_checkpoint
    return make_real_config_checkpoint(tmp_path_factory.mktemp("real") / "Z-Image-Turbo-depth1")


@pytest.fixture
def needs(request):
    """Skip a bf16 case on CPUs that cannot run bf16 (probed in a subprocess, see conftest.bf16_cpu), and bf16
    training where bf16 matmuls are a slow fallback (conftest.bf16_native_cpu): its backward multiplies
    in the layout the fallback is slowest at."""
    def check(dtype, training=False):
        if dtype == "bfloat16":
            request.getfixturevalue("bf16_native_cpu" if training else "bf16_cpu")
    return check


@pytest.mark.slow
@pytest.mark.parametrize("dtype, mode, checkpointing, sample_dtype", [
    ("float32", "implicit", False, "bfloat16"), ("float32", "exact", True, "float32"),
    ("bfloat16", "implicit", True, "float32"), ("bfloat16", "exact", False, "bfloat16")])
def test_train_and_sample_at_the_real_configuration(real_ckpt, tmp_path, needs, dtype, mode, checkpointing,
                                                    sample_dtype):
    """train.py runs the real model's path (generic preservation prompts, --category, the real widths and
    heads) in fp32 and bf16, implicit and exact, with and without gradient checkpointing; sample.py applies
    the LoRA in either dtype (the base-model fingerprint does not depend on the load dtype)."""
    import lora_file
    import sample
    import train
    needs(dtype, training=True), needs(sample_dtype)
    out = tmp_path / "vg.safetensors"
    argv = ["--model", str(real_ckpt), "--concept", "Van Gogh", "--category", "style", "--resolution", "64",
            "--steps", "2", "--pool", "1", "--variants", "2", "--preserve", "a red car", "--dtype", dtype,
            "--mode", mode, "--out", str(out)] + (["--gradient-checkpointing"] if checkpointing else [])
    train.main(argv)
    recs = [r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()) if "step" in r]
    assert len(recs) == 2 and all(math.isfinite(r[k]) for r in recs for k in ("L_erase", "L_attn", "L_pr"))
    factors, meta = lora_file.read_lora(out)
    settings = json.loads(meta["settings"])
    recorded = (settings["dtype"], settings["mode"], settings["gradient_checkpointing"])
    assert recorded == (dtype, mode, checkpointing)
    assert any(v.abs().sum() > 0 for k, v in factors.items() if k.endswith("lora_B"))
    png = tmp_path / "compare.png"
    sample.main(["--model", str(real_ckpt), "--lora", str(out), "--dtype", sample_dtype, "--height", "64",
                 "--width", "64", "--steps", "1", "--prompt", "a painting in the style of Van Gogh",
                 "--compare", "--out", str(png)])
    from PIL import Image
    img = np.asarray(Image.open(png))  # labelled grid: a base row above an erased row, tiles shown at 256 px
    assert img.shape[2] == 3 and img.shape[0] > 2 * 256 and img.shape[1] >= 256
