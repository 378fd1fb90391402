"""
The concept classifier: a small CNN that reads style, entity and colour off a concept-world image.

It stands in for the CLIP classifier of the Z-Erase paper (arXiv 2603.25074, Sec. 5 and Appendix D.2):
Acc_e / Acc_ir are its accuracies on images generated for prompts that ask for a concept, and the
Fréchet distance between its penultimate features on two image sets stands in for FID.

- Input: images (B, 3, 64, 64) in [-1, 1] (other sizes are resized first).
- Heads: style (the world's STYLES plus "none"), entity, colour.
- Trained on the world's ground truth with augmentations that mimic a tiny generator's imperfections
  (blur, noise, small shifts, down-up resampling, slight colour jitter), so it stays accurate on
  images produced by the tiny diffusion model, not only on clean renders.

    from tiny.classifier import load_classifier, score, frechet_distance
    clf = load_classifier()                       # weights/classifier (safetensors + config.json)
    out = score(images, clf)                      # out["style"], out["entity_probs"], out["features"], ...
    fd = frechet_distance(out_a["features"], out_b["features"])

Train (about 6 minutes on one CPU thread: 1 min rendering, 5 min training):

    python -m tiny.classifier --out weights/classifier --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tiny import world

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "weights" / "classifier"
FORMAT = "zerase-concept-classifier"
FORMAT_VERSION = 1
HEADS = ("style", "entity", "colour")     # the classifier's output heads, in this order

# ---------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...]          # channels of the four stride-2 stages (64 -> 32 -> 16 -> 8 -> 4 px)
    feature_dim: int                 # penultimate features (the Fréchet-distance space)
    image_size: int                  # training resolution; other sizes are resized to it
    styles: tuple[str, ...]          # class names of each head, in index order
    entities: tuple[str, ...]
    colours: tuple[str, ...]

    def classes(self) -> dict[str, tuple[str, ...]]:
        return {"style": self.styles, "entity": self.entities, "colour": self.colours}

    @staticmethod
    def for_world() -> "ClassifierConfig":
        """The shipped architecture, with the current world's concept lists."""
        return ClassifierConfig(widths=(16, 32, 64, 128), feature_dim=128, image_size=world.IMAGE_SIZE,
                                styles=world.STYLE_CLASSES, entities=world.ENTITIES, colours=world.COLOURS)


# ---------------------------------------------------------------------------------------------------
# Network


class ConvBlock(nn.Sequential):
    """3×3 convolution, batch norm, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ConceptClassifier(nn.Module):
    """Four stages of (stride-2 conv, conv); global average pool; a shared hidden layer whose output
    is the feature vector; one linear head per attribute. 314k parameters (1.3 MB in fp32)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for width in config.widths:
            stages += [ConvBlock(c_in, width, stride=2), ConvBlock(width, width, stride=1)]
            c_in = width
        self.trunk = nn.Sequential(*stages)
        self.hidden = nn.Linear(c_in, config.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(classes))
                                    for name, classes in config.classes().items()})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x: (B, 3, S, S) in [-1, 1] -> ({head: logits (B, n_classes)}, features (B, feature_dim))."""
        h = self.trunk(x).mean(dim=(2, 3))                        # (B, C) global average pool
        features = F.relu(self.hidden(h))                         # (B, feature_dim)
        return {name: head(features) for name, head in self.heads.items()}, features


# ---------------------------------------------------------------------------------------------------
# Public API: score, Fréchet distance


@torch.no_grad()
def score(images: torch.Tensor, classifier: ConceptClassifier,
          batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Classify images (B, 3, H, W) in [-1, 1]. Returns, on the CPU:
    "style", "entity", "colour": predicted indices (B,) (style index NO_STYLE = "none");
    "style_probs", "entity_probs", "colour_probs": softmax probabilities (B, n_classes);
    "features": penultimate features (B, feature_dim), for frechet_distance."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    classifier.eval()
    device = next(classifier.parameters()).device
    size = classifier.config.image_size
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, torch.float32).clamp(-1, 1)
        if x.shape[-2:] != (size, size):                          # e.g. a 128×128 sample: box-like downscale
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        logits, features = classifier(x)
        for name in HEADS:
            probs = logits[name].softmax(-1)
            chunks.setdefault(name, []).append(probs.argmax(-1))
            chunks.setdefault(f"{name}_probs", []).append(probs)
        chunks.setdefault("features", []).append(features)
    return {key: torch.cat(parts).cpu() for key, parts in chunks.items()}


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: V diag(sqrt(w)) Vᵀ from its
    eigen-decomposition (tiny negative eigenvalues from round-off are clamped to 0)."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), as in FID:

        FD = |mu_a - mu_b|² + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2))

    tr((C_a C_b)^(1/2)) equals tr((S C_b S)^(1/2)) with S = C_a^(1/2): S C_b S is symmetric PSD, so both
    square roots come from torch.linalg.eigh (no scipy.linalg.sqrtm, no complex round-off). float64."""
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T), torch.cov(b.T)                     # (D, D), unbiased
    s = _sqrtm_psd(c_a)
    tr_sqrt = torch.linalg.eigvalsh(s @ c_b @ s).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + c_a.trace() + c_b.trace() - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------------
# Loading and saving (safetensors + config.json; never pickle)


def load_classifier(path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu") -> ConceptClassifier:
    """Load a trained classifier from a directory holding config.json and model.safetensors. Fails if
    the config is malformed or its class lists differ from the current world's (labels would be wrong)."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}/config.json is not a {FORMAT} v{FORMAT_VERSION} config")
    fields = set(ClassifierConfig.__dataclass_fields__)
    missing = fields - raw.keys()
    if missing:
        raise ValueError(f"{path}/config.json lacks {sorted(missing)}")
    config = ClassifierConfig(**{k: tuple(raw[k]) if isinstance(raw[k], list) else raw[k] for k in fields})
    expected = ClassifierConfig.for_world().classes()
    for head, classes in config.classes().items():
        if classes != expected[head]:
            raise ValueError(f"classifier {head} classes {classes} differ from the world's {expected[head]}")
    with torch.device("meta"):
        model = ConceptClassifier(config)
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)), strict=True, assign=True)
    return model.eval()


def save_classifier(model: ConceptClassifier, path: str | Path, extra: dict | None = None) -> None:
    """Write config.json (+ `extra`, e.g. training settings and accuracies) and model.safetensors,
    each atomically (write to a temporary file, then os.replace)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": FORMAT_VERSION, **asdict(model.config), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors.tmp", metadata={"format": FORMAT})
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    (path / "config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(path / "config.json.tmp", path / "config.json")


# ---------------------------------------------------------------------------------------------------
# Augmentation: what a tiny diffusion model + VAE does to an image, in miniature


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) with its own sigma (B,) (sigma 0: unchanged), separably."""
    b, c, h, w = x.shape
    radius = 3                                                     # covers sigma <= 1.5 (2 sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)      # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)            # horizontal
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)            # vertical
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random generator-like degradations of a batch (B, 3, H, W) in [-1, 1], per sample:
    small shift/scale/rotation (bilinear resampling), down-up resampling, Gaussian blur, brightness/
    contrast/saturation jitter (never hue: the colour label lives in the hue), Gaussian noise."""
    b, _, h, w = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(shape or (b,), generator=gen) * (hi - lo) + lo

    def coin(p: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) < p

    # shift ±4 px, scale ±8%, rotate ±6° (the generator's layout is never pixel-exact)
    angle, scale = u(-6, 6) * math.pi / 180, u(0.92, 1.08)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 1], theta[:, 1, 0] = -torch.sin(angle) / scale, torch.sin(angle) / scale
    theta[:, :, 2] = u(-4, 4, b, 2) * 2 / w
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                      mode="bilinear", padding_mode="reflection", align_corners=False)
    # down-up resampling: detail lost to a lower resolution (like a VAE with 8× downsampling)
    low = int(torch.randint(20, 49, (1,), generator=gen))
    down_up = F.interpolate(F.interpolate(x, size=(low, low), mode="area"), size=(h, w), mode="bilinear",
                            align_corners=False)
    x = torch.where(coin(0.35)[:, None, None, None], down_up, x)
    # Gaussian blur, sigma up to 1.5 px, on half the batch
    x = _gaussian_blur(x, u(0.3, 1.5) * coin(0.5))
    # brightness ±0.1, contrast and saturation ×[0.85, 1.15]
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * u(0.85, 1.15)[:, None, None, None]
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(0.85, 1.15)[:, None, None, None] + u(-0.1, 0.1)[:, None, None, None]
    # Gaussian noise, std up to 0.12 (in [-1, 1] units), on half the batch
    noise_std = u(0.0, 0.12) * coin(0.5)
    x = x + torch.randn(x.shape, generator=gen) * noise_std[:, None, None, None]
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------
# Training


def _labels(data: dict) -> torch.Tensor:
    return torch.from_numpy(np.stack([data[name] for name in HEADS], 1))   # (N, 3): style, entity, colour


@torch.no_grad()
def accuracy(model: ConceptClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head accuracy of the classifier on images (N, 3, H, W) with labels (N, 3)."""
    out = score(images, model)
    return {name: float((out[name] == labels[:, i]).float().mean()) for i, name in enumerate(HEADS)}


def degraded_accuracies(model: ConceptClassifier, images: torch.Tensor, labels: torch.Tensor,
                        seed: int) -> dict[str, dict[str, float]]:
    """Accuracy on clean held-out images and on fixed degradations of them."""
    gen = torch.Generator().manual_seed(seed)
    blurred = _gaussian_blur(images, torch.full((len(images),), 1.0))
    down_up = F.interpolate(F.interpolate(images, size=(24, 24), mode="area"), size=images.shape[-2:],
                            mode="bilinear", align_corners=False)
    variants = {
        "clean": images,
        "blur_sigma1": blurred,
        "noise_0.1": (images + 0.1 * torch.randn(images.shape, generator=gen)).clamp(-1, 1),
        "down_up_24px": down_up,
        "blur1+noise0.1": (blurred + 0.1 * torch.randn(images.shape, generator=gen)).clamp(-1, 1),
        "random_augment": augment(images, gen),
    }
    return {name: accuracy(model, x, labels) for name, x in variants.items()}


def train_epoch(model, opt, sched, images, labels, batch_size: int, gen: torch.Generator) -> float:
    """One pass over the images in a random order, with augmentation; returns the mean loss."""
    model.train()
    steps = len(images) // batch_size
    order = torch.randperm(len(images), generator=gen)
    running = 0.0
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        # the clean image is seen too: a quarter of each batch skips augmentation
        x = images[idx]
        aug = augment(x, gen)
        x = torch.where((torch.rand(len(x), generator=gen) < 0.75)[:, None, None, None], aug, x)
        logits, _ = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[idx, j], label_smoothing=0.05)
                   for j, name in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
    return running / steps


def train(out: Path, seed: int, train_size: int, held_out_size: int, epochs: int, batch_size: int,
          lr: float) -> None:
    """Render the world, train with augmentation, report held-out accuracies, save to `out`."""
    t0 = time.time()
    torch.manual_seed(seed)
    print(f"rendering {train_size} training images (world seed {seed}) ...", flush=True)
    data = world.make_dataset(train_size, seed)
    images, labels = world.to_tensor(data["images"]), _labels(data)
    # held out: a different world seed, so no image (and no layout) is shared with training
    held_seed = seed + 1000
    held = world.make_dataset(held_out_size, held_seed)
    held_images, held_labels = world.to_tensor(held["images"]), _labels(held)
    print(f"  done in {time.time() - t0:.0f} s", flush=True)

    model = ConceptClassifier(ClassifierConfig.for_world())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"classifier: {n_params / 1e3:.0f}k parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = train_size // batch_size
    total = epochs * steps_per_epoch
    # one-cycle schedule: short warm-up, cosine decay to 0 (fast, reliable convergence for small CNNs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        loss = train_epoch(model, opt, sched, images, labels, batch_size, gen)
        acc = accuracy(model, held_images[:500], held_labels[:500])
        print(f"epoch {epoch + 1}/{epochs}  loss {loss:.3f}  held-out (500) "
              + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
              + f"  [{time.time() - t0:.0f} s]", flush=True)

    results = degraded_accuracies(model, held_images, held_labels, seed)
    wall = time.time() - t0
    print(f"held-out accuracy ({held_out_size} images, world seed {held_seed}):")
    for variant, acc in results.items():
        print(f"  {variant:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    extra = {"training": {"world_seed": seed, "train_size": train_size, "epochs": epochs,
                          "batch_size": batch_size, "lr": lr, "threads": torch.get_num_threads(),
                          "wall_time_s": round(wall),
                          "held_out": {"world_seed": held_seed, "size": held_out_size},
                          "held_out_accuracy": {v: {k: round(a, 4) for k, a in acc.items()}
                                                for v, acc in results.items()}}}
    save_classifier(model, out, extra)
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) in {wall:.0f} s total")


def main() -> None:
    p = argparse.ArgumentParser(description="Train the concept-world classifier.")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="world seed of the training images (and torch seed)")
    p.add_argument("--train-size", type=int, default=20000, help="number of training images")
    p.add_argument("--held-out-size", type=int, default=2000, help="held-out images (world seed + 1000)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, args.seed, args.train_size, args.held_out_size, args.epochs, args.batch_size, args.lr)


if __name__ == "__main__":
    main()
