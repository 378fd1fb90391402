"""The embedded default model, weights/zimage-tiny: real layout, loaded by the same loader, sampled by the
same sampler, equal to what diffusers' pipeline makes of it, and small enough to ship."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import checkpoint as C
import sample
from tests.conftest import outputs_under_hash_seeds

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "zimage-tiny"


def test_tiny_model_has_the_real_layout_and_loads_through_the_loader():
    """model_index.json and the five component folders, sharded transformer and text encoder with index
    files, model.-prefixed text-encoder keys; load_zimage builds all of it with a strict key match."""
    for f in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
              "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
              "text_encoder/config.json", "text_encoder/model.safetensors.index.json", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors"]:
        assert (TINY / f).is_file(), f
    index = json.loads((TINY / "text_encoder" / "model.safetensors.index.json").read_text())
    assert all(k.startswith("model.") for k in index["weight_map"])
    assert len(set(index["weight_map"].values())) >= 2
    zi = C.load_zimage(TINY)
    assert zi.transformer.cfg.n_refiner_layers == 2 and zi.vae_scale_factor == 4
    assert zi.defaults["height"] == 64 and zi.defaults["steps"] == 8  # stored with the model


def test_everything_under_weights_totals_at_most_40_mb():
    """The repository ships its models: weights/ must stay small."""
    total = sum(p.stat().st_size for p in (ROOT / "weights").rglob("*") if p.is_file())
    assert total <= 40 * 2**20, total


def test_sample_py_without_arguments_writes_the_default_grid(tmp_path):
    """`python sample.py` with no arguments renders the tiny model's default prompts as one grid."""
    r = subprocess.run([sys.executable, str(ROOT / "sample.py")], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(tmp_path / "samples.png"))
    n = len(C.load_zimage(TINY, text_encoder=False, vae=False).defaults["prompts"])
    assert img.shape == (64 * ((n + 3) // 4), 64 * 4, 3)
    assert img.std() > 20  # not a blank or flat image


def test_tiny_model_gives_the_same_image_as_the_diffusers_pipeline(tmp_path):
    """The shipped checkpoint is a genuine Z-Image checkpoint: diffusers' ZImagePipeline loads it and draws
    the same image as sample.py for the same seed (every pixel within 2/255)."""
    from tests.checkpoints import load_diffusers_pipeline
    prompt = "a red star in the style of Van Gogh"
    out = tmp_path / "x.png"
    sample.main(["--prompt", prompt, "--seed", "3", "--guidance", "0", "--out", str(out)])
    pipe = load_diffusers_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompt, height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]
    diff = np.abs(np.asarray(Image.open(out)).astype(int) - np.asarray(ref).astype(int))
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def test_the_stored_defaults_are_the_same_in_every_process_and_match_the_committed_ones():
    """tiny/pretrain.model_defaults (what zerase.json stores) does not depend on Python's string-hash seed,
    and gives the committed file but for the preservation prompts drawn after each Table 7 prompt, which the
    committed file holds from before the draw order was fixed (model_defaults' docstring)."""
    root = Path(C.__file__).parent
    code = "import json; from tiny import pretrain; print(json.dumps(pretrain.model_defaults()))"
    out = outputs_under_hash_seeds(code)
    assert len(out) == 1
    made = json.loads(out.pop())
    stored = json.loads((root / "weights" / "zimage-tiny" / "zerase.json").read_text())
    assert {k: v for k, v in made.items() if k != "preserve"} == {k: v for k, v in stored.items()
                                                                   if k != "preserve"}
    for category, prompts in made["preserve"].items():
        kept = stored["preserve"][category]
        assert len(kept) == len(prompts) and kept[::5] == prompts[::5]  # the Table 7 prompt of each concept
