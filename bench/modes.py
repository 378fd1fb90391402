"""
The cost of each modulation mode (claim 7): `train.py --mode implicit` (one backward per step, Algorithm 1)
against `--mode exact` (two backwards and the closed-form d*, Eqs. 11-12), the same concept and steps, run
alternately (implicit, exact, implicit, exact, ...) so that both see the same machine; prints the loop's
seconds per step and the peak RSS of each run, and the exact / implicit ratio of the medians, and writes
them to bench/results/modes.json, which docs/claims.md's claim 7 reads for its cost verdict.

    python bench/modes.py                     # Van Gogh, 200 steps, 2 rounds, on the embedded tiny model
    python bench/modes.py --steps 1000 --rounds 3 --threads 1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import atomic_write  # noqa: E402


def run(mode: str, steps: int, threads: int, out: Path) -> dict:
    """One training run in its own process; its loop seconds (from the log) and peak RSS."""
    code = ("import resource, sys, train; train.main(sys.argv[1:]); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    cmd = [sys.executable, "-c", code, "--concept", "Van Gogh", "--mode", mode, "--steps", str(steps),
           "--checkpoint-every", str(steps), "--out", str(out), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    rss = int([line for line in r.stderr.splitlines() if line.startswith("RSS")][-1].split()[1])
    last = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[-1])
    return {"mode": mode, "s_per_step": last["seconds"] / steps, "peak_rss_mb": rss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "modes.json",
                   help="where the figures go (docs/claims.md's claim 7 reads them; default %(default)s)")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            for mode in ("implicit", "exact"):
                rows.append(run(mode, a.steps, a.threads, Path(tmp) / f"{mode}{i}.safetensors"))
                r = rows[-1]
                print(f"{mode:<9} round {i + 1}: {r['s_per_step'] * 1e3:.1f} ms/step, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB", flush=True)
    modes = ("implicit", "exact")
    med = {m: statistics.median(r["s_per_step"] for r in rows if r["mode"] == m) for m in modes}
    rss = {m: max(r["peak_rss_mb"] for r in rows if r["mode"] == m) for m in modes}
    print(f"median ms/step: implicit {med['implicit'] * 1e3:.1f}, exact {med['exact'] * 1e3:.1f} "
          f"(exact / implicit {med['exact'] / med['implicit']:.2f}); peak RSS implicit "
          f"{rss['implicit']:.0f} MB, exact {rss['exact']:.0f} MB ({a.steps} steps, {a.threads} threads, "
          f"{a.rounds} rounds)")
    figures = {"steps": a.steps, "rounds": a.rounds, "threads": a.threads, "runs": rows,
               "median_ms_per_step": {m: med[m] * 1e3 for m in modes}, "peak_rss_mb": rss}
    atomic_write(a.json, lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=1) + "\n"))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
