"""
Where an erasure loses the rest of its concept's prompts: on the sweep's content prompts of one concept
(evaluate.prompt_sets, the same prompts and seeds as bench/sweep.py), the classifier's read of the other
heads on the base and the erased image of each, then a paste test that tells a local change from a global
one. For the largest changes (the pixels whose summed |erased - base| over RGB exceeds a threshold):
  "blob only":  the base image with those pixels taken from the erased one;
  "all but":    the erased image with those pixels put back from the base one.
If the head still reads the base's class on "blob only" but not on "all but", what the head lost is spread
over the image (e.g. the style's texture), not hidden under the erased concept's silhouette.

    python bench/content_probe.py --concept star --lora weights/loras/star.safetensors
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as C  # noqa: E402
import evaluate as E  # noqa: E402
import lora_file  # noqa: E402
from cli import die  # noqa: E402
from sweep import SIZES  # noqa: E402
from tiny import world  # noqa: E402
from tiny.classifier import load_classifier, score  # noqa: E402
from train import DEFAULT_MODEL  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--prompts", type=int, default=5, help="canonical prompts, as bench/sweep.py's --prompts "
                   "(the content set is sized as the sweep sizes it)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--thresholds", default="60,120,200", help="comma-separated, in summed RGB levels")
    a = p.parse_args(argv)
    known = [c for cs in world.CONCEPTS.values() for c in cs]
    if a.concept not in known:
        die(f"--concept {a.concept!r} is not a concept of the tiny world; use one of: {', '.join(known)}.")
    try:
        thresholds = [int(t) for t in a.thresholds.split(",")]
    except ValueError:
        die(f"--thresholds {a.thresholds!r}: give comma-separated integers, e.g. 60,120,200.")
    sizes = replace(E.Sizes.from_n(a.prompts), **SIZES)  # bench/sweep.py's sizes
    prompts = E.prompt_sets(a.concept, sizes)["content"]
    seeds = list(range(a.seeds))
    items = E.items_of(prompts, seeds)
    requests = [r for _ in seeds for _, r in prompts]
    base = C.load_zimage(DEFAULT_MODEL)
    erased = C.load_zimage(DEFAULT_MODEL)
    try:
        lora_file.apply_loras(erased.transformer, [a.lora], None)
    except (OSError, lora_file.LoRAFileError) as e:
        die(f"--lora {e}")  # lora_file's messages name the file and the fix
    ib, ie = E.sample_images(base, items), E.sample_images(erased, items)
    clf = load_classifier()

    def reads(imgs: np.ndarray) -> dict:
        return score(world.to_tensor(imgs), clf)

    pb, pe = reads(ib), reads(ie)
    heads = [h for h in E.CLASSES if h in requests[0]]
    for k, (prompt, seed) in enumerate(items):
        got = ", ".join(f"{h} {E.CLASSES[h][pb[h][k]]} -> {E.CLASSES[h][pe[h][k]]}" for h in heads)
        print(f"{prompt!r} seed {seed}: {got}")
    diff = np.abs(ie.astype(np.int32) - ib.astype(np.int32)).sum(-1)  # (n, H, W)
    for h in heads:
        print(f"{h}: the erased image reads as the base one in {int((pe[h] == pb[h]).sum())} of {len(items)}")
        for thr in thresholds:
            m = diff > thr
            blob, rest = ib.copy(), ie.copy()
            blob[m], rest[m] = ie[m], ib[m]
            kept_blob, kept_rest = (int((reads(x)[h] == pb[h]).sum()) for x in (blob, rest))
            print(f"  changes > {thr} ({m.mean():.0%} of pixels): blob only {kept_blob} of {len(items)}, "
                  f"all but {kept_rest} of {len(items)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
