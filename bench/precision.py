"""
The same erasure trained in float32 and in bfloat16 (same seed, defaults otherwise), side by side: does λ
follow the constraint in bf16, or rounding? Prints λ, g̃ and L_pr along the run (means over windows of
steps, from each run's .jsonl) and the erasure report's Acc_e / Acc_ir / FD of each LoRA.

    python bench/precision.py                         # Van Gogh, trains both (skips a LoRA that exists)
    python bench/precision.py --concept star --prompts 12 --seeds 4

In bf16, L_pr before and after an update differ by less than bf16's rounding of the losses, so g̃ from a
plain difference would follow noise; train.py's default `--gtilde auto` measures the change as a
forward-mode derivative in bf16 (see `pr_change` in train.py), which this bench puts to the test.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as C  # noqa: E402
import evaluate as E  # noqa: E402
import lora_file  # noqa: E402
from tiny.classifier import load_classifier  # noqa: E402

WINDOWS = [(1, 10), (11, 100), (101, 250), (251, 500), (501, 750), (751, 1000)]

PAPER = ("--anchor", "null")  # the paper's Eq. 5 target, the default when the README's figures were made


def train(concept: str, dtype: str, out: Path, extra: list[str]) -> dict:
    """Train unless the LoRA exists; returns the run's final log line ({"finished", "seconds", ...})."""
    if not out.exists():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--concept", concept, "--dtype", dtype,
                        "--out", str(out), *PAPER, *extra], check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    lines = [json.loads(s) for s in out.with_suffix(".jsonl").read_text().splitlines()]
    return {"steps": [r for r in lines if "step" in r], "end": lines[-1]}


def window_means(steps: list[dict], key: str) -> list[float]:
    return [float(np.mean([r[key] for r in steps if lo <= r["step"] <= hi])) for lo, hi in WINDOWS
            if any(lo <= r["step"] <= hi for r in steps)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="Van Gogh")
    p.add_argument("--out", default=str(ROOT / "out" / "precision"), help="where the two LoRAs go")
    p.add_argument("--prompts", type=int, default=12, help="canonical prompts of the erasure report")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("extra", nargs="*", help="train.py flags for both runs, after --")
    args = p.parse_args()
    slug = args.concept.lower().replace(" ", "-")
    runs = {dt: train(args.concept, dt, Path(args.out) / f"{slug}-{dt}.safetensors", args.extra)
            for dt in ("float32", "bfloat16")}
    print(f"{args.concept}: means over steps " + ", ".join(f"{lo}-{hi}" for lo, hi in WINDOWS))
    for key in ("lambda", "g_tilde", "L_pr"):
        for dt, run in runs.items():
            print(f"  {key:<8} {dt:<9} " + "  ".join(f"{v:9.4g}" for v in window_means(run["steps"], key)))
    for dt, run in runs.items():
        lam = [r["lambda"] for r in run["steps"]]
        print(f"  {dt}: λ final {lam[-1]:.3f}, max {max(lam):.3f}; {run['end']['seconds']:.0f} s")
    base, clf, cache = C.load_zimage(E.DEFAULT_MODEL), load_classifier(), E.ImageCache()
    for dt in runs:
        erased = C.load_zimage(E.DEFAULT_MODEL)  # sampled in fp32 either way: only the training differs
        lora_file.apply_loras(erased.transformer, [Path(args.out) / f"{slug}-{dt}.safetensors"])
        r = E.erasure_report(base, erased, clf, args.concept, args.prompts, list(range(args.seeds)),
                             cache=cache)
        print(f"  {dt}: Acc_e {r['Acc_e']['base']:.3f} -> {r['Acc_e']['erased']:.3f}, Acc_ir "
              f"{r['Acc_ir']['base']:.3f} -> {r['Acc_ir']['erased']:.3f}, FD {r['FD']:.2f}")


if __name__ == "__main__":
    main()
