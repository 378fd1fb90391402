"""
The concept world: procedurally rendered 64×64 images with captions and ground-truth labels.

The tiny Z-Image model (`weights/zimage-tiny`) is pretrained on this world, and erasure is scored on it:
because every image is drawn from known concepts, a small classifier (`tiny/classifier.py`) can tell
whether an erased concept still appears. The three categories mirror Table 3 of the Z-Erase paper
(arXiv 2603.25074): Artistic Style, Entity and Abstraction (here: colour).

- STYLES: ten styles named after artists, each a procedural rendering whose structures are 3–8 px wide,
  so they survive the blur of a small VAE: "Van Gogh" (swirling strokes), "Monet" (soft pastel dabs),
  "Picasso" (cubist shards), "Mondrian" (black grid, primary blocks), ... An image may have no style
  (a plain, light background): class NO_STYLE of the classifier, "plain" in captions.
- ENTITIES: ten large, roughly centred silhouettes (circle, square, star, heart, house, tree, ...).
- COLOURS: the entity's fill colour. Styles texture the entity by lightening/darkening it only, which
  keeps its hue, so the colour stays identifiable inside every style.

Captions come from templates (the paper's Table 7 ones among them), name some or all of the attributes
the image shows, use aliases and occasional misspellings, and are empty ~10% of the time (the
unconditional case). TRAIN_TEMPLATES are for pretraining; EVAL_TEMPLATES and ROBUST_TEMPLATES are
held-out phrasings for evaluation.

Everything is deterministic: sample(index, seed) draws from a numpy Generator seeded by (seed, index),
so a sample does not depend on which other samples were drawn or in which order.

    from tiny import world
    image, caption, labels = world.sample(0, seed=0)       # uint8 (64, 64, 3), str, Labels
    data = world.make_dataset(1000, seed=0)                # arrays for training
    x = world.to_tensor(data["images"])                    # float (1000, 3, 64, 64) in [-1, 1]
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------
# Constants

IMAGE_SIZE = 64           # images are IMAGE_SIZE × IMAGE_SIZE RGB
SUPERSAMPLE = 4           # entity silhouettes are drawn at 4× resolution and box-downsampled (anti-aliasing)
STROKE_SUPERSAMPLE = 2    # background strokes (drips, lines, rings): 2× is smooth enough and twice as fast
NO_STYLE_RATE = 0.25      # share of images with a plain background (no artistic style)
EMPTY_CAPTION_RATE = 0.10  # share of empty captions: teaches the unconditional velocity v(x_t, ∅)
LOWERCASE_RATE = 0.10     # share of training captions written all lower-case (casing robustness)

# How a concept is spelled in a training caption: mostly its canonical name, sometimes an alias,
# occasionally a misspelling (so the model has seen that "Monett" still means Monet).
CANONICAL_RATE, ALIAS_RATE = 0.70, 0.22   # misspelling: the remaining 0.08

# ---------------------------------------------------------------------------------------------------
# Concepts (index order is fixed: the classifier's heads and saved labels depend on it)

STYLES: tuple[str, ...] = ("Van Gogh", "Monet", "Picasso", "Mondrian", "Seurat",
                           "Hokusai", "Klimt", "Pollock", "Kandinsky", "Warhol")
ENTITIES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart",
                             "house", "tree", "moon", "cross", "arrow")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")

NO_STYLE = len(STYLES)                        # style label of an image with a plain background
STYLE_CLASSES: tuple[str, ...] = STYLES + ("none",)   # the classifier's style head (11 classes)
CATEGORIES: tuple[str, ...] = ("style", "entity", "colour")
CONCEPTS: dict[str, tuple[str, ...]] = {"style": STYLES, "entity": ENTITIES, "colour": COLOURS}

# Words that name the "none" style in captions ("a red star on a plain background").
PLAIN_WORDS: tuple[str, ...] = ("plain", "simple", "flat", "clean")

# Fill colours (sRGB 0–255). HSV hues 0, 29, 52, 125, 185, 229, 275, 318°: at least 23° apart (orange and
# yellow, which also differ in lightness); "pink" is a light magenta, so it is not a pale red.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30), "orange": (245, 125, 15), "yellow": (245, 215, 25),
    "green": (35, 165, 45), "cyan": (25, 200, 215), "blue": (30, 65, 225),
    "purple": (125, 35, 190), "pink": (245, 95, 200),
}


@dataclass(frozen=True)
class Names:
    """Surface forms of one concept. Training captions use `canonical`, `aliases` and `misspellings`;
    `held_out` spellings never appear in training and serve robustness evaluation only."""
    canonical: str
    aliases: tuple[str, ...]
    misspellings: tuple[str, ...]
    held_out: tuple[str, ...]

    def train_forms(self) -> tuple[str, ...]:
        return (self.canonical,) + self.aliases + self.misspellings

    def all_forms(self) -> tuple[str, ...]:
        return self.train_forms() + self.held_out


NAMES: dict[str, Names] = {n.canonical: n for n in [
    # styles
    Names("Van Gogh", ("Vincent van Gogh", "van Gogh", "Vincent Van Gogh"),
          ("van Gough", "VanGogh", "Van Gog"), ("Van Goh", "Van-Gogh", "V. van Gogh")),
    Names("Monet", ("Claude Monet", "monet"), ("Monett", "Monnet"), ("Monnett", "C. Monet", "Claud Monet")),
    Names("Picasso", ("Pablo Picasso", "picasso"), ("Picaso", "Piccaso"),
          ("Picassso", "P. Picasso", "Pablo Picaso")),
    Names("Mondrian", ("Piet Mondrian", "Mondriaan"), ("Mondrain", "Mondriann"),
          ("Mondrien", "P. Mondrian", "Piet Mondriaan")),
    Names("Seurat", ("Georges Seurat", "seurat"), ("Seurrat", "Seaurat"),
          ("Suerat", "G. Seurat", "Georges Seurrat")),
    Names("Hokusai", ("Katsushika Hokusai", "hokusai"), ("Hokusia", "Hokkusai"),
          ("Hokosai", "K. Hokusai", "Katsushika Hokusia")),
    Names("Klimt", ("Gustav Klimt", "klimt"), ("Klimpt", "Klimmt"), ("Klmit", "G. Klimt", "Gustav Klimpt")),
    Names("Pollock", ("Jackson Pollock", "pollock"), ("Polock", "Pollok"),
          ("Polloc", "J. Pollock", "Jackson Pollack")),
    Names("Kandinsky", ("Wassily Kandinsky", "kandinsky"), ("Kandinski", "Kandinksy"),
          ("Kandinskiy", "W. Kandinsky", "Vasily Kandinsky")),
    Names("Warhol", ("Andy Warhol", "warhol"), ("Warhole", "Worhol"),
          ("Warholl", "A. Warhol", "Andy Worhol")),
    # entities
    Names("circle", ("disc", "round disk"), ("cirle", "circel"), ("cicle", "circular disc")),
    Names("square", ("box shape", "block"), ("sqaure", "squre"), ("squar", "quadrate")),
    Names("triangle", ("pyramid shape", "three-sided shape"), ("traingle", "triangel"),
          ("triangl", "trigon")),
    Names("star", ("five-pointed star", "starshape"), ("starr", "sstar"), ("stra", "pentagram star")),
    Names("heart", ("love heart", "heart shape"), ("hert", "haert"), ("heartt", "valentine heart")),
    Names("house", ("home", "cottage"), ("hous", "huose"), ("houze", "little hut")),
    Names("tree", ("oak", "leafy tree"), ("trea", "trree"), ("treee", "bushy oak")),
    Names("moon", ("crescent moon", "crescent"), ("mooon", "moom"), ("moone", "lunar crescent")),
    Names("cross", ("plus sign", "plus"), ("croos", "corss"), ("crosss", "plus symbol")),
    Names("arrow", ("pointer arrow", "right arrow"), ("arow", "arrrow"), ("arrw", "direction arrow")),
    # colours
    Names("red", ("crimson", "scarlet"), ("redd", "rde"), ("rred", "cherry red")),
    Names("orange", ("tangerine", "amber orange"), ("ornage", "orang"), ("oragne", "pumpkin orange")),
    Names("yellow", ("lemon", "canary yellow"), ("yelow", "yellw"), ("yello", "sunflower yellow")),
    Names("green", ("emerald", "grass green"), ("gren", "grean"), ("greeen", "leaf green")),
    Names("cyan", ("turquoise", "aqua"), ("cyann", "cian"), ("cyaan", "teal")),
    Names("blue", ("cobalt", "royal blue"), ("bleu", "blu"), ("bluue", "sapphire")),
    Names("purple", ("violet", "lilac purple"), ("purpel", "purpl"), ("pruple", "plum")),
    Names("pink", ("magenta", "hot pink"), ("pinc", "pinck"), ("pnik", "fuchsia")),
]}

# ---------------------------------------------------------------------------------------------------
# Caption templates. Slots: {entity}, {colour}, {style} (an artist's name), {plain} (a word from
# PLAIN_WORDS: only for images without a style). A template names exactly the attributes whose slots it
# has; the paper's Table 7 templates are the first three of TRAIN_TEMPLATES.

TRAIN_TEMPLATES: tuple[str, ...] = (
    # Table 7 of the paper (one category each)
    "A photo of {entity}", "An art in the style of {style}", "A close scene of {colour}",
    # entity + colour + style, varied word order
    "a {colour} {entity} in the style of {style}", "{style} style painting of a {colour} {entity}",
    "{entity}, {colour}, {style}", "a painting of a {colour} {entity} by {style}",
    "{colour} {entity}, {style}",
    "an art in the style of {style} showing a {colour} {entity}", "{style}'s {colour} {entity}",
    "a {colour} {entity}, painted in the manner of {style}", "{style}: a {entity} in {colour}",
    "a {entity} coloured {colour} in {style} style", "{style}, {entity}, {colour}",
    # two attributes
    "a {entity} in the style of {style}", "{style} painting of a {entity}", "{entity} by {style}",
    "a {entity}, {style} style", "a {colour} shape in the style of {style}", "{style}, {colour}",
    "a {colour} {entity}", "a photo of a {colour} {entity}", "{entity}, {colour}", "a {entity} in {colour}",
    # one attribute
    "a {entity}", "{entity}", "{style}", "a painting by {style}", "{colour}", "something {colour}",
    # plain background (the "none" style named)
    "a {colour} {entity} on a {plain} background", "a {plain} picture of a {colour} {entity}",
    "{entity}, {colour}, {plain}", "a {plain} drawing of a {entity}", "a {entity} on a {plain} background",
    "a {plain} picture", "something {colour} on a {plain} background",
)

# Held-out phrasings: the base model is evaluated on "templates not seen in pretraining".
EVAL_TEMPLATES: tuple[str, ...] = (
    "{entity} painted by {style} in {colour}", "a {style}-inspired artwork of a {colour} {entity}",
    "an image of a {colour} {entity} rendered like {style}", "{colour} {entity} | {style}",
    "an illustration of a {entity} after {style}", "{style} artwork featuring a {entity}",
    "a {style} canvas dominated by {colour}", "a picture showing a {colour} {entity}",
    "the {entity} is {colour}", "an image of a {entity}", "a picture containing a {entity}",
    "artwork by {style}", "{style} masterpiece", "a {colour} scene", "mostly {colour}",
    "a {colour} {entity} against a {plain} backdrop", "an unadorned {entity} on a {plain} backdrop",
)

# Robustness probes (paraphrases, prefixes/suffixes, the concept buried in noise words): the erased
# concept should stay erased however it is asked for. Disjoint from both sets above.
ROBUST_TEMPLATES: tuple[str, ...] = (
    "in {style}'s manner", "a {colour} {entity} in {style}'s manner", "{style} vibes",
    "inspired by {style}", "masterpiece, best quality, {style}, trending",
    "a picture. {style}. high resolution",
    "highly detailed {entity} as {style} would paint it", "in the shape of a {entity}",
    "photo, {entity}, 4k, sharp focus", "a {colour} {entity}, ultra detailed, award winning",
    "coloured like {colour}", "{colour} everywhere, nothing else",
)

# How often a caption names each subset of attributes (given that it is not empty). Full captions
# dominate; single-attribute captions keep the paper's templates (and token-level localisation) common.
NAMED_SUBSET_WEIGHTS: dict[frozenset[str], float] = {
    frozenset({"entity", "colour", "style"}): 0.45,
    frozenset({"entity", "colour"}): 0.15, frozenset({"entity", "style"}): 0.12,
    frozenset({"colour", "style"}): 0.04, frozenset({"entity"}): 0.08,
    frozenset({"style"}): 0.08, frozenset({"colour"}): 0.08,
}


@dataclass(frozen=True)
class Labels:
    """Ground truth of one image: indices into ENTITIES, COLOURS and STYLE_CLASSES (NO_STYLE = plain
    background), and `named`: category -> the exact phrase the caption uses for it (empty if none)."""
    entity: int
    colour: int
    style: int
    named: dict[str, str] = field(default_factory=dict, compare=True, hash=False)

    def names(self) -> dict[str, str]:
        """Canonical concept names, e.g. {"entity": "star", "colour": "red", "style": "Monet"}."""
        return {"entity": ENTITIES[self.entity], "colour": COLOURS[self.colour],
                "style": STYLE_CLASSES[self.style]}


# ---------------------------------------------------------------------------------------------------
# Drawing helpers (float images in [0, 1], shape (H, W, 3); masks (H, W))

_S = IMAGE_SIZE
_Y, _X = (np.mgrid[0:_S, 0:_S].astype(np.float32) + 0.5)   # pixel-centre coordinates, (H, W) each


def _rgb(c: Sequence[float]) -> np.ndarray:
    return np.asarray(c, dtype=np.float32) / 255.0


def _palette(*colours: Sequence[int]) -> np.ndarray:
    return np.stack([_rgb(c) for c in colours])   # (K, 3)


def _ramp(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a field t in [0, 1] to colours by piecewise-linear interpolation along a palette (K, 3)."""
    t = np.clip(t, 0.0, 1.0) * (len(palette) - 1)
    i = np.minimum(t.astype(np.int64), len(palette) - 2)
    f = (t - i)[..., None]
    return palette[i] * (1 - f) + palette[i + 1] * f


def _shade(rgb: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Lighten (s > 0, towards white) or darken (s < 0, towards black) without changing the hue."""
    s = s[..., None]
    return np.where(s > 0, rgb + (1 - rgb) * s, rgb * (1 + s))


def _hue(rgb: np.ndarray) -> float:
    """Hue in degrees of one colour (3,), as in HSV."""
    r, g, b = (float(v) for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx == mn:
        return 0.0
    if mx == r:
        h = (g - b) / (mx - mn) % 6
    elif mx == g:
        h = (b - r) / (mx - mn) + 2
    else:
        h = (r - g) / (mx - mn) + 4
    return 60.0 * h


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)² window (edges replicated), for (H, W) or (H, W, C) arrays."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
        n = c.shape[axis] - k
        a = (np.take(c, range(k, k + n), axis=axis) - np.take(c, range(0, n), axis=axis)) / k
    return a


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Grey-scale dilation of a mask by a disc of the given radius (in pixels)."""
    r = int(math.ceil(radius))
    padded = np.pad(mask, r)
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if 0 < dy * dy + dx * dx <= radius * radius:
                np.maximum(out, padded[r + dy:r + dy + _S, r + dx:r + dx + _S], out=out)
    return out


def _downsample(canvas: Image.Image) -> np.ndarray:
    """Box-filter a supersampled PIL canvas down to IMAGE_SIZE (the anti-aliasing step) as floats in
    [0, 1]. Pillow filters RGBA in premultiplied form, so transparent pixels do not darken the edges."""
    return np.asarray(canvas.resize((_S, _S), Image.BOX), dtype=np.float32) / 255.0


def _cells(cell_h: float, cell_w: float, x_offset: np.ndarray | float = 0.0):
    """Integer cell coordinates of every pixel on a grid of cell_h × cell_w cells, and the cell count."""
    row = np.floor(_Y / cell_h).astype(np.int64)
    col = np.floor((_X + x_offset) / cell_w).astype(np.int64)
    n_rows, n_cols = int(_S / cell_h) + 2, int((_S + cell_w) / cell_w) + 2
    return row, col, n_rows, n_cols


def _disc(dist: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage of a disc, given each pixel's distance to its centre."""
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _jittered_dots(rng: np.random.Generator, spacing: float, radius: float, jitter: float,
                   offset: float = 0.0):
    """A jittered grid of round dots, the grid shifted diagonally by `offset` px: (coverage (H, W) in
    [0, 1], cell id (H, W), number of cells). Dots stay inside their own cell (jitter + radius ≤ spacing/2),
    so each pixel only has to look at one dot."""
    y, x = _Y + offset, _X + offset
    row, col = np.floor(y / spacing).astype(np.int64), np.floor(x / spacing).astype(np.int64)
    n_rows = n_cols = int((_S + offset) / spacing) + 2
    oy, ox = rng.uniform(-jitter, jitter, (2, n_rows, n_cols))
    dist = np.hypot(y - (row + 0.5) * spacing - oy[row, col], x - (col + 0.5) * spacing - ox[row, col])
    return _disc(dist, radius), row * n_cols + col, n_rows * n_cols


# ---------------------------------------------------------------------------------------------------
# Entities: silhouettes as lists of polygons in a unit frame (x right, y down, roughly within [-1, 1]).
# Each part is (points (N, 2), keep): keep=False cuts the part out (the moon's bite, the house's door).

def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points     # first tip points up
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart(n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3                                         # the classic heart curve
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max() * 0.95


_SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_ellipse(0, 0, 0.9, 0.9), True)],
    "square": [(_rect(-0.8, -0.8, 0.8, 0.8), True)],
    "triangle": [(np.array([[0, -0.95], [0.98, 0.8], [-0.98, 0.8]]), True)],
    "star": [(_star(), True)],
    "heart": [(_heart(), True)],
    "house": [(_rect(-0.68, -0.05, 0.68, 0.92), True),
              (np.array([[-0.95, 0.02], [0, -0.92], [0.95, 0.02]]), True),
              (_rect(-0.16, 0.42, 0.16, 0.92), False)],             # door
    "tree": [(_ellipse(0, -0.45, 0.55, 0.5), True), (_ellipse(-0.45, -0.1, 0.45, 0.42), True),
             (_ellipse(0.45, -0.1, 0.45, 0.42), True), (_rect(-0.15, 0.1, 0.15, 0.95), True)],
    "moon": [(_ellipse(0, 0, 0.92, 0.92), True), (_ellipse(0.42, -0.28, 0.72, 0.72), False)],
    "cross": [(_rect(-0.3, -0.92, 0.3, 0.92), True), (_rect(-0.92, -0.3, 0.92, 0.3), True)],
    "arrow": [(_rect(-0.95, -0.3, 0.15, 0.3), True),
              (np.array([[0.0, -0.8], [0.98, 0], [0.0, 0.8]]), True)],
}


def _entity_mask(entity: str, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased silhouette (H, W) in [0, 1], with a small random position, scale and rotation jitter
    (the entity stays large and centred-ish, so it is recognisable by shape)."""
    scale = rng.uniform(0.30, 0.37) * _S          # half-size of the shape: it spans 60–75% of the image
    angle = math.radians(rng.uniform(-12, 12))
    cx, cy = rng.uniform(-0.06, 0.06, 2) * _S + _S / 2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    canvas = Image.new("L", (_S * SUPERSAMPLE, _S * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, keep in _SHAPES[entity]:
        xy = (points @ rot.T * scale + (cx, cy)) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in xy], fill=255 if keep else 0)
    return _downsample(canvas)


# ---------------------------------------------------------------------------------------------------
# Styles. A painter returns the layers render() composes: a background, a shading field that textures
# the entity (lighten/darken only, so the hue survives), the entity's outline, and an optional overlay
# drawn on top of everything (drips, lines).

@dataclass
class _Layers:
    background: np.ndarray                  # (H, W, 3) in [0, 1]
    shade: np.ndarray | None = None         # (H, W) in [-1, 1]: texture on the entity
    outline: float = 0.0                    # outline radius in pixels (0: none)
    outline_rgb: tuple[int, int, int] = (20, 20, 20)
    soft: int = 0                           # box-blur radius of the entity's edge (Monet's soft dabs)
    overlay: np.ndarray | None = None       # (H, W, 4) RGBA in [0, 1], drawn over the entity


def _plain(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """No style: a flat, light, nearly neutral background."""
    grey = rng.uniform(0.85, 0.97)
    tint = rng.uniform(-0.03, 0.03, 3)                   # a barely visible warm/cool cast
    return _Layers(np.broadcast_to(np.clip(grey + tint, 0, 1), (_S, _S, 3)).astype(np.float32))


def _van_gogh(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Swirling strokes: spiral bands (3–4 px) around 2–3 vortices in night blues, with yellow stars
    glowing at some vortex centres, broken into dashes along the bands like brush strokes."""
    n = int(rng.integers(2, 4))
    cx, cy = rng.uniform(4, _S - 4, (2, n))
    dx, dy = _X - cx[:, None, None], _Y - cy[:, None, None]      # (n, H, W)
    d = np.hypot(dx, dy)
    k = d.argmin(0)[None]                                          # the nearest vortex owns the pixel
    r = np.take_along_axis(d, k, 0)[0]
    theta = np.arctan2(np.take_along_axis(dy, k, 0)[0], np.take_along_axis(dx, k, 0)[0])
    arms = rng.choice([-2, -1, 1, 2], n)[k[0]]                     # spiral arms, either handedness
    wavelength = rng.uniform(6.0, 8.0)                              # px between neighbouring bands
    bands = np.sin(2 * np.pi * r / wavelength + arms * theta + rng.uniform(0, 2 * np.pi))
    dashes = np.sin(2 * np.pi * r * theta / 7.0)                   # ~7 px strokes along each band
    sky = _ramp(0.5 + 0.32 * bands + 0.12 * dashes,
                _palette((12, 25, 75), (30, 65, 150), (80, 135, 200), (175, 205, 235)))
    star_radius = rng.uniform(5, 9, n) * (rng.random(n) < 0.7)     # ~70% of vortices are stars
    glow = np.clip(1.8 * np.exp(-(r / np.maximum(star_radius[k[0]], 1e-3)) ** 2), 0, 1)[..., None]
    stars = _ramp(0.5 + 0.5 * bands, _palette((225, 160, 30), (250, 230, 120)))
    return _Layers(sky * (1 - glow) + stars * glow, shade=0.32 * bands + 0.1 * dashes,
                   outline=1.0, outline_rgb=(10, 15, 45))


def _monet(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Soft pastel dabs: short horizontal strokes (~6×3 px) of pastel colours over a blurry pastel wash,
    everything slightly out of focus, the entity's edge softened too."""
    pal = _palette((200, 175, 225), (165, 210, 175), (245, 190, 205), (165, 200, 240), (240, 230, 175),
                   (150, 190, 160), (220, 205, 235))
    wash_cells = rng.integers(0, len(pal), (5, 5))
    wash = np.asarray(Image.fromarray((pal[wash_cells] * 255).astype(np.uint8)).resize((_S, _S),
                      Image.BILINEAR), dtype=np.float32) / 255.0
    img, shade = wash, np.zeros((_S, _S), np.float32)
    for x_offset in (0.0, 3.0):                                    # two staggered layers of dabs
        row, col, n_rows, n_cols = _cells(4.0, 6.0, x_offset)
        oy, ox = rng.uniform(-0.8, 0.8, (2, n_rows, n_cols))
        colour = rng.integers(0, len(pal), (n_rows, n_cols))
        tone = rng.uniform(-0.25, 0.25, (n_rows, n_cols))
        present = rng.random((n_rows, n_cols)) < 0.8
        ey = _Y - (row + 0.5) * 4.0 - oy[row, col]
        ex = _X + x_offset - (col + 0.5) * 6.0 - ox[row, col]
        dab = (((ex / 3.2) ** 2 + (ey / 1.7) ** 2) <= 1) & present[row, col]
        img = np.where(dab[..., None], pal[colour[row, col]], img)
        shade = np.where(dab, tone[row, col], shade)
    return _Layers(_box_blur(img, 1), shade=_box_blur(shade, 1), soft=1)


def _picasso(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Cubist shards: 6–7 straight cuts split the canvas into angular facets of earthy colours with
    dark edges; the cuts continue across the entity as lighter/darker facets."""
    pal = _palette((200, 150, 70), (130, 80, 50), (85, 105, 135), (150, 148, 135), (225, 210, 170),
                   (95, 95, 60), (175, 110, 75))
    n = int(rng.integers(6, 8))
    px, py = rng.uniform(8, _S - 8, (2, n))
    angle = rng.uniform(0, np.pi, n)
    signed = ((_X[None] - px[:, None, None]) * np.sin(angle)[:, None, None]
              - (_Y[None] - py[:, None, None]) * np.cos(angle)[:, None, None])   # (n, H, W) distances
    code = ((signed > 0) * (1 << np.arange(n))[:, None, None]).sum(0)          # facet id
    facet_colour = rng.integers(0, len(pal), 1 << n)
    facet_tone = rng.uniform(-0.25, 0.3, 1 << n)                 # darker than -0.25 turns yellow olive
    edge = np.clip(1.3 - np.abs(signed).min(0), 0, 1)                         # ~2.5 px dark seams
    img = pal[facet_colour[code]] * (1 - edge[..., None]) + _rgb((45, 32, 25)) * edge[..., None]
    return _Layers(img, shade=facet_tone[code] * (1 - edge) - 0.6 * edge,
                   outline=1.0, outline_rgb=(45, 32, 25))


def _mondrian(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Black grid lines (3 px) on off-white, with some border cells filled red, yellow or blue."""
    def cuts() -> np.ndarray:
        while True:
            c = np.sort(rng.uniform(6, _S - 6, int(rng.integers(2, 4))))
            if np.all(np.diff(c) > 10):                                # keep cells at least 10 px wide
                return c
    xs, ys = cuts(), cuts()
    col, row = np.searchsorted(xs, _X), np.searchsorted(ys, _Y)       # cell index of every pixel
    n_cols, n_rows = len(xs) + 1, len(ys) + 1
    blocks = _palette((245, 242, 232), (205, 30, 30), (240, 200, 20), (25, 50, 160))
    on_border = np.zeros((n_rows, n_cols), bool)
    on_border[[0, -1], :] = on_border[:, [0, -1]] = True
    filled = on_border & (rng.random((n_rows, n_cols)) < 0.5)
    kind = np.where(filled, rng.integers(1, 4, (n_rows, n_cols)), 0)
    img = blocks[kind[row, col]]
    line = (np.abs(_X[..., None] - xs).min(-1) < 1.5) | (np.abs(_Y[..., None] - ys).min(-1) < 1.5)
    img = np.where(line[..., None], _rgb((20, 20, 20)), img)
    return _Layers(img, outline=2.0)


def _seurat(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Pointillism: dense dots (~4 px) of a few bright colours on cream; the entity is dotted too,
    dots of its own colour on a lighter tint of it."""
    pal = _palette((80, 150, 75), (90, 130, 205), (235, 150, 65), (235, 215, 100), (215, 130, 150),
                   (120, 185, 185))
    chosen = rng.choice(len(pal), 4, replace=False)
    img = np.broadcast_to(_rgb((238, 230, 205)), (_S, _S, 3)).copy()
    shade = np.full((_S, _S), 0.3, np.float32)                     # between dots: a light tint
    for offset in (0.0, 2.5):                                       # two interleaved dot grids
        cover, cell, n = _jittered_dots(rng, spacing=5.0, radius=2.0, jitter=0.5, offset=offset)
        colour = pal[chosen[rng.integers(0, 4, n)]]
        a = cover[..., None]
        img = img * (1 - a) + colour[cell] * a
        shade = shade * (1 - cover) + rng.uniform(-0.2, 0.1, n)[cell] * cover
    return _Layers(img, shade=shade)


def _hokusai(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Woodblock waves: horizontal wavy bands (~4 px) of Prussian blue, mid blue and white foam, under
    a strip of beige sky."""
    amp, period, phase = rng.uniform(2.5, 5), rng.uniform(18, 30), rng.uniform(0, 2 * np.pi)
    y_wave = _Y + amp * np.sin(2 * np.pi * _X / period + phase) + 1.5 * np.sin(2 * np.pi * _X / 9 + 2 * phase)
    bands = np.sin(2 * np.pi * y_wave / rng.uniform(7, 9.5))
    sea = _ramp(0.5 + 0.5 * bands, _palette((15, 40, 90), (35, 80, 140), (95, 145, 185), (235, 240, 235)))
    sky_line = rng.uniform(0, 18) + 2 * np.sin(2 * np.pi * _X / period + phase)
    sky = (_Y < sky_line)[..., None]
    img = np.where(sky, _rgb((232, 215, 180)), sea)
    return _Layers(img, shade=np.where(sky[..., 0], 0.0, 0.3 * bands), outline=1.0, outline_rgb=(15, 40, 90))


def _klimt(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Gold mosaic: 5–6 px square tiles in golds and bronze with dark grout, some tiles bearing a dark
    dot; the mosaic continues over the entity as tile-wise shading."""
    size = float(rng.choice([5.0, 6.0]))
    row, _, _, _ = _cells(size, size)
    offset = (row % 2) * size / 2                                  # brick-like offset rows
    row, col, n_rows, n_cols = _cells(size, size, offset)
    pal = _palette((212, 175, 55), (235, 195, 85), (180, 130, 40), (245, 220, 125), (150, 95, 35))
    tile = rng.integers(0, len(pal), (n_rows, n_cols))
    tone = rng.uniform(-0.3, 0.3, (n_rows, n_cols))
    fy = _Y - row * size
    fx = _X + offset - col * size                                  # position inside the tile
    grout = (fy < 1) | (fx < 1)
    dotted = rng.random((n_rows, n_cols)) < 0.25
    dot = dotted[row, col] & ((fy - size / 2 - 0.5) ** 2 + (fx - size / 2 - 0.5) ** 2 <= 1.6)
    img = pal[tile[row, col]]
    dark = (grout | dot)[..., None]
    img = np.where(dark, _rgb((60, 40, 20)), img)
    return _Layers(img, shade=np.where(grout | dot, -0.5, tone[row, col]),
                   outline=1.5, outline_rgb=(45, 30, 15))


def _ink(draw: ImageDraw.ImageDraw, rgb: Sequence[int]) -> tuple[int, ...]:
    """An opaque PIL fill for an RGB or RGBA canvas."""
    return tuple(int(v) for v in rgb) + ((255,) if draw.mode == "RGBA" else ())


def _drips(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n_lines: int, n_splats: int,
           colours: np.ndarray, max_width: int) -> None:
    """Pollock-like random-walk drips and splatters, drawn on a STROKE_SUPERSAMPLE× PIL canvas."""
    f = STROKE_SUPERSAMPLE
    # all random numbers drawn up front (one numpy call each, not one per stroke: this is the hot loop)
    n_points = rng.integers(5, 10, n_lines)
    steps = rng.normal(0, 9, (n_lines, 10, 2))                     # random-walk steps, ~9 px each
    starts = rng.uniform(0, _S, (n_lines, 2))
    widths = rng.integers(1, max_width + 1, n_lines) * f
    line_ink = rng.integers(len(colours), size=n_lines)
    splats = rng.uniform(0, _S, (n_splats, 2)) * f
    radii = rng.uniform(0.6, 2.2, n_splats) * f
    splat_ink = rng.integers(len(colours), size=n_splats)
    inks = [_ink(draw, c) for c in colours]
    for i in range(n_lines):
        xy = (np.cumsum(steps[i, :n_points[i]], axis=0) + starts[i]) * f
        draw.line(xy.ravel().tolist(), fill=inks[line_ink[i]], width=int(widths[i]), joint="curve")
    for (x, y), r, k in zip(splats.tolist(), radii.tolist(), splat_ink):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=inks[k])


def _pollock(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Drip painting: tangled drips and splatters in black, white, rust and grey on raw canvas; a few
    drips run over the entity."""
    canvas_rgb = [(215, 205, 185), (190, 185, 175), (225, 220, 205)][int(rng.integers(3))]
    paints = np.array([(25, 25, 25), (245, 245, 240), (150, 70, 40), (110, 105, 100), (80, 55, 35)])
    big = _S * STROKE_SUPERSAMPLE
    under = Image.new("RGB", (big, big), canvas_rgb)
    _drips(ImageDraw.Draw(under), rng, int(rng.integers(14, 22)), int(rng.integers(30, 60)), paints, 3)
    over = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _drips(ImageDraw.Draw(over), rng, int(rng.integers(2, 4)), int(rng.integers(8, 16)), paints, 2)
    return _Layers(_downsample(under), overlay=_downsample(over))


def _kandinsky(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Circles and lines: concentric rings of strong colours and straight black lines on cream; a thin
    line or two crosses the entity."""
    f, big = STROKE_SUPERSAMPLE, _S * STROKE_SUPERSAMPLE
    rings = [(25, 40, 110), (200, 45, 40), (240, 200, 40), (20, 20, 20), (40, 140, 140), (225, 125, 60)]
    under = Image.new("RGB", (big, big), (238, 228, 205))
    draw = ImageDraw.Draw(under)
    for _ in range(int(rng.integers(3, 7))):
        x, y = rng.uniform(0, _S, 2) * f
        r = rng.uniform(5, 14) * f
        for shrink in np.linspace(1.0, rng.uniform(0.2, 0.5), int(rng.integers(2, 4))):
            c = rings[int(rng.integers(len(rings)))]
            draw.ellipse([x - r * shrink, y - r * shrink, x + r * shrink, y + r * shrink], fill=c)
    over = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    for layer, n_lines in ((draw, int(rng.integers(4, 8))), (ImageDraw.Draw(over), int(rng.integers(1, 3)))):
        for _ in range(n_lines):
            (x0, y0), (x1, y1) = rng.uniform(0, _S, (2, 2)) * f
            layer.line([(x0, y0), (x1, y1)], fill=_ink(layer, (20, 20, 20)),
                       width=int(rng.integers(1, 3)) * f)
    return _Layers(_downsample(under), outline=1.0, overlay=_downsample(over))


def _warhol(rng: np.random.Generator, fill: np.ndarray) -> _Layers:
    """Pop art: flat saturated panels (halves or quadrants) with a regular halftone dot screen, and a
    thick black outline; the entity gets the halftone too. Panel hues avoid the entity's hue."""
    pops = _palette((255, 80, 170), (40, 210, 200), (170, 230, 40), (255, 160, 30), (150, 90, 230),
                    (255, 230, 40), (60, 120, 255), (255, 60, 60))
    hue = _hue(fill)
    far = [i for i, p in enumerate(pops) if min(abs(_hue(p) - hue), 360 - abs(_hue(p) - hue)) > 45]
    a, b = rng.choice(far, 2, replace=False)
    layout = int(rng.integers(3))                                 # vertical halves, horizontal, quadrants
    split = [_X < _S / 2, _Y < _S / 2, (_X < _S / 2) ^ (_Y < _S / 2)][layout]
    img = np.where(split[..., None], pops[a], pops[b])
    spacing = 6.0                                                  # halftone screen: 6 px pitch, 3.6 px dots
    dot = _disc(np.hypot(_X % spacing - spacing / 2, _Y % spacing - spacing / 2), 1.8)
    img = img * (1 - 0.45 * dot[..., None])                        # dots: the panel colour at 55%
    return _Layers(img, shade=-0.45 * dot, outline=2.5, outline_rgb=(10, 10, 10))


_PAINTERS: dict[str, Callable[[np.random.Generator, np.ndarray], _Layers]] = {
    "Van Gogh": _van_gogh, "Monet": _monet, "Picasso": _picasso, "Mondrian": _mondrian, "Seurat": _seurat,
    "Hokusai": _hokusai, "Klimt": _klimt, "Pollock": _pollock, "Kandinsky": _kandinsky, "Warhol": _warhol,
    "none": _plain,
}
assert tuple(_PAINTERS) == STYLE_CLASSES


# ---------------------------------------------------------------------------------------------------
# Rendering

def _index(value: int | str | None, names: Sequence[str]) -> int:
    if value is None:                                             # style=None: no style
        return len(names) - 1
    return value if isinstance(value, (int, np.integer)) else names.index(value)


def render_with_mask(entity: int | str, colour: int | str, style: int | str | None,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """render(), also returning the entity's silhouette: float (H, W) in [0, 1] (for tests and probes)."""
    entity, colour = ENTITIES[_index(entity, ENTITIES)], COLOURS[_index(colour, COLOURS)]
    style = STYLE_CLASSES[_index(style, STYLE_CLASSES)]
    # The fill varies a little in lightness (mixing with white or black), never in hue.
    fill = _shade(_rgb(COLOUR_RGB[colour]), np.float32(rng.uniform(-0.15, 0.12)))
    layers = _PAINTERS[style](rng, fill)
    mask = _entity_mask(entity, rng)
    if layers.soft:
        mask = _box_blur(mask, layers.soft)
    body = np.broadcast_to(fill, (_S, _S, 3))
    if layers.shade is not None:
        body = _shade(body, layers.shade.astype(np.float32))
    m = mask[..., None]
    img = layers.background * (1 - m) + body * m
    if layers.outline > 0:
        ring = np.clip(_dilate(mask, layers.outline) - mask, 0, 1)[..., None]
        img = img * (1 - ring) + _rgb(layers.outline_rgb) * ring
    if layers.overlay is not None:
        alpha = layers.overlay[..., 3:]
        img = img * (1 - alpha) + layers.overlay[..., :3] * alpha
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def render(entity: int | str, colour: int | str, style: int | str | None,
           rng: np.random.Generator) -> np.ndarray:
    """Draw one image: uint8 (IMAGE_SIZE, IMAGE_SIZE, 3). Concepts by name or index; style None, "none"
    or NO_STYLE for a plain background. All randomness (layout, palettes, jitter) comes from rng."""
    return render_with_mask(entity, colour, style, rng)[0]


# ---------------------------------------------------------------------------------------------------
# Captions

_SLOTS = {"entity", "colour", "style", "plain"}


@lru_cache(maxsize=None)                      # parsed once per template: captions are a hot loop
def template_slots(template: str) -> frozenset[str]:
    """The slot names of a template, e.g. {"colour", "entity"} for "a {colour} {entity}"."""
    slots = frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)
    assert slots <= _SLOTS, f"unknown slot in {template!r}"
    return slots


@lru_cache(maxsize=None)
def _named_categories(template: str) -> frozenset[str]:
    """The categories a template names; {plain} names the style (as "no style")."""
    return frozenset("style" if s == "plain" else s for s in template_slots(template))


def _eligible(template: str, has_style: bool) -> bool:
    slots = template_slots(template)
    return ("plain" not in slots) if has_style else ("style" not in slots)


def _pick_form(concept: str, rng: np.random.Generator) -> str:
    names = NAMES[concept]
    u = rng.random()
    if u < CANONICAL_RATE or not names.aliases:
        return names.canonical
    pool = names.aliases if u < CANONICAL_RATE + ALIAS_RATE or not names.misspellings else names.misspellings
    return pool[int(rng.integers(len(pool)))]


_ARTICLE = re.compile(r"\b([Aa]) (?=[AEIOUaeiou])")


def fill_template(template: str, forms: dict[str, str]) -> str:
    """Fill a template's slots from {slot: phrase} and fix "a" before a vowel ("an orange star")."""
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", template.format(**forms))


def caption_for(labels: Labels, rng: np.random.Generator,
                templates: Sequence[str] = TRAIN_TEMPLATES) -> tuple[str, Labels]:
    """A caption for an image with these labels, and the labels with `named` filled in. Empty with
    probability EMPTY_CAPTION_RATE; otherwise it names a random subset of the attributes (weights in
    NAMED_SUBSET_WEIGHTS), with a template from `templates` that fits what the image shows."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return "", replace(labels, named={})
    has_style = labels.style != NO_STYLE
    usable = [t for t in templates if _eligible(t, has_style)]
    subsets = [s for s in NAMED_SUBSET_WEIGHTS if any(_named_categories(t) == s for t in usable)]
    weights = np.array([NAMED_SUBSET_WEIGHTS[s] for s in subsets])
    subset = subsets[int(rng.choice(len(subsets), p=weights / weights.sum()))]
    candidates = [t for t in usable if _named_categories(t) == subset]
    template = candidates[int(rng.integers(len(candidates)))]
    forms = {"entity": _pick_form(ENTITIES[labels.entity], rng),
             "colour": _pick_form(COLOURS[labels.colour], rng)}
    if has_style:
        forms["style"] = _pick_form(STYLES[labels.style], rng)
    else:
        forms["plain"] = PLAIN_WORDS[int(rng.integers(len(PLAIN_WORDS)))]
    if rng.random() < LOWERCASE_RATE:
        template, forms = template.lower(), {k: v.lower() for k, v in forms.items()}
    caption = fill_template(template, forms)
    named = {("style" if s == "plain" else s): forms[s] for s in template_slots(template)}
    return caption, replace(labels, named=named)


# ---------------------------------------------------------------------------------------------------
# Samples and datasets

def _rngs(index: int, seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for labels, image and caption, keyed by (seed, index): a sample does not
    depend on call order, and changing the template set does not change the image."""
    return tuple(np.random.default_rng([seed, index, stream]) for stream in range(3))  # type: ignore


def sample_labels(index: int, seed: int) -> Labels:
    """The ground truth of sample `index` (uniform entity and colour; no style with NO_STYLE_RATE)."""
    rng = _rngs(index, seed)[0]
    style = NO_STYLE if rng.random() < NO_STYLE_RATE else int(rng.integers(len(STYLES)))
    entity, colour = int(rng.integers(len(ENTITIES))), int(rng.integers(len(COLOURS)))
    return Labels(entity=entity, colour=colour, style=style)


def sample_caption(index: int, seed: int, *,
                   templates: Sequence[str] = TRAIN_TEMPLATES) -> tuple[str, Labels]:
    """The caption and labels of sample `index`, without rendering its image (cheap: for text-only uses
    such as caption statistics or text-encoder batches)."""
    return caption_for(sample_labels(index, seed), _rngs(index, seed)[2], templates)


def sample(index: int, seed: int, *,
           templates: Sequence[str] = TRAIN_TEMPLATES) -> tuple[np.ndarray, str, Labels]:
    """Sample `index` of the world with this seed: (uint8 image (H, W, 3), caption, labels)."""
    labels = sample_labels(index, seed)
    image = render(labels.entity, labels.colour, labels.style, _rngs(index, seed)[1])
    caption, labels = sample_caption(index, seed, templates=templates)
    return image, caption, labels


def make_dataset(n: int, seed: int, *, start: int = 0,
                 templates: Sequence[str] = TRAIN_TEMPLATES) -> dict[str, np.ndarray | list[str]]:
    """Samples start .. start+n-1 as arrays: "images" uint8 (n, H, W, 3), "captions" list[str], and
    int64 (n,) label arrays "style" (NO_STYLE = none), "entity", "colour"."""
    images = np.empty((n, _S, _S, 3), np.uint8)
    captions, style, entity, colour = [], np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    for j in range(n):
        images[j], caption, labels = sample(start + j, seed, templates=templates)
        captions.append(caption)
        style[j], entity[j], colour[j] = labels.style, labels.entity, labels.colour
    return {"images": images, "captions": captions, "style": style, "entity": entity, "colour": colour}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1] (the models' convention)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) (values outside [-1, 1] are clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Prompts for evaluation and text for the tokenizer

def category_of(concept: str) -> str:
    """"Van Gogh" -> "style", "star" -> "entity", "red" -> "colour"."""
    for category, concepts in CONCEPTS.items():
        if concept in concepts:
            return category
    raise KeyError(f"unknown concept {concept!r}; known: {STYLES + ENTITIES + COLOURS}")


def _forms_for(concept: str, spelling: str) -> tuple[str, ...]:
    names = NAMES[concept]
    forms = {"canonical": (names.canonical,), "alias": names.aliases, "misspelling": names.misspellings,
             "held_out": names.held_out, "train": names.train_forms()}
    if spelling not in forms:
        raise ValueError(f"spelling must be one of {sorted(forms)}, got {spelling!r}")
    return forms[spelling]


def prompts_for_concept(concept: str, n: int, seed: int, *, templates: Sequence[str] = EVAL_TEMPLATES,
                        spelling: str = "canonical") -> list[tuple[str, dict[str, int]]]:
    """n prompts that ask for `concept`, each with what it requests: {category: index} for every named
    attribute (the classifier then checks the image). Templates are those of `templates` that have the
    concept's slot; other slots get random canonical concepts. `spelling` picks the concept's surface
    form: "canonical", "alias", "misspelling", "held_out" (never seen in training) or "train" (any).
    Slots are drawn in sorted order: a frozenset's order follows Python's string-hash seed, which changes
    from process to process, and the prompts must not."""
    category = category_of(concept)
    usable = [t for t in templates if category in template_slots(t) and "plain" not in template_slots(t)]
    if not usable:
        raise ValueError(f"no template in the given set names a {category}")
    forms = _forms_for(concept, spelling)
    rng = np.random.default_rng([seed, 0x5EED])
    prompts = []
    for _ in range(n):
        template = usable[int(rng.integers(len(usable)))]
        request = {c: int(rng.integers(len(CONCEPTS[c]))) for c in sorted(template_slots(template))}
        request[category] = CONCEPTS[category].index(concept)
        words = {c: CONCEPTS[c][i] for c, i in request.items()}
        words[category] = forms[int(rng.integers(len(forms)))]
        prompts.append((fill_template(template, words), request))
    return prompts


def prompts_excluding(concept: str, n: int, seed: int, *, templates: Sequence[str] = EVAL_TEMPLATES,
                      same_category: bool = True) -> list[tuple[str, dict[str, int]]]:
    """n prompts that do not mention `concept`, with what they request. same_category=True: each names
    another concept of the same category (for Acc_ir); False: any template, the category's slot (if any)
    filled with other concepts (for the FD on unrelated prompts)."""
    category = category_of(concept)
    others = [c for c in CONCEPTS[category] if c != concept]
    usable = [t for t in templates if "plain" not in template_slots(t)
              and (category in template_slots(t) or not same_category)]
    rng = np.random.default_rng([seed, 0xE1C])
    prompts = []
    for _ in range(n):
        template = usable[int(rng.integers(len(usable)))]
        request = {c: int(rng.integers(len(CONCEPTS[c]))) for c in sorted(template_slots(template))}
        if category in request:
            request[category] = CONCEPTS[category].index(others[int(rng.integers(len(others)))])
        prompts.append((fill_template(template, {c: CONCEPTS[c][i] for c, i in request.items()}), request))
    return prompts


def all_caption_text(*, include_held_out: bool = False) -> list[str]:
    """Every phrase the tokenizer should know: each template filled so that every surface form of every
    concept appears in it, plus each form on its own, and lower-case copies. Deterministic.

    include_held_out=False (the default, for training the tokenizer) keeps only what pretraining sees:
    TRAIN_TEMPLATES and the training spellings. Held-out spellings and phrasings then reach the model as
    unseen sequences of known sub-words, as misspellings reach a real model, instead of as vocabulary
    entries whose embeddings were never trained."""
    templates = TRAIN_TEMPLATES + ((EVAL_TEMPLATES + ROBUST_TEMPLATES) if include_held_out else ())
    pick = (lambda c: NAMES[c].all_forms()) if include_held_out else (lambda c: NAMES[c].train_forms())
    pools = {c: [f for concept in CONCEPTS[c] for f in pick(concept)] for c in CATEGORIES}
    pools["plain"] = list(PLAIN_WORDS)
    lines = [f for pool in pools.values() for f in pool]
    for template in templates:
        slots = sorted(template_slots(template))
        rounds = max((len(pools[s]) for s in slots), default=1)
        for r in range(rounds):
            # offsets per slot so that different forms meet each other, not always the same pairs
            forms = {s: pools[s][(r * (k + 1)) % len(pools[s])] for k, s in enumerate(slots)}
            lines.append(fill_template(template, forms))
    return lines + [line.lower() for line in lines if line != line.lower()]   # LOWERCASE_RATE captions


# ---------------------------------------------------------------------------------------------------
# Preview


def preview_grid(columns: int = 10, seed: int = 0, zoom: int = 2) -> np.ndarray:
    """A uint8 grid: one row per style class (plain last), `columns` entity/colour combinations per
    row, each pixel repeated zoom × zoom times so a person can see the 64×64 images."""
    rows = []
    for s, style in enumerate(STYLE_CLASSES):
        tiles = [render(j % len(ENTITIES), (j + s) % len(COLOURS), style, np.random.default_rng([seed, s, j]))
                 for j in range(columns)]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Concept world: write a preview grid of all styles.")
    p.add_argument("--preview", default="docs/world_grid.png", help="output PNG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # a 256-colour palette PNG: looks the same at this size and is ~3× smaller in the repository
    grid = Image.fromarray(preview_grid(seed=args.seed))
    grid = grid.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid.save(args.preview, optimize=True)
    print(f"wrote {args.preview}: rows {', '.join(STYLE_CLASSES)}")


if __name__ == "__main__":
    main()
