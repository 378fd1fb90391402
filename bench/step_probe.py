"""
Which sampler steps an erasure needs, and which ones cost the rest of the prompt: a LoRA applied on the
sampler's first k steps only (the frozen model takes the rest), for several k, on bench/sweep.py's prompts and
seeds of one concept: its erased accuracy on the canonical prompts (Acc_e) and the other heads on its content
prompts (the concept named with the other two attributes). What --erase-steps trains is the first k steps'
erasure with the later steps left as they were; this shows what that can reach before anything is trained.

    python bench/step_probe.py --concept star --lora weights/loras/star.safetensors --k 0,4,5,6,8
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as C  # noqa: E402
import evaluate as E  # noqa: E402
import lora_file  # noqa: E402
import zerase as Z  # noqa: E402
from cli import die  # noqa: E402
from sweep import SIZES  # noqa: E402
from tiny import world  # noqa: E402
from tiny.classifier import load_classifier, score  # noqa: E402
from train import DEFAULT_MODEL  # noqa: E402


class FirstSteps:
    """Switch the LoRA on for the first k DiT calls of every sampling loop and off for the rest: the sampler
    makes exactly one call per step (CFG's two halves go as one batch), so call i is step i mod steps."""

    def __init__(self, dit, steps: int):
        self.mods, self.steps, self.k, self.calls = list(Z.lora_modules(dit).values()), steps, steps, 0
        self.forward = dit.forward
        dit.forward = self

    def __call__(self, *a, **kw):
        for m in self.mods:
            m.enabled = self.calls % self.steps < self.k
        self.calls += 1
        return self.forward(*a, **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--k", default="0,4,5,6,8", help="comma-separated numbers of first steps with the LoRA on")
    p.add_argument("--prompts", type=int, default=5, help="canonical prompts, as bench/sweep.py's --prompts")
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args(argv)
    known = [c for cs in world.CONCEPTS.values() for c in cs]
    if a.concept not in known:
        die(f"--concept {a.concept!r} is not a concept of the tiny world; use one of: {', '.join(known)}.")
    zi = C.load_zimage(DEFAULT_MODEL)
    steps = E.sampling_settings(zi)["steps"]
    try:
        ks = [int(k) for k in a.k.split(",")]
    except ValueError:
        ks = []
    if not ks or not all(0 <= k <= steps for k in ks):
        die(f"--k {a.k!r}: give comma-separated numbers of steps from 0 to {steps}, e.g. 0,4,5,6,{steps}.")
    try:
        lora_file.apply_loras(zi.transformer, [a.lora], None)
    except (OSError, lora_file.LoRAFileError) as e:
        die(f"--lora {e}")  # lora_file's messages name the file and the fix
    sets = E.prompt_sets(a.concept, replace(E.Sizes.from_n(a.prompts), **SIZES))  # bench/sweep.py's sets
    seeds, category = list(range(a.seeds)), world.category_of(a.concept)
    heads = [h for h in E.CLASSES if h != category]
    clf, switch = load_classifier(), FirstSteps(zi.transformer, steps)

    def accuracy(prompts, head: str) -> float:
        pred = score(world.to_tensor(E.sample_images(zi, E.items_of(prompts, seeds))), clf)[head]
        want = torch.tensor([r[head] for _ in seeds for _, r in prompts])
        return (pred == want).float().mean().item()

    n_e, n_c = len(sets["erase"]) * len(seeds), len(sets["content"]) * len(seeds)
    print(f"{a.concept}: LoRA on the first k of {steps} steps; Acc_e on {n_e} images, the other heads on "
          f"{n_c} content images")
    for k in ks:
        switch.k = k
        kept = ", ".join(f"{h} {accuracy(sets['content'], h):.2f}" for h in heads)
        print(f"k = {k}: Acc_e {accuracy(sets['erase'], category):.2f}; content kept: {kept}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
