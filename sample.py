"""
Sample images from Z-Image-Turbo (or the embedded tiny Z-Image) with the Turbo flow-matching Euler sampler.

    python sample.py                                   # default prompts on the embedded tiny model
    python sample.py --prompt "a red star in the style of Van Gogh" --seed 1 --out star.png
    python sample.py --model weights/Z-Image-Turbo --prompt "a lighthouse at dusk" --device cuda
    python sample.py --lora loras/van-gogh.safetensors --compare     # base (top) vs erased (bottom), same seeds
    python sample.py --lora a.safetensors --lora b.safetensors       # two erasures averaged (Eq. 63)

Conventions, stated once (as diffusers' ZImagePipeline; the official Z-Erase release gets the first two wrong):
  - sigma runs 1 -> 0 on the schedule sigma_i = shift*s / (1 + (shift-1)*s), s = linspace(1, 1/N, N), then 0;
  - the DiT is called with t = 1 - sigma and predicts v ~ x0 - noise, so the Euler step is
    x <- x + (sigma_next - sigma) * (-v): the model output is NEGATED;
  - latents stay fp32; the DiT sees them in its own dtype; the VAE decodes in fp32;
  - CFG (off at guidance 0, the Turbo default) is pred = pos + g * (pos - neg), as the official pipeline;
  - noise is drawn from torch.Generator("cpu").manual_seed(seed) with shape (B, C, 2*(H//2f), 2*(W//2f)),
    exactly as diffusers' ZImagePipeline draws it, so the same seed gives the same image.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import lora_file
import zerase as Z
from checkpoint import ZImage, load_zimage
from cli import atomic_write, die, parse_device, parse_dtype
from model import CheckpointError, to_uint8

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "zimage-tiny"
TURBO = {"height": 1024, "width": 1024, "steps": 8, "guidance": 0.0}  # the official Turbo settings


def turbo_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float32 sigmas from 1 down to 0 with the static shift (FlowMatchEulerDiscreteScheduler)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32)
    sigma = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigma, torch.zeros(1)])


@torch.no_grad()
def denoise(dit, noise: torch.Tensor, cond: list[torch.Tensor], sigmas: torch.Tensor,
            uncond: list[torch.Tensor] | None = None, guidance: float = 0.0, record: list | None = None):
    """The Turbo sampler as one explicit Euler loop; returns fp32 latents (B, C, h, w). `record`, if given,
    receives each step's model outputs (v(x, cond), v(x, uncond) or None without CFG)."""
    x = noise.float()
    cfg = uncond is not None and guidance > 0
    dtype = next(dit.parameters()).dtype
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        xin, caps = (torch.cat([x, x]), cond + uncond) if cfg else (x, cond)
        t = torch.full((len(xin),), 1.0 - sigma, device=x.device)  # the DiT's time: t = 1 - sigma
        v = dit(xin.to(dtype), t, caps).float()
        pos, neg = v.chunk(2) if cfg else (v, None)
        if record is not None:
            record.append((pos, neg))
        if cfg:
            v = pos + guidance * (pos - neg)
        x = x + (sigma_next - sigma) * (-v)  # Euler step on dx/dsigma = -v
    return x


def initial_noise(batch: int, channels: int, height: int, width: int, scale_factor: int, seed: int) -> torch.Tensor:
    """Seeded fp32 noise drawn on the CPU, as diffusers' ZImagePipeline draws it."""
    shape = (batch, channels, 2 * (height // (2 * scale_factor)), 2 * (width // (2 * scale_factor)))
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def generate(zi: ZImage, prompts: list[str], seed: int, height: int, width: int, steps: int,
             guidance: float = 0.0, negative_prompt: str = "", cond=None) -> torch.Tensor:
    """Prompts -> (B, H, W, 3) uint8 images. `cond` may carry already-encoded prompt features."""
    cond = cond if cond is not None else zi.encode_prompts(prompts)
    uncond = zi.encode_prompts([negative_prompt] * len(prompts)) if guidance > 0 else None
    noise = initial_noise(len(prompts), zi.transformer.cfg.in_channels, height, width,
                          zi.vae_scale_factor, seed).to(zi.device)
    latents = denoise(zi.transformer, noise, cond, turbo_sigmas(steps, zi.scheduler.shift), uncond, guidance)
    with torch.no_grad():
        return to_uint8(zi.vae.latents_to_image(latents))


def grid(images: torch.Tensor, cols: int) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one image with `cols` columns, filled row by row (white where empty)."""
    B, H, W, _ = images.shape
    rows = (B + cols - 1) // cols
    out = np.full((rows * H, cols * W, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        out[r * H:(r + 1) * H, c * W:(c + 1) * W] = img
    return out


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def check_size(zi: ZImage, height: int, width: int) -> None:
    m = 2 * zi.vae_scale_factor  # one DiT patch = 2x2 latent cells = 2f x 2f pixels
    if height < m or width < m or height % m or width % m:
        raise ValueError(f"height and width must be positive multiples of {m} for this model "
                         f"(got {height}x{width}); pick e.g. {max(m, height // m * m)}x{max(m, width // m * m)}.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Z-Image checkpoint directory (HF layout)")
    p.add_argument("--prompt", action="append", help="prompt; repeat for several (default: the model's own)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for CFG (used when --guidance > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, help="pixels (default: the model's native size; Turbo 1024)")
    p.add_argument("--width", type=int, help="pixels (default: the model's native size; Turbo 1024)")
    p.add_argument("--steps", type=int, help="model evaluations (Turbo: 8)")
    p.add_argument("--guidance", type=float, help="CFG scale g in pos + g*(pos - neg); Turbo: 0 (off)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="zerase LoRA (repeatable); several are averaged (Eq. 63) unless weights are given")
    p.add_argument("--compare", action="store_true", help="also render the base model: base row, erased row")
    p.add_argument("--cols", type=int, default=4, help="columns of the output grid for several prompts")
    p.add_argument("--out", default="samples.png", help="output PNG (one image, or a grid for several)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=None, help="DiT/text-encoder dtype: float32 (CPU default) or bfloat16")
    return p.parse_args(argv)


def parse_loras(specs: list[str]) -> tuple[list[str], list[float] | None]:
    """["a.safetensors:0.5", "b.safetensors:0.5"] -> files, weights (None: average, w_i = 1/N)."""
    files, weights = [], []
    for spec in specs:
        path, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "")
        try:
            weights.append(float(w) if w else None)
        except ValueError:
            raise ValueError(f"--lora {spec!r}: the weight after ':' must be a number, e.g. file.safetensors:0.5.")
        files.append(path or spec)
    if all(w is None for w in weights):
        return files, None
    if any(w is None for w in weights):
        raise ValueError("give a weight to every --lora or to none (none: they are averaged, Eq. 63).")
    return files, weights


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        device = parse_device(args.device)
        dtype = parse_dtype(args.dtype) if args.dtype else None
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1 (got {args.steps}); Turbo uses 8.")
        if args.guidance is not None and args.guidance < 0:
            raise ValueError(f"--guidance must be >= 0 (got {args.guidance}); 0 turns CFG off.")
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out must name a .png file (got {args.out!r}).")
        zi = load_zimage(args.model, device, dtype)
        d = {**TURBO, **zi.defaults}  # a checkpoint may store its own sampling defaults (zerase.json)
        height, width = args.height or d["height"], args.width or d["width"]
        steps = args.steps or d["steps"]
        guidance = d["guidance"] if args.guidance is None else args.guidance
        check_size(zi, height, width)
        prompts = args.prompt or d.get("prompts")
        if not prompts:
            raise ValueError("no --prompt given and the model stores no default prompts; pass --prompt TEXT.")
        if args.compare and not args.lora:
            raise ValueError("--compare needs at least one --lora to compare the base model with.")
        files, weights = parse_loras(args.lora)
        if files:
            lora_file.apply_loras(zi.transformer, files, weights)
    except (CheckpointError, ValueError) as e:  # LoRAFileError is a ValueError
        die(str(e))
    cond = zi.encode_prompts(prompts)
    images = generate(zi, prompts, args.seed, height, width, steps, guidance, args.negative_prompt, cond)
    cols = min(args.cols, len(images))
    if args.compare:
        with Z.lora_disabled(zi.transformer):
            base = generate(zi, prompts, args.seed, height, width, steps, guidance, args.negative_prompt, cond)
        images, cols = torch.cat([base, images]), len(prompts)  # row 1: base, row 2: erased
    out = images[0].numpy() if len(images) == 1 else grid(images, cols)
    save_png(out, args.out)
    print(f"wrote {args.out} ({len(prompts)} image(s), {height}x{width}, {steps} steps, seed {args.seed})")
    return Path(args.out)


if __name__ == "__main__":
    main()
