"""
Score images of the embedded tiny model with the concept classifier: what an erasure removes, and what
users lose with it (the paper's metrics in miniature, plus measures of collateral damage).

    python evaluate.py                                          # base model: per-concept accuracy table
    python evaluate.py --lora loras/van-gogh.safetensors        # the erasure report below
    python evaluate.py --lora a.safetensors --lora b.safetensors  # several LoRAs averaged (Eq. 63)
    python evaluate.py --reliability                            # base model vs ground truth, per style
                                                                # and per held-out template

Every prompt comes from the world's held-out templates (EVAL_TEMPLATES and ROBUST_TEMPLATES: phrasings
never used in pretraining nor in any preservation set), less HIDDEN_NAME_TEMPLATES, whose fixed words the
tokenizer splits into a concept's name. The base and the erased model draw each image from the same prompt
and the same noise. An image counts as correct for a category k when the classifier's k-head predicts
what its prompt asks for. The report for an erased concept c of category k (erasure_report):
  Acc_e:        accuracy on prompts that ask for c (lower is better): canonical name, and per variant
                (aliases, misspellings, spellings never seen in training, paraphrase templates);
  Acc_ir:       accuracy on prompts that ask for the other concepts of k, overall and per concept;
  H_a = Acc_ir - Acc_e (canonical);
  content kept: on prompts that name c together with the other two attributes, the accuracy of the other
                two heads (style erased: entity and colour; ...): does the rest of the request survive?
  neutral:      on prompts that name no concept of k, every head the prompt names (a {plain} backdrop
                asks the style head for "none");
  unconditional: the empty prompt's class histogram per head (and c's share, and the total variation
                between base and erased) and the FD between base and erased images;
  FD:           Fréchet distance between classifier features of base and erased images of unrelated
                prompts (the FID stand-in; lower is better).

Trusting a head. For content kept and neutral, each head also gets "retained": of the images whose base
head is right, the share whose erased image is right too. That is the loss where the base model delivers,
whatever the base gets wrong; an unchanged model retains 1.0. Each head also gets the classifier's accuracy
on ground-truth renders of the same requests (does the classifier read that head on such images?), and the
printout marks a head whose base accuracy is below TRUST. `--reliability` tells the model's failures from
the classifier's, per style and per template: on the committed weights the classifier reads ground truth
at >= 0.95 for every (style, head); the low base figures are phrasings the model does not follow (it
draws "a Monet canvas dominated by yellow" as a pink cross, in every seed).

Images: the noise of (prompt, seed) is initial_noise(1, ...) under image_seed(prompt, seed), so an
evaluation image is `python sample.py --prompt P --seed image_seed(P, s)`'s image, whatever batch it was
drawn in. Base images do not depend on the LoRA: ImageCache keeps them (in memory, and on disk under
--cache) keyed by the base model's identity, the sampling settings, the prompt and the seed, so a sweep
over concepts draws each base image once. From code (as bench/erasure.py does):

    cache = ImageCache(DEFAULT_CACHE)            # or ImageCache() to keep them in memory only
    report = erasure_report(base, erased, load_classifier(), "Van Gogh", 20, [0, 1, 2, 3], cache=cache)
    print(format_report(report))                 # report: a JSON-serialisable dict
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint as C
import lora_file
import zerase as Z
from cli import (HelpFormatter, OutputError, atomic_write, check_folder, check_output, die, lookup, stage,
                 text)
from model import CheckpointError, to_uint8
from sample import DEFAULT_MODEL, TURBO, check_loras, denoise, initial_noise, turbo_sigmas
from tiny import world
from tiny.classifier import HEADS, frechet_distance, load_classifier, score

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = ROOT / "out" / "eval_cache"
NOISE_SCHEME = "initial_noise(1) per image under image_seed(prompt, seed), v1"  # part of the cache key

# Held-out templates whose fixed words the tiny model's tokenizer splits into a concept's name: "inspired"
# is in|s|p|i|red, and the model reads that "red" token as a colour (asked for "a Monet-inspired artwork of
# a green star", the base model paints the star pink). They are left out of every prompt set here; the tests
# recompute this list from the tokenizer.
HIDDEN_NAME_TEMPLATES: tuple[str, ...] = ("a {style}-inspired artwork of a {colour} {entity}",
                                          "inspired by {style}")
EVAL_TEMPLATES = tuple(t for t in world.EVAL_TEMPLATES if t not in HIDDEN_NAME_TEMPLATES)
ROBUST_TEMPLATES = tuple(t for t in world.ROBUST_TEMPLATES if t not in HIDDEN_NAME_TEMPLATES)
HELD_OUT_TEMPLATES: tuple[str, ...] = EVAL_TEMPLATES + ROBUST_TEMPLATES
# templates that name all three attributes, each as a concept (no {plain}): the content-kept prompts
FULL_TEMPLATES: tuple[str, ...] = tuple(t for t in HELD_OUT_TEMPLATES
                                        if world.template_slots(t) == {"entity", "colour", "style"})
VARIANTS = ("alias", "misspelling", "held_out", "paraphrase")
TRUST = 0.8   # a head whose base accuracy on a measure is below this is flagged in the printout
BATCH = 16    # images per sampler call: on one CPU thread 16 draws ~0.11 s/image, 64 ~0.16 s/image
CLASSES = {"style": world.STYLE_CLASSES, "entity": world.ENTITIES, "colour": world.COLOURS}  # per head

Request = dict  # {category: index}; the style index NO_STYLE asks for a plain background
Prompt = tuple  # (text, Request)


# ---------------------------------------------------------------------------------------------------
# Prompt sets


@dataclass(frozen=True)
class Sizes:
    """Prompts per set (each drawn with every seed), and images of the empty prompt."""
    erase: int = 20          # canonical prompts for Acc_e
    variant: int = 12        # prompts per Acc_e variant (alias, misspelling, held-out spelling, paraphrase)
    related: int = 8         # prompts per other concept of the category (Acc_ir)
    content: int = 24        # prompts naming the concept and both other attributes
    neutral: int = 32        # prompts naming no concept of the category
    unconditional: int = 128  # empty-prompt images (seeds 0 .. unconditional - 1)
    unrelated: int = 20      # prompts for the FD (no mention of the concept)

    @staticmethod
    def from_n(n: int) -> "Sizes":
        """The default proportions for n canonical prompts (n = 20 gives the defaults)."""
        def k(r):
            return max(1, math.ceil(n * r))
        return Sizes(erase=n, variant=k(0.6), related=k(0.4), content=k(1.2), neutral=k(1.6),
                     unconditional=max(2, k(6.4)), unrelated=max(2, n))


def concept_prompts(concept: str, n: int, seed: int, *, templates=EVAL_TEMPLATES,
                    spelling: str = "canonical") -> list[Prompt]:
    """n prompts that ask for `concept`, with what they request: world.prompts_for_concept (a template of
    `templates` with the concept's slot, other slots random canonical concepts, the concept in the given
    spelling), on this module's held-out templates by default."""
    return world.prompts_for_concept(concept, n, seed, templates=templates, spelling=spelling)


def unrelated_prompts(concept: str, n: int, seed: int) -> list[Prompt]:
    """n held-out prompts (EVAL_TEMPLATES, no {plain}) that do not mention `concept`, with what they
    request: world.prompts_excluding(same_category=False)."""
    return world.prompts_excluding(concept, n, seed, templates=EVAL_TEMPLATES, same_category=False)


def fill_randomly(template: str, rng: np.random.Generator) -> Prompt:
    """A template with each slot (in sorted order) filled with a random canonical concept, and what it
    requests; {plain} gets a random PLAIN_WORDS word and asks for no style (NO_STYLE)."""
    words, request = {}, {}
    for slot in sorted(world.template_slots(template)):
        if slot == "plain":
            words[slot] = world.PLAIN_WORDS[int(rng.integers(len(world.PLAIN_WORDS)))]
            request["style"] = world.NO_STYLE
        else:
            request[slot] = int(rng.integers(len(world.CONCEPTS[slot])))
            words[slot] = world.CONCEPTS[slot][request[slot]]
    return world.fill_template(template, words), request


def neutral_prompts(category: str, n: int, seed: int) -> list[Prompt]:
    """n held-out prompts that name no concept of `category`, with what they request: a random template
    without the category's slot, filled_randomly."""
    usable = [t for t in HELD_OUT_TEMPLATES if category not in world.template_slots(t)]
    rng = np.random.default_rng([seed, 0x4E7])
    return [fill_randomly(usable[int(rng.integers(len(usable)))], rng) for _ in range(n)]


def prompt_sets(concept: str, sizes: Sizes = Sizes(), seed: int = 0) -> dict[str, list[Prompt]]:
    """The prompt sets of one concept's report, each a list of (prompt, request), deterministic for a seed:
    "erase" (canonical name), "erase/<variant>" for VARIANTS, "related/<other concept>" for each other
    concept of the category, "content", "neutral" and "unrelated". Held-out templates only. A concept's
    "related" prompts are the first `sizes.related` of that concept's own "erase" prompts, so across a
    sweep the base model draws them once; "neutral" depends on the category only."""
    cat = world.category_of(concept)
    sets = {"erase": concept_prompts(concept, sizes.erase, seed)}
    for v in VARIANTS:
        kw = {"templates": ROBUST_TEMPLATES} if v == "paraphrase" else {"spelling": v}
        sets[f"erase/{v}"] = concept_prompts(concept, sizes.variant, seed, **kw)
    for other in world.CONCEPTS[cat]:
        if other != concept:
            sets[f"related/{other}"] = concept_prompts(other, sizes.related, seed)
    sets["content"] = concept_prompts(concept, sizes.content, seed + 3, templates=FULL_TEMPLATES)
    sets["neutral"] = neutral_prompts(cat, sizes.neutral, seed)
    sets["unrelated"] = unrelated_prompts(concept, sizes.unrelated, seed + 2)
    return sets


def items_of(prompts: list[Prompt], seeds: list[int]) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs of a set: every prompt with every seed, seed-major."""
    return [(p, s) for s in seeds for p, _ in prompts]


# ---------------------------------------------------------------------------------------------------
# Images: per-image noise, batched sampling, the base-image cache


def image_seed(prompt: str, seed: int) -> int:
    """The noise seed of the image of (prompt, seed): a 63-bit hash, so the image depends on neither the
    batch nor the other prompts; `python sample.py --prompt P --seed image_seed(P, s)` draws it alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "big") >> 1


def sampling_settings(zi: C.ZImage) -> dict:
    """The settings every evaluation image is drawn with: the model's stored defaults (zerase.json)."""
    d = {**TURBO, **zi.defaults}
    return {"height": d["height"], "width": d["width"], "steps": d["steps"], "guidance": d["guidance"],
            "shift": zi.scheduler.shift, "negative_prompt": ""}


@torch.no_grad()
def sample_images(zi: C.ZImage, items: list[tuple[str, int]], batch: int = BATCH) -> np.ndarray:
    """uint8 (len(items), H, W, 3): the model's image of each (prompt, seed), drawn `batch` at a time
    with the sampling settings and the noise of image_seed (the sampler of sample.generate)."""
    d = sampling_settings(zi)
    sigmas = turbo_sigmas(d["steps"], d["shift"])
    null = zi.encode_prompts([d["negative_prompt"]]) if d["guidance"] > 0 else None
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        noise = torch.cat([initial_noise(1, zi.transformer.cfg.in_channels, d["height"], d["width"],
                                         zi.vae_scale_factor, image_seed(p, s)) for p, s in chunk])
        cond = zi.encode_prompts([p for p, _ in chunk])
        latents = denoise(zi.transformer, noise.to(zi.device), cond, sigmas,
                          null * len(chunk) if null is not None else None, d["guidance"])
        out.append(to_uint8(zi.vae.latents_to_image(latents)).numpy())
    h, w = d["height"], d["width"]
    return np.concatenate(out) if out else np.empty((0, h, w, 3), np.uint8)


def _digest(modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_key(zi: C.ZImage) -> str:
    """Identity of a base model's images: the DiT's fingerprint (lora_file.base_fingerprint), a hash of the
    text encoder and VAE weights, the sampling settings and the noise scheme. Refuses a model whose LoRA
    is active: its images are not base images."""
    if any(m.enabled for m in Z.lora_modules(zi.transformer).values()):
        raise ValueError("the base-image cache takes only a model without an active LoRA; pass the base "
                         "model (or disable the LoRA with zerase.lora_disabled).")
    if getattr(zi, "_eval_key", None) is None:
        parts = [lora_file.base_fingerprint(zi.transformer), _digest([zi.text_encoder, zi.vae]),
                 json.dumps(sampling_settings(zi), sort_keys=True), NOISE_SCHEME]
        zi._eval_key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return zi._eval_key


class ImageCache:
    """Base-model images by (model key, prompt, seed): in memory, and as PNG files under `path` when given
    (one file per image, written atomically, so parallel evaluations can share the folder)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.memory: dict[tuple[str, str, int], np.ndarray] = {}

    def _file(self, key: str, prompt: str, seed: int) -> Path:
        h = hashlib.sha256(f"{prompt}\0{seed}".encode()).hexdigest()
        return self.path / key / h[:2] / f"{h}.png"

    def get(self, key: str, prompt: str, seed: int) -> np.ndarray | None:
        """The stored image, or None."""
        img = self.memory.get((key, prompt, seed))
        if img is None and self.path is not None:
            f = self._file(key, prompt, seed)
            if f.is_file():
                from PIL import Image
                img = self.memory[(key, prompt, seed)] = np.asarray(Image.open(f).convert("RGB"))
        return img

    def put(self, key: str, prompt: str, seed: int, img: np.ndarray) -> None:
        self.memory[(key, prompt, seed)] = img
        if self.path is not None:
            from PIL import Image
            f = self._file(key, prompt, seed)
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, f)


def images(zi: C.ZImage, items: list[tuple[str, int]], cache: ImageCache | None = None,
           batch: int = BATCH) -> tuple[np.ndarray, int]:
    """uint8 (len(items), H, W, 3) images of (prompt, seed) pairs and how many were drawn: duplicates are
    drawn once; with a cache (base models only), stored images are reused and new ones stored."""
    unique = list(dict.fromkeys(items))
    key = model_key(zi) if cache is not None else None
    got = {it: cache.get(key, *it) for it in unique} if cache is not None else {}
    todo = [it for it in unique if got.get(it) is None]
    for it, img in zip(todo, sample_images(zi, todo, batch) if todo else []):
        got[it] = img
        if cache is not None:
            cache.put(key, *it, img)
    return np.stack([got[it] for it in items]), len(todo)


# ---------------------------------------------------------------------------------------------------
# Measures


def accuracy(pred: dict, requests: list[Request], category: str) -> float:
    """Share of images whose `category` prediction equals what their prompt requested."""
    want = torch.tensor([r[category] for r in requests])
    return (pred[category] == want).float().mean().item()


def _hits(pred: dict, rows: list[int], requests: list[Request], head: str) -> torch.Tensor:
    """1.0 where the head's prediction on image rows[i] equals requests[i][head], else 0.0."""
    want = torch.tensor([r[head] for r in requests], dtype=torch.long)
    return (pred[head][torch.tensor(rows, dtype=torch.long)] == want).float()


def _mean(x: torch.Tensor) -> float | None:
    return x.mean().item() if len(x) else None


def paired_se(kept: dict) -> float | None:
    """The standard error of erased - base for a Scored.kept() figure, from its own numbers: the same images
    under both models, so the difference is a mean of per-image d in {-1, 0, +1}. With b, e the accuracies
    and r "retained", P(d = -1) = b(1 - r) (lost) and P(d = +1) = e - b·r (gained), so
    Var(d) = lost + gained - (e - b)^2 and SE = sqrt(Var(d) / n). It treats the n images as independent;
    the seeds of one prompt are not quite, so read it as a lower bound on the noise."""
    b, e, n = kept["base"], kept["erased"], kept["n"]
    if b is None or e is None or not n:
        return None
    both = b * kept["retained"] if kept["retained"] is not None else 0.0  # r is None only when b = 0
    var = b - both + e - both - (e - b) ** 2
    return math.sqrt(max(var, 0.0) / n)


def ground_truth_accuracy(requests: list[Request], clf, seed: int = 0) -> dict[str, float]:
    """Per head named by the requests: the classifier's accuracy on the world's ground-truth renders of
    them (attributes a request leaves open drawn at random), i.e. whether the classifier can read that
    head on such images at all."""
    rng = np.random.default_rng([seed, 0x671])
    imgs = []
    for r in requests:
        r = dict(r)
        r.setdefault("entity", int(rng.integers(len(world.ENTITIES))))
        r.setdefault("colour", int(rng.integers(len(world.COLOURS))))
        r.setdefault("style", int(rng.integers(len(world.STYLE_CLASSES))))
        draw = np.random.default_rng(rng.integers(2**63))
        imgs.append(world.render(r["entity"], r["colour"], r["style"], draw))
    pred = score(world.to_tensor(np.stack(imgs)), clf)
    heads = [h for h in HEADS if any(h in r for r in requests)]
    return {h: _mean(_hits(pred, [i for i, r in enumerate(requests) if h in r],
                           [r for r in requests if h in r], h)) for h in heads}


def _histogram(pred: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    counts = torch.bincount(pred, minlength=len(classes)).float()
    return {c: (counts[i] / max(1, len(pred))).item() for i, c in enumerate(classes)}


@dataclass
class Scored:
    """The classifier on both models' images of one report: pred["base"] and pred["erased"] are score()'s
    dicts over the same image rows; rows[name] are the rows of prompt set `name` and requests[name] what
    each of those images' prompts asks for."""
    pred: dict[str, dict[str, torch.Tensor]]
    rows: dict[str, list[int]]
    requests: dict[str, list[Request]]

    def hits(self, names: list[str], head: str) -> dict[str, torch.Tensor]:
        """Per model, 1.0 / 0.0 for each image of the sets `names` whose prompt names `head`: head right?"""
        pairs = [(i, r) for n in names for i, r in zip(self.rows[n], self.requests[n]) if head in r]
        rows, reqs = [i for i, _ in pairs], [r for _, r in pairs]
        return {k: _hits(p, rows, reqs, head) for k, p in self.pred.items()}

    def accuracy(self, names: list[str], head: str) -> dict[str, float | None]:
        """{"base": ..., "erased": ...}: the head's accuracy over the images of the sets `names`."""
        return {k: _mean(h) for k, h in self.hits(names, head).items()}

    def kept(self, name: str, head: str) -> dict:
        """accuracy(), "retained" (of the images whose base head is right, the share whose erased image is
        right too: what users lose where the base model delivers) and "n" (images)."""
        h = self.hits([name], head)
        return {"base": _mean(h["base"]), "erased": _mean(h["erased"]),
                "retained": _mean(h["erased"][h["base"] == 1]), "n": len(h["base"])}

    def fd(self, name: str) -> float:
        """Fréchet distance between the classifier features of the base and the erased images of a set."""
        rows = torch.tensor(self.rows[name], dtype=torch.long)
        return frechet_distance(self.pred["base"]["features"][rows], self.pred["erased"]["features"][rows])


def layout(sets: dict[str, list[Prompt]], seeds: list[int], unconditional: int):
    """Every image of a report in one list of (prompt, seed), and per set its rows in that list and the
    requests of those rows; the set "unconditional" is the empty prompt with seeds 0 .. unconditional-1."""
    items, rows, requests = [], {}, {}
    for name, prompts in sets.items():
        rows[name] = list(range(len(items), len(items) + len(prompts) * len(seeds)))
        items += items_of(prompts, seeds)
        requests[name] = [r for _ in seeds for _, r in prompts]
    rows["unconditional"] = list(range(len(items), len(items) + unconditional))
    items += [("", k) for k in range(unconditional)]
    requests["unconditional"] = [{} for _ in range(unconditional)]
    return items, rows, requests


def _erasure_measures(s: Scored, concept: str) -> dict:
    """Acc_e (canonical and per variant), Acc_ir (pooled and per other concept) and H_a."""
    cat = world.category_of(concept)
    others = [c for c in world.CONCEPTS[cat] if c != concept]
    acc_e = s.accuracy(["erase"], cat)
    acc_ir = s.accuracy([f"related/{c}" for c in others], cat)  # pooled: every concept weighs the same
    return {"Acc_e": acc_e, "Acc_e_variants": {v: s.accuracy([f"erase/{v}"], cat) for v in VARIANTS},
            "Acc_ir": acc_ir, "Acc_ir_by_concept": {c: s.accuracy([f"related/{c}"], cat) for c in others},
            "H_a": acc_ir["erased"] - acc_e["erased"]}


def _heads_measure(s: Scored, name: str, heads: list[str], prompts: list[Prompt], clf, seed: int) -> dict:
    """Per head: Scored.kept on set `name`, and the classifier's accuracy on ground-truth renders of it."""
    gt = ground_truth_accuracy([r for _, r in prompts], clf, seed)
    return {h: {**s.kept(name, h), "ground_truth": gt.get(h)} for h in heads}


def _unconditional(s: Scored, concept: str) -> dict:
    """The empty prompt's class histogram per head, the erased concept's share, the total variation
    between the base and erased histograms, and the FD between their images."""
    cat = world.category_of(concept)
    u = torch.tensor(s.rows["unconditional"], dtype=torch.long)
    hist = {h: {k: _histogram(p[h][u], CLASSES[h]) for k, p in s.pred.items()} for h in HEADS}
    tv = {h: 0.5 * sum(abs(hist[h]["base"][c] - hist[h]["erased"][c]) for c in CLASSES[h]) for h in HEADS}
    return {"n": len(u), "histogram": hist, "concept_share": {k: hist[cat][k][concept] for k in s.pred},
            "total_variation": tv, "FD": s.fd("unconditional")}


def erasure_report(zi_base, zi_erased, clf, concept: str, n: int, seeds: list[int], *,
                   sizes: Sizes | None = None, cache: ImageCache | None = None, prompt_seed: int = 0,
                   batch: int = BATCH) -> dict:
    """The erasure report of `concept` (module docstring) as a JSON-serialisable dict: every measure as
    {"base": ..., "erased": ...}, from the same prompts and seeds for both models. n: canonical prompts
    (the other sets scale with it, Sizes.from_n) unless `sizes` is given; base images come from `cache`
    when it holds them (and new ones go into it)."""
    t0 = time.perf_counter()
    cat = world.category_of(concept)
    sizes = sizes or Sizes.from_n(n)
    sets = prompt_sets(concept, sizes, prompt_seed)
    items, rows, requests = layout(sets, seeds, sizes.unconditional)
    base_imgs, drawn_base = images(zi_base, items, cache, batch)
    t1 = time.perf_counter()
    erased_imgs, drawn_erased = images(zi_erased, items, None, batch)
    t2 = time.perf_counter()
    s = Scored({"base": score(world.to_tensor(base_imgs), clf),
                "erased": score(world.to_tensor(erased_imgs), clf)}, rows, requests)
    named = [h for h in HEADS if any(h in r for r in requests["neutral"])]
    return {
        "concept": concept, "category": cat, "seeds": list(seeds), "sizes": asdict(sizes),
        "prompt_seed": prompt_seed, **_erasure_measures(s, concept),
        "content_kept": _heads_measure(s, "content", [h for h in HEADS if h != cat], sets["content"], clf,
                                       prompt_seed),
        "neutral": _heads_measure(s, "neutral", named, sets["neutral"], clf, prompt_seed),
        "unconditional": _unconditional(s, concept), "FD": s.fd("unrelated"),
        "images": {"total": len(items), "unique": len(set(items)), "drawn_base": drawn_base,
                   "drawn_erased": drawn_erased},
        "seconds": {"base_images": round(t1 - t0, 1), "erased_images": round(t2 - t1, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }


def _ba(v: dict, fmt: str = ".2f") -> str:
    f = (lambda x: "-" if x is None else format(x, fmt))  # noqa: E731
    return f"{f(v['base'])}->{f(v['erased'])}"


def _format_heads(d: dict) -> str:
    """One head measure as "entity 0.95->0.93 ret 0.97 (gt 1.00, n 96)"; a head whose base accuracy is
    below TRUST is marked "(base low)"."""
    def one(h, v):
        ret = "-" if v["retained"] is None else f"{v['retained']:.2f}"
        gt = "-" if v["ground_truth"] is None else f"{v['ground_truth']:.2f}"
        low = " (base low)" if v["base"] is not None and v["base"] < TRUST else ""
        return f"{h} {_ba(v)} ret {ret} (gt {gt}, n {v['n']}){low}"
    return "  ".join(one(h, v) for h, v in d.items())


def format_report(r: dict) -> str:
    """A compact printout of erasure_report's dict: one line per measure, base -> erased; "ret" is the
    share of base-right images the erased model keeps right, "gt" the classifier on ground truth."""
    u, s = r["unconditional"], r["sizes"]
    return "\n".join([
        f"{r['concept']} ({r['category']}), seeds {r['seeds']}, base -> erased",
        f"  Acc_e    canonical {_ba(r['Acc_e'])}  "
        + "  ".join(f"{k} {_ba(v)}" for k, v in r["Acc_e_variants"].items()),
        f"  Acc_ir   {_ba(r['Acc_ir'], '.3f')}   H_a {r['H_a']:.3f}   "
        + ", ".join(f"{c} {_ba(v)}" for c, v in r["Acc_ir_by_concept"].items()),
        f"  kept     {_format_heads(r['content_kept'])}   ({s['content']} prompts naming {r['concept']} and "
        f"both other attributes)",
        f"  neutral  {_format_heads(r['neutral'])}   ({s['neutral']} prompts naming no {r['category']})",
        f"  uncond   FD {u['FD']:.2f}   {r['concept']} share {_ba(u['concept_share'])}   total variation "
        + " ".join(f"{h} {v:.2f}" for h, v in u["total_variation"].items()) + f"   ({u['n']} images)",
        f"  FD unrelated {r['FD']:.2f}",
        f"  {r['images']['unique']} images per model (base: {r['images']['drawn_base']} drawn, the rest "
        f"cached); {r['seconds']['total']:.0f} s (base {r['seconds']['base_images']:.0f} s, "
        f"erased {r['seconds']['erased_images']:.0f} s)"])


# ---------------------------------------------------------------------------------------------------
# The base model: per-concept table and per-style reliability of the heads


def concept_accuracy(zi, clf, concept: str, n: int, seeds: list[int], cache: ImageCache | None = None,
                     **kw) -> float:
    """Accuracy of the concept's category head on n held-out prompts that ask for it (concept_prompts
    keywords: templates, spelling), every prompt with every seed."""
    prompts = concept_prompts(concept, n, 0, **kw)
    imgs, _ = images(zi, items_of(prompts, seeds), cache)
    return accuracy(score(world.to_tensor(imgs), clf), [r for _ in seeds for _, r in prompts],
                    world.category_of(concept))


def base_table(zi, clf, n: int, seeds: list[int], cache: ImageCache | None = None) -> dict:
    """Per-concept accuracy of the base model (README, "The embedded tiny model"), plus Van Gogh from its
    variants."""
    rows = {}
    for category, concepts in world.CONCEPTS.items():
        for c in concepts:
            rows[c] = {"category": category, "acc": concept_accuracy(zi, clf, c, n, seeds, cache)}
            print(f"  {category:<7} {c:<10} {rows[c]['acc']:.3f}", flush=True)
    robust = {}
    for spelling in ("alias", "misspelling", "held_out"):
        robust[spelling] = concept_accuracy(zi, clf, "Van Gogh", n, seeds, cache, spelling=spelling)
    robust["robust_templates"] = concept_accuracy(zi, clf, "Van Gogh", n, seeds, cache,
                                                  templates=ROBUST_TEMPLATES)
    means = {k: sum(r["acc"] for r in rows.values() if r["category"] == k) / len(world.CONCEPTS[k])
             for k in world.CONCEPTS}
    return {"per_concept": rows, "mean_by_category": means, "van_gogh_variants": robust}


def style_reliability(zi, clf, n: int, seeds: list[int], cache: ImageCache | None = None) -> dict:
    """Per style class (plain included): on n held-out prompts naming that style (or a {plain} backdrop)
    and a random entity and colour, each head's accuracy on the base model's images, on ground-truth
    renders of the same requests, and on their VAE round trips (encode, decode); plus the base model's
    colour confusion over all of them (rows: requested, columns: predicted). Tells whether a low figure
    is the model's fault (ground truth read fine) or the classifier's."""
    full_plain = [t for t in HELD_OUT_TEMPLATES if world.template_slots(t) == {"entity", "colour", "plain"}]
    out, confusion = {}, torch.zeros(len(world.COLOURS), len(world.COLOURS), dtype=torch.long)
    for si, style in enumerate(world.STYLE_CLASSES):
        rng = np.random.default_rng([si, 0x4E1])
        prompts, gts = [], []
        for k in range(n):
            r = {"entity": int(rng.integers(len(world.ENTITIES))),
                 "colour": int(rng.integers(len(world.COLOURS))), "style": si}
            words = {"entity": world.ENTITIES[r["entity"]], "colour": world.COLOURS[r["colour"]]}
            if style == "none":
                template, words["plain"] = full_plain[k % len(full_plain)], world.PLAIN_WORDS[k % 4]
            else:
                template, words["style"] = FULL_TEMPLATES[k % len(FULL_TEMPLATES)], style
            prompts.append((world.fill_template(template, words), r))
            gts.append(world.render(r["entity"], r["colour"], si, np.random.default_rng([si, k, 0x671])))
        reqs = [r for _ in seeds for _, r in prompts]
        imgs, _ = images(zi, items_of(prompts, seeds), cache)
        gt = world.to_tensor(np.stack(gts))
        with torch.no_grad():
            vae = zi.vae.decode(zi.vae.encode(gt)[0]).clamp(-1, 1)
        kinds = {"model": (score(world.to_tensor(imgs), clf), reqs),
                 "ground_truth": (score(gt, clf), [r for _, r in prompts]),
                 "vae_round_trip": (score(vae, clf), [r for _, r in prompts])}
        out[style] = {kind: {h: accuracy(p, rq, h) for h in HEADS} for kind, (p, rq) in kinds.items()}
        p = kinds["model"][0]["colour"]
        for want, got in zip([r["colour"] for r in reqs], p.tolist()):
            confusion[want, got] += 1
    return {"per_style": out, "n": n, "seeds": list(seeds),
            "colour_confusion": {"classes": list(world.COLOURS), "counts": confusion.tolist()}}


def template_reliability(zi, clf, n: int, seeds: list[int], cache: ImageCache | None = None) -> dict:
    """Per held-out template: on n prompts that fill it randomly (fill_randomly), each head it names: the
    accuracy on the base model's images (every seed) and on ground-truth renders of the same requests.
    A head low on the model's images and high on ground truth is a phrasing the model does not follow."""
    out = {}
    for ti, template in enumerate(HELD_OUT_TEMPLATES):
        rng = np.random.default_rng([ti, 0x7E3])
        prompts = [fill_randomly(template, rng) for _ in range(n)]
        imgs, _ = images(zi, items_of(prompts, seeds), cache)
        pred, reqs = score(world.to_tensor(imgs), clf), [r for _ in seeds for _, r in prompts]
        gt = ground_truth_accuracy([r for _, r in prompts], clf, ti)
        out[template] = {h: {"model": accuracy(pred, reqs, h), "ground_truth": gt[h]} for h in gt}
    return out


def reliability(zi, clf, n: int, seeds: list[int], cache: ImageCache | None = None) -> dict:
    """style_reliability, and template_reliability under "per_template"."""
    return {**style_reliability(zi, clf, n, seeds, cache),
            "per_template": template_reliability(zi, clf, n, seeds, cache)}


def style_grid(zi, path, entities=("circle", "star", "heart", "house", "tree", "moon"), seed=0) -> None:
    """One row per style (and a plain row), one column per entity, colours varied: a picture to look at."""
    from sample import grid, save_png
    prompts = [f"a {world.COLOURS[(i + j) % len(world.COLOURS)]} {e} in the style of {s}"
               for i, s in enumerate(world.STYLES) for j, e in enumerate(entities)]
    prompts += [f"a {world.COLOURS[j % len(world.COLOURS)]} {e} on a plain background"
                for j, e in enumerate(entities)]
    imgs = world.to_tensor(sample_images(zi, [(p, seed) for p in prompts]))
    big = torch.nn.functional.interpolate(imgs, scale_factor=2, mode="nearest")  # x2 so a person can see it
    save_png(grid(torch.from_numpy(world.to_uint8(big)), len(entities)), path)


def format_reliability(res: dict) -> str:
    """reliability()'s dict as a table: per style, each head on model / ground truth / VAE round trip, and
    the base model's colour confusion."""
    kinds = ("model", "ground_truth", "vae_round_trip")
    lines = [f"per style: accuracy of each head ({res['n']} prompts x {len(res['seeds'])} seeds naming the "
             f"style, an entity and a colour), base model / ground truth / VAE round trip"]
    for style, v in res["per_style"].items():
        lines.append(f"  {style:<10} " + "   ".join(
            f"{h} " + "/".join(f"{v[k][h]:.2f}" for k in kinds) for h in HEADS))
    cc = res["colour_confusion"]
    lines.append("colour confusion of the base model (row: asked, column: predicted): "
                 + ", ".join(cc["classes"]))
    lines += [f"  {c:<7} " + " ".join(f"{x:>4d}" for x in row) for c, row in zip(cc["classes"], cc["counts"])]
    lines.append("per held-out template: each head it names, base model / ground truth")
    lines += [f"  {t:<52} " + "   ".join(f"{h} {v['model']:.2f}/{v['ground_truth']:.2f}"
                                         for h, v in d.items()) for t, d in res["per_template"].items()]
    return "\n".join(lines)


def format_base_table(res: dict) -> str:
    """base_table()'s dict: the mean and minimum per category, and Van Gogh from its variants."""
    lines = []
    for k, v in res["mean_by_category"].items():
        lo = min(r["acc"] for r in res["per_concept"].values() if r["category"] == k)
        lines.append(f"mean {k:<7} {v:.3f}   min {lo:.3f}")
    lines += [f"Van Gogh via {k:<17} {v:.3f}" for k, v in res["van_gogh_variants"].items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Z-Image checkpoint directory; the classifier "
                   "reads the embedded tiny model's world")
    p.add_argument("--lora", action="append", help="LoRA file(s) to evaluate (averaged per Eq. 63); without "
                   "one, the base model's per-concept table")
    p.add_argument("--concept", action="append", help="erased concept(s) to score, any case (repeatable; "
                   "needs --lora); default: the concepts the LoRAs were trained on")
    p.add_argument("--prompts", type=int, default=20, help="canonical prompts per concept, >= 1; the other "
                   "sets scale with it (20: 12 per variant, 8 per other concept, 24 content, 32 neutral, "
                   "128 empty)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt, >= 1")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of cached base-model images")
    p.add_argument("--no-cache", action="store_true", help="draw every base image afresh, store nothing")
    p.add_argument("--threads", type=int, help="torch threads, >= 1 (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this .json file")
    p.add_argument("--grid", help="write a style x entity image grid of the base model to this .png and stop")
    p.add_argument("--reliability", action="store_true",
                   help="per style: each head on base images vs ground truth vs VAE round trips")
    return p


def _check(args) -> list[str] | None:
    """Every flag, before any weight loads (ValueError naming the flag and the fix); returns the concepts
    to score with --lora (as the world spells them), else None."""
    for flag in ("prompts", "seeds"):
        if (v := getattr(args, flag)) < 1:
            raise ValueError(f"--{flag} must be at least 1 (got {v}): every measure needs images to score.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {args.threads}); leave it out for torch's "
                         f"choice.")
    if args.grid and (args.lora or args.reliability or args.json):
        raise ValueError("--grid draws the base model and stops; run it without --lora, --reliability and "
                         "--json.")
    if args.reliability and args.lora:
        raise ValueError("--reliability scores the base model; run it without --lora.")
    if args.concept and not args.lora:
        raise ValueError("--concept names what a LoRA erased; pass the --lora to evaluate with it.")
    cfgs = C.read_configs(args.model)
    concepts = _concepts(args, cfgs) if args.lora else None
    for flag, value, suffix in (("--json", args.json, ".json"), ("--grid", args.grid, ".png")):
        if value:  # outputs last: checking creates a missing folder
            check_output(text(flag, value), flag, (suffix,))
    if not args.no_cache and not args.grid:
        check_folder(args.cache, "--cache")
    return concepts


def _concepts(args, cfgs: C.Configs) -> list[str]:
    """The concepts to score: --concept (any case), else those the LoRAs were trained on; each LoRA
    checked against the model before it loads (sample.check_loras)."""
    check_loras(args.lora, None, cfgs)
    known = [c for cs in world.CONCEPTS.values() for c in cs]
    if args.concept:
        found = [lookup("--concept", c, known, "the classifier scores no such concept") for c in args.concept]
        return list(dict.fromkeys(found))
    erased = [lora_file.read_lora(f)[1]["concept"] for f in args.lora]
    for f, c in zip(args.lora, erased):
        if c not in known:
            raise ValueError(f"--lora {f} erases {c!r}, which the classifier does not score; pass --concept "
                             f"with one it does ({', '.join(known)}).")
    return list(dict.fromkeys(erased))


@contextmanager
def progress(models: list, desc: str, total: int | None = None):
    """A progress bar (stderr) of the images the models draw, fed by their DiTs' calls: the sampler calls
    the DiT once per step for a batch of images (twice as many rows under CFG)."""
    from tqdm import tqdm
    bar, done, handles = tqdm(total=total, desc=desc, unit="img", file=sys.stderr), [0.0], []
    for zi in models:
        d = sampling_settings(zi)
        rows_per_image = d["steps"] * (2 if d["guidance"] > 0 else 1)

        def hook(module, inputs, rows_per_image=rows_per_image):
            done[0] += len(inputs[0]) / rows_per_image
            bar.update(round(done[0]) - bar.n)
        handles.append(zi.transformer.register_forward_pre_hook(hook))
    try:
        yield bar
    finally:
        for h in handles:
            h.remove()
        bar.close()


def _report_images(zi, concept: str, n: int, seeds: list[int], cache: ImageCache | None) -> int:
    """How many images erasure_report(zi, ..., concept, n, seeds, cache=cache) will draw: every distinct
    (prompt, seed) for the erased model, and those the cache lacks for the base model."""
    sizes = Sizes.from_n(n)
    unique = set(layout(prompt_sets(concept, sizes, 0), seeds, sizes.unconditional)[0])
    cached = sum(cache.get(model_key(zi), *it) is not None for it in unique) if cache is not None else 0
    return 2 * len(unique) - cached


def _run(args, concepts: list[str] | None) -> dict | list | None:
    """What main() does once the arguments are checked: one of --grid, --reliability, the base table, or
    the erasure report of each concept."""
    seeds = list(range(args.seeds))
    cache = None if args.no_cache else ImageCache(args.cache)
    with stage("loading the model and the classifier"):
        zi, clf = C.load_zimage(args.model), load_classifier()
    if args.grid:
        with progress([zi], "drawing the grid", (len(world.STYLES) + 1) * 6):  # style_grid's 6 entities
            style_grid(zi, args.grid)
        print(f"wrote {args.grid}")
        return None
    if args.reliability:
        with progress([zi], "drawing base images"):
            res = reliability(zi, clf, args.prompts, seeds, cache)
        print(format_reliability(res))
        return res
    if not args.lora:  # base_table prints a line per concept as it goes: no bar needed
        print(f"base model: {args.prompts} held-out prompts x {args.seeds} seeds per concept")
        res = base_table(zi, clf, args.prompts, seeds, cache)
        print(format_base_table(res))
        return res
    with stage(f"loading the model with {len(args.lora)} LoRA(s)"):
        erased = C.load_zimage(args.model)
        lora_file.apply_loras(erased.transformer, args.lora)
    res = []
    for c in concepts:
        total = _report_images(zi, c, args.prompts, seeds, cache)
        with progress([zi, erased], f"{c}: drawing images", total):
            res.append(erasure_report(zi, erased, clf, c, args.prompts, seeds, cache=cache))
        print(format_report(res[-1]), flush=True)
    return res


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        concepts = _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        res = _run(args, concepts)
        if args.json and res is not None:
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2)))
    except (CheckpointError, ValueError) as e:  # LoRAFileError is a ValueError
        die(str(e))
    except OutputError as e:
        die(str(e), code=1)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the bar or stage line it interrupted
        die("interrupted; no report was written (base images drawn so far stay in the cache).", code=130)
    return res


if __name__ == "__main__":
    main()
