"""
Does the working tree train exactly as an earlier revision did? Runs the same short train.py commands in a
copy of that revision and in this tree, and compares what each wrote: the LoRA tensors byte for byte, the
LoRA metadata (all but timings), and the per-step log.

    python bench/same_behaviour.py --before HEAD~3          # implicit, exact, fixed λ, --no-gate
    python bench/same_behaviour.py --before v1 --steps 30 --extra "--pool 4"

For refactoring: a change that is meant to leave behaviour alone must print "same" for every mode. Both
trees run on this machine with one torch thread, so floating-point results are comparable bit for bit.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"implicit": [], "exact": ["--mode", "exact"], "fixed-lambda": ["--fixed-lambda", "0.5"],
         "no-gate": ["--no-gate"]}
TIMINGS = ("train_seconds",)  # metadata that records wall time, not behaviour


def export(rev: str, dest: Path) -> Path:
    """The files of git revision `rev`, written to dest (no checkout, no change to this tree)."""
    archive = dest / "rev.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def run(tree: Path, out: Path, concept: str, flags: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", "import torch, sys; torch.set_num_threads(1); sys.argv = ['train.py'] + "
           f"sys.argv[1:]; import runpy; runpy.run_path({str(tree / 'train.py')!r}, run_name='__main__')",
           "--concept", concept, "--out", str(out), *flags]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def contents(out: Path) -> tuple[dict, dict, str]:
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    settings = {k: v for k, v in json.loads(meta.pop("settings")).items() if k not in TIMINGS}
    steps = [r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()) if "step" in r]
    return tensors, {**meta, "settings": settings}, steps  # the log's closing line holds wall times


def settings_added(before: dict, now: dict) -> list[str]:
    """Settings only the newer tree records, at a value: a new flag whose default is the old behaviour."""
    was, got = before["settings"], now["settings"]
    rest = [{k: v for k, v in m.items() if k != "settings"} for m in (before, now)]
    if rest[0] != rest[1] or not set(was) <= set(got) or any(got[k] != was[k] for k in was):
        return []
    return sorted(set(got) - set(was))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare with (e.g. HEAD, a commit id)")
    p.add_argument("--concept", default="Van Gogh")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--extra", default="", help="more train.py flags for every run")
    args = p.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = export(args.before, tmp)
        for mode in args.modes.split(","):
            flags = ["--steps", str(args.steps), *MODES[mode], *args.extra.split()]
            got = {}
            for name, tree in (("before", before), ("now", ROOT)):
                out = tmp / name / f"{mode}.safetensors"
                run(tree, out, args.concept, flags)
                got[name] = contents(out)
            (tb, mb, lb), (tn, mn, ln) = got["before"], got["now"]
            added = settings_added(mb, mn) if mb != mn else []
            diffs = [what for what, same in (("tensors", tb == tn), ("metadata", mb == mn or added),
                                             ("log", lb == ln)) if not same]
            differ += bool(diffs)
            new = ", ".join(f"{k}={mn['settings'][k]!r}" for k in added)
            note = f" (new settings recorded: {new})" if added and not diffs else ""
            print(f"{mode:<13} {'same' if not diffs else 'DIFFERENT: ' + ', '.join(diffs)}{note}", flush=True)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
