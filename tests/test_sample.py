"""End-to-end: `python sample.py` writes the same PNG as diffusers' ZImagePipeline on the same random
checkpoint, same prompt and seed (every pixel within 2/255, mean within 0.5/255); and the sampler's schedule
and conventions match the spec."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample

ROOT = Path(__file__).resolve().parents[1]


def diffusers_image(ckpt, prompt, seed, h, w, guidance=0.0, negative=None) -> np.ndarray:
    from tests.checkpoints import load_diffusers_pipeline
    pipe = load_diffusers_pipeline(ckpt)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=negative) if negative is not None else {}
    img = pipe(prompt=prompt, height=h, width=w, num_inference_steps=8, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kw).images[0]
    return np.asarray(img).astype(np.int16)


def assert_same_image(ours: np.ndarray, ref: np.ndarray):
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref)
    assert ref.std() > 5, "reference image is flat: the comparison would not see a bug"
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def run_cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, capture_output=True,
                          text=True)


def test_cli_writes_the_same_png_as_diffusers(random_ckpt, tmp_path):
    """sample.py run from the command line (a subprocess) reproduces ZImagePipeline's image (guidance 0)."""
    out = tmp_path / "x.png"
    r = run_cli(["--model", str(random_ckpt), "--prompt", "a red star", "--seed", "7", "--height", "64",
                 "--width", "96", "--steps", "8", "--guidance", "0", "--device", "cpu", "--dtype", "float32",
                 "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_image(np.asarray(Image.open(out)), diffusers_image(random_ckpt, "a red star", 7, 64, 96))


def test_cfg_with_negative_prompt_matches_diffusers(random_ckpt, tmp_path):
    """With CFG on (guidance 4, a negative prompt) the image still equals the pipeline's."""
    out = tmp_path / "cfg.png"
    sample.main(["--model", str(random_ckpt), "--prompt", "a blue heart in the style of Monet", "--seed", "3",
                 "--height", "48", "--width", "48", "--steps", "8", "--guidance", "4",
                 "--negative-prompt", "blurry", "--out", str(out)])
    ref = diffusers_image(random_ckpt, "a blue heart in the style of Monet", 3, 48, 48, 4.0, "blurry")
    assert_same_image(np.asarray(Image.open(out)), ref)


def test_bf16_text_encoder_with_top_level_rope_theta_matches_diffusers(random_ckpt_bf16_te, tmp_path):
    """A text encoder stored as the real repo stores it (bf16, rope_theta at top level) loads and gives the
    pipeline's image."""
    out = tmp_path / "bf16.png"
    sample.main(["--model", str(random_ckpt_bf16_te), "--prompt", "", "--seed", "11", "--height", "32",
                 "--width", "64", "--out", str(out), "--steps", "8", "--guidance", "0"])
    assert_same_image(np.asarray(Image.open(out)), diffusers_image(random_ckpt_bf16_te, "", 11, 32, 64))


def test_several_prompts_make_a_grid_whose_tiles_match_single_runs(random_ckpt, tmp_path):
    """Several prompts in one run give a grid; each tile equals diffusers' batch image for that prompt."""
    out = tmp_path / "grid.png"
    prompts = ["a red star", "a green tree", ""]
    sample.main(["--model", str(random_ckpt), *sum((["--prompt", p] for p in prompts), []), "--seed", "5",
                 "--height", "32", "--width", "32", "--cols", "3", "--steps", "8", "--guidance", "0",
                 "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (32, 96, 3)
    from tests.checkpoints import load_diffusers_pipeline
    pipe = load_diffusers_pipeline(random_ckpt)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompts, height=32, width=32, num_inference_steps=8, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(5), output_type="pil").images
    for i, img in enumerate(ref):
        assert_same_image(grid[:, 32 * i:32 * (i + 1)], np.asarray(img).astype(np.int16))


def test_turbo_sigmas_are_the_spec_table():
    """8 steps with shift 3 give the σ table of the spec (and diffusers' scheduler)."""
    s = sample.turbo_sigmas(8, 3.0)
    want = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]
    assert torch.allclose(s, torch.tensor(want), atol=1e-6)
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist())
    assert torch.equal(s, sch.sigmas.float())


def test_denoise_calls_the_model_with_t_equal_one_minus_sigma_and_negates_its_output():
    """With a fake DiT returning a constant v, the loop passes t = 1 - σ and moves x by Σ(σ_i - σ_{i+1})·v."""
    seen = []

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, caps):
            seen.append(t.clone())
            return torch.ones_like(x)

    sig = sample.turbo_sigmas(8, 3.0)
    x = sample.denoise(Fake(), torch.zeros(1, 4, 2, 2), [torch.zeros(1, 8)], sig)
    assert torch.allclose(torch.stack(seen)[:, 0], 1 - sig[:-1])
    assert torch.allclose(x, torch.ones_like(x))  # σ goes 1 -> 0, so x moves by +1·v in total


# --- bad input: one sentence, exit code != 0, no traceback, no output file --------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _bad_dirs(random_ckpt: Path, tmp: Path):
    import torch as T
    from tests.checkpoints import make_random_checkpoint
    missing_file = _copy(random_ckpt, tmp / "missing_file")
    (missing_file / "vae" / "config.json").unlink()
    other = _copy(random_ckpt, tmp / "other_arch")  # a transformer config whose weights do not fit it
    import shutil
    shutil.rmtree(other / "transformer")
    alt = make_random_checkpoint(tmp / "alt", seed=1, transformer={"n_layers": 3})
    shutil.copytree(alt / "transformer", other / "transformer")
    shutil.copy(random_ckpt / "transformer" / "config.json", other / "transformer" / "config.json")
    pickled = _copy(random_ckpt, tmp / "pickled")
    st = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    T.save({"x": T.zeros(1)}, pickled / "vae" / "diffusion_pytorch_model.bin")
    st.unlink()
    return {"missing dir": tmp / "nope", "missing file": missing_file, "other architecture": other,
            "pickle": pickled}


@pytest.fixture(scope="module")
def bad_dirs(random_ckpt, tmp_path_factory):
    return _bad_dirs(random_ckpt, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case,extra,needle", [
    ("missing dir", [], "not a directory"),
    ("missing file", [], "config.json is missing"),
    ("other architecture", [], "does not match"),
    ("pickle", [], "pickle"),
    (None, ["--height", "40"], "multiples of 16"),
    (None, ["--steps", "0"], "--steps must be at least 1"),
    (None, ["--dtype", "float8"], "unknown dtype"),
    (None, ["--device", "tpu"], "device"),
    (None, ["--device", "cuda:0"], "device"),
])
def test_bad_input_ends_in_one_sentence_without_output(random_ckpt, bad_dirs, tmp_path, case, extra, needle):
    """Each bad input exits non-zero with one 'error: ...' line naming the problem, no traceback, no file."""
    if needle == "device" and extra[-1] == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = bad_dirs[case] if case else random_ckpt
    out = tmp_path / "never.png"
    r = run_cli(["--model", str(model), "--prompt", "x", "--height", "32", "--width", "32", *extra,
                 "--out", str(out)])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
