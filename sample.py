"""
Sample images from Z-Image-Turbo (or the embedded tiny Z-Image) with the Turbo flow-matching Euler sampler.

    python sample.py                                   # default prompts on the embedded tiny model
    python sample.py --prompt "a red star in the style of Van Gogh" --seed 1 --out star.png
    python sample.py --model weights/Z-Image-Turbo --prompt "a lighthouse at dusk" --device cuda
    python sample.py --lora loras/van-gogh.safetensors --compare   # labelled grid: base row, erased row
    python sample.py --lora a.safetensors --lora b.safetensors     # two erasures averaged (Eq. 63)

Conventions, stated once (as diffusers' ZImagePipeline; the official Z-Erase release gets the first two
wrong):
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
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import lora_file
import zerase as Z
from checkpoint import FINGERPRINT_TENSORS, Configs, ZImage, load_zimage, read_configs, read_stored
from cli import (HelpFormatter, OutputError, atomic_write, check_output, die, number, parse_device,
                 parse_dtype, stage, text)
from model import MAX_TEXT_TOKENS, CheckpointError, ZImageTransformer, to_uint8

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "zimage-tiny"
TURBO = {"height": 1024, "width": 1024, "steps": 8, "guidance": 0.0}  # the official Turbo settings


def turbo_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float32 sigmas from 1 down to 0 with the static shift
    (FlowMatchEulerDiscreteScheduler)."""
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


def initial_noise(batch: int, channels: int, height: int, width: int, scale_factor: int,
                  seed: int) -> torch.Tensor:
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


def check_size(zi, height: int, width: int) -> None:
    """Refuse a size the DiT cannot patch (never round it silently). `zi` needs only .vae_scale_factor."""
    m = 2 * zi.vae_scale_factor  # one DiT patch = 2x2 latent cells = 2f x 2f pixels
    for flag, v in (("--height", height), ("--width", width)):
        if v < m or v % m:
            raise ValueError(f"{flag} {v}: height and width must be positive multiples of {m} for this model "
                             f"(one DiT patch is {m} pixels); e.g. {flag} {max(m, v // m * m)}.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Z-Image checkpoint directory (HF layout)")
    p.add_argument("--prompt", action="append", help="prompt, at most 512 tokens with the chat template; "
                   "repeat for several (default: the model's own prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for CFG (used when --guidance > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, 0 .. 2^63-1")
    p.add_argument("--height", type=int, help="pixels, a multiple of the model's patch (Turbo 16, the tiny "
                   "model 8); default: the model's native size (Turbo 1024, the tiny model 64)")
    p.add_argument("--width", type=int, help="pixels, as --height; default: the model's native size")
    p.add_argument("--steps", type=int, help="model evaluations; default: the model's own (Turbo: 8)")
    p.add_argument("--guidance", type=float, help="CFG scale g in pos + g*(pos - neg), >= 0; default: the "
                   "model's own (Turbo: 0, off)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="zerase LoRA written by train.py (repeatable); several are averaged (Eq. 63) unless "
                   "each has a weight >= 0")
    p.add_argument("--compare", action="store_true", help="also render the base model: a labelled grid with "
                   "a base row above an erased row, one column per prompt, same seeds")
    p.add_argument("--scale", type=int, help="upscale each image this many times (nearest-neighbour); "
                   "default: 1, and for --compare enough for a tile of at least 256 pixels (x4 at 64 px)")
    p.add_argument("--cols", type=int, default=4, help="columns of the output grid for several prompts")
    p.add_argument("--out", default="samples.png", help="output PNG (one image, or a grid for several)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, help="DiT/text-encoder dtype: float32 (default on CPU) or "
                   "bfloat16 (default elsewhere)")
    return p


def parse_args(argv=None):
    return _parser().parse_args(argv)


def parse_loras(specs: list[str]) -> tuple[list[str], list[float] | None]:
    """["a.safetensors:0.5", "b.safetensors:0.5"] -> files, weights (None: average, w_i = 1/N)."""
    files, weights = [], []
    for spec in specs:
        path, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "")
        try:
            weights.append(float(w) if w else None)
        except ValueError:
            raise ValueError(f"--lora {spec!r}: the weight after ':' must be a number, e.g. "
                             f"file.safetensors:0.5.") from None
        # a NaN/inf weight makes every image black; a negative one adds the concept back instead of erasing
        if w and not (math.isfinite(weights[-1]) and weights[-1] >= 0):
            raise ValueError(f"--lora {spec!r}: the weight must be a finite number >= 0 (got {w}); e.g. "
                             f"file.safetensors:0.5, or no weight to average the files.")
        files.append(path or spec)
    if all(w is None for w in weights):
        return files, None
    if any(w is None for w in weights):
        raise ValueError("give a weight to every --lora or to none (none: they are averaged, Eq. 63).")
    return files, weights


@dataclass
class Job:
    """A sampling run, every flag checked against the model's configs before any weight is loaded."""
    device: torch.device
    dtype: torch.dtype | None
    height: int
    width: int
    steps: int
    guidance: float
    prompts: list[str]
    loras: list[str]
    weights: list[float] | None
    scale: int
    out: Path


def check_flags(args) -> None:
    """The flags that need no model; ValueError naming the flag and the fix."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps}); Turbo uses 8.")
    if args.guidance is not None:
        number("--guidance", args.guidance, low=0)  # 0 turns CFG off
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be between 0 and 2^63-1 (got {args.seed}).")
    if args.cols < 1:
        raise ValueError(f"--cols must be at least 1 (got {args.cols}).")
    if args.scale is not None and not 1 <= args.scale <= 16:
        raise ValueError(f"--scale must be between 1 and 16 (got {args.scale}); 1 keeps the sampled pixels.")
    if args.compare and not args.lora:
        raise ValueError("--compare needs at least one --lora to compare the base model with.")
    for flag, value in [("--out", args.out), ("--negative-prompt", args.negative_prompt),
                        *[("--prompt", p) for p in args.prompt or []], *[("--lora", f) for f in args.lora]]:
        text(flag, value)


def check_prompts(tokenizer, prompts: list[str], negative: str) -> None:
    """Every prompt fits the text encoder: the pipeline would cut a longer one silently."""
    for flag, p in [("--prompt", p) for p in prompts] + [("--negative-prompt", negative)]:
        if (n := tokenizer.n_tokens(p)) > MAX_TEXT_TOKENS:
            raise ValueError(f"{flag} {p[:40]!r}... has {n} tokens with the chat template; the text encoder "
                             f"reads at most {MAX_TEXT_TOKENS} (the rest would be dropped): shorten it.")


def check_loras(files: list[str], weights: list[float] | None, cfgs: Configs) -> None:
    """Each --lora readable, finite, for this base model and compatible with the others: read, and applied
    to a weightless DiT (as sampling will apply them), so a bad file is refused before the model loads."""
    try:
        for f in files:
            factors, _ = lora_file.read_lora(f)
            if not all(torch.isfinite(t).all() for t in factors.values()):
                raise ValueError(f"--lora {f} holds NaN or infinite values (its training diverged); train "
                                 f"it again, e.g. with a lower --lr.")
        with torch.device("meta"):
            dit = ZImageTransformer(cfgs.transformer)
        dit.stored_values = read_stored(cfgs.path / "transformer", FINGERPRINT_TENSORS)
        lora_file.apply_loras(dit, files, weights)
    except lora_file.LoRAFileError as e:  # its messages begin with the file's name
        raise lora_file.LoRAFileError(f"--lora {e}") from None


def check(args) -> Job:
    """One validation pass over every flag, before anything slow; raises ValueError (or CheckpointError)."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    check_flags(args)
    cfgs = read_configs(args.model)
    d = {**TURBO, **cfgs.defaults}  # a checkpoint may store its own sampling defaults (zerase.json)
    height = d["height"] if args.height is None else args.height  # 0 is refused, not the default
    width = d["width"] if args.width is None else args.width
    check_size(SimpleNamespace(vae_scale_factor=cfgs.vae.scale_factor), height, width)
    prompts = args.prompt or d.get("prompts")
    if not prompts:
        raise ValueError("no --prompt given and the model stores no default prompts; pass --prompt TEXT.")
    check_prompts(cfgs.tokenizer, prompts, args.negative_prompt)
    files, weights = parse_loras(args.lora)
    if files:
        check_loras(files, weights, cfgs)
    scale = args.scale or (-(-COMPARE_TILE // min(height, width)) if args.compare else 1)
    out = check_output(args.out, "--out", (".png",))  # last: it creates a missing folder
    return Job(device, dtype, height, width, args.steps or d["steps"],
               d["guidance"] if args.guidance is None else args.guidance, prompts, files, weights, scale, out)


COMPARE_TILE = 256  # --compare's default upscaling shows each tile at least this many pixels high and wide


def upscale(images: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, W, 3) -> (B, kH, kW, 3), each pixel a k x k block (nearest-neighbour: no invented detail)."""
    return images.repeat_interleave(k, 1).repeat_interleave(k, 2) if k > 1 else images


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels (over-long words broken), at most max_lines, the last cut '...'."""
    def fits(s):
        return draw.textlength(s, font=font) <= width

    words = []
    for word in text.split():  # break what cannot fit on a line (file names, long compounds)
        while not fits(word) and len(word) > 1:
            cut = max((i for i in range(1, len(word)) if fits(word[:i])), default=1)
            words, word = words + [word[:cut]], word[cut:]
        words.append(word)
    lines = []
    for word in words:
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def labelled_grid(rows: list[torch.Tensor], row_names: list[str], col_names: list[str]):
    """Rows of (N, H, W, 3) uint8 tiles as one white image: row names on the left, column names (wrapped,
    at most 3 lines) above, tiles a few pixels apart. Returns the image and the (top, left) of each tile,
    tile (r, c) at origins[r][c]. Drawn with PIL's built-in font: no font file needed."""
    from PIL import Image, ImageDraw, ImageFont
    N, H, W, _ = rows[0].shape
    font = ImageFont.load_default(size=max(11, min(H, W) // 20))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, pad, gap = int(font.size * 1.25), font.size // 2, max(2, min(H, W) // 64)
    label_w = min(W, max(int(probe.textlength(n, font=font)) for n in row_names) + 2 * pad)
    heads = [_wrap(probe, c, font, W - 2 * pad, 3) for c in col_names]
    top = max(len(h) for h in heads) * line_h + 2 * pad
    origins = [[(top + r * (H + gap), label_w + c * (W + gap)) for c in range(N)] for r in range(len(rows))]
    canvas = np.full((top + len(rows) * (H + gap), label_w + N * (W + gap), 3), 255, np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles.numpy()):
            y, x = origins[r][c]
            canvas[y:y + H, x:x + W] = tile
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for c, lines in enumerate(heads):
        for i, line in enumerate(lines):
            draw.text((origins[0][c][1] + pad, pad + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, name in enumerate(row_names):
        lines = _wrap(draw, name, font, label_w - 2 * pad, max(1, H // line_h))
        y0 = origins[r][0][0] + (H - len(lines) * line_h) // 2
        for i, line in enumerate(lines):
            draw.text((pad, y0 + i * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(img), origins


def lora_label(files: list[str], weights: list[float] | None) -> str:
    """"erased (van-gogh)", or "erased (van-gogh 0.5 + monet 0.5)" with weights."""
    names = [Path(f).stem for f in files]
    if weights is not None:
        names = [f"{n} {w:g}" for n, w in zip(names, weights)]
    return f"erased ({' + '.join(names)})"


def render(zi: ZImage, job: Job, args) -> np.ndarray:
    """The output image: one image, a grid of several, or the labelled base/erased comparison."""
    def draw():
        return generate(zi, job.prompts, args.seed, job.height, job.width, job.steps, job.guidance,
                        args.negative_prompt, cond)

    with stage(f"sampling {len(job.prompts)} image(s) at {job.height}x{job.width}, {job.steps} steps"):
        cond = zi.encode_prompts(job.prompts)
        images = draw()
    if args.compare:
        with stage("sampling the base model with the same seeds"), Z.lora_disabled(zi.transformer):
            base = draw()
        rows = [upscale(base, job.scale), upscale(images, job.scale)]
        return labelled_grid(rows, ["base", lora_label(job.loras, job.weights)], job.prompts)[0]
    images = upscale(images, job.scale)
    return images[0].numpy() if len(images) == 1 else grid(images, min(args.cols, len(images)))


@contextmanager
def interruptible(out: str):
    """Ctrl-C: one line and exit 130 instead of a traceback (nothing is written before the image is done)."""
    try:
        yield
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the stage line it interrupted
        die(f"interrupted; {out} was not written.", code=130)


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        job = check(args)
        with interruptible(args.out):
            zi = load_zimage(args.model, job.device, job.dtype)
            if job.loras:
                lora_file.apply_loras(zi.transformer, job.loras, job.weights)
    except (CheckpointError, ValueError) as e:  # LoRAFileError is a ValueError
        die(str(e))
    try:
        with interruptible(args.out):
            save_png(render(zi, job, args), job.out)
    except OutputError as e:
        die(str(e), code=1)
    print(f"wrote {job.out} ({len(job.prompts)} image(s), {job.height}x{job.width}, {job.steps} steps, "
          f"seed {args.seed})")
    return job.out


if __name__ == "__main__":
    main()
