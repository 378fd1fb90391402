"""
Erasure on the embedded tiny model, end to end: train with the defaults (`python train.py --concept X`,
timed as a user runs it), then score with the concept classifier (evaluate.py). Prints one table.

    python bench/erasure.py                  # every run below
    python bench/erasure.py --runs van-gogh,star,merged --json out/erasure.json

Rows: a style, an entity and two colours (green, the paper's own colour concept in Table 7, and red) with
the paper's defaults; Van Gogh again with --no-gate (the naive LoRA on the shared projections, side by
side); red again with the tighter ε of styles (Table 6: 1e-3 instead of 1e-2); the LoRAs for Van Gogh
and star averaged (Eq. 63, w = 1/2 each), once as trained with the defaults and once trained 3,000 steps
instead of 1,000 (averaging halves each LoRA; see README).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import checkpoint as C  # noqa: E402
import lora_file  # noqa: E402
from cli import atomic_write  # noqa: E402
from tiny.classifier import load_classifier  # noqa: E402

RUNS = [("van-gogh", "Van Gogh", []), ("van-gogh-nogate", "Van Gogh", ["--no-gate"]), ("star", "star", []),
        ("green", "green", []), ("red", "red", []), ("red-eps1e-3", "red", ["--eps", "1e-3"]),
        ("van-gogh-3000", "Van Gogh", ["--steps", "3000"]),
        ("star-3000", "star", ["--steps", "3000"])]  # (name, concept, train.py flags)
MERGES = [("merged", ["van-gogh", "star"]), ("merged-3000", ["van-gogh-3000", "star-3000"])]

PAPER = ("--anchor", "null")  # the paper's Eq. 5 target, the default when the README's figures were made


def train(concept: str, extra: list[str], out: Path) -> float:
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), "--concept", concept, "--out", str(out), *PAPER, *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return time.time() - t0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "out" / "erasure"), help="where the LoRAs go")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--json")
    p.add_argument("--cache", default=str(E.DEFAULT_CACHE), help="folder of cached base-model images, "
                   "shared with evaluate.py, so every run (and process) scores against the same base images")
    p.add_argument("--no-cache", action="store_true", help="keep base images in memory for this run only")
    p.add_argument("--runs", help="comma-separated subset of the run names: " + ",".join(
        [r[0] for r in RUNS] + [m[0] for m in MERGES]) + " (a merge uses the LoRAs in --out)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run (experiments), "
                   "e.g. \"--fixed-lambda 10\"")
    args = p.parse_args()
    args.wanted = set(args.runs.split(",")) if args.runs else None
    if args.wanted is not None:
        if unknown := args.wanted - {r[0] for r in RUNS} - {m[0] for m in MERGES}:
            p.error(f"unknown run {sorted(unknown)[0]!r}; see --help for the run names.")
        for name, parts in MERGES:
            if name in args.wanted and (missing := [n for n in parts if n not in args.wanted
                                                    and not (Path(args.out) / f"{n}.safetensors").exists()]):
                lora = Path(args.out) / f"{missing[0]}.safetensors"
                p.error(f"{name} averages {' and '.join(parts)}, but {lora} does not exist; add {missing[0]} "
                        f"to --runs.")
    return args


def print_tables(rows: list[dict]) -> None:
    """The summary table, Acc_ir per concept, and every measure of each run (evaluate.format_report)."""
    print(f"\n{'run':<48} {'train s':>7} {'Acc_e base->erased':>19} {'Acc_ir base->erased':>20} {'H_a':>6} "
          f"{'FD':>7}  erased Acc_e (alias/misspelling/held-out/paraphrase)")
    for r in rows:
        rob = "/".join(f"{v['erased']:.2f}" for v in r["Acc_e_variants"].values())
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        print(f"{r['run']:<48} {secs:>7} {r['Acc_e']['base']:>9.3f} -> {r['Acc_e']['erased']:.3f} "
              f"{r['Acc_ir']['base']:>10.3f} -> {r['Acc_ir']['erased']:.3f} {r['H_a']:>6.3f} "
              f"{r['FD']:>7.2f}  {rob}")
    print("\nAcc_ir per other concept of the category, base -> erased:")
    for r in rows:
        print(f"  {r['run']}: " + ", ".join(f"{c} {v['base']:.2f}->{v['erased']:.2f}"
                                           for c, v in r["Acc_ir_by_concept"].items()))
    print("\nEvery measure, per run:")
    for r in rows:
        print(f"[{r['run']}]\n" + E.format_report(r))


def main():
    args = parse_args()
    wanted, out, seeds = args.wanted, Path(args.out), list(range(args.seeds))
    base, clf = C.load_zimage(E.DEFAULT_MODEL), load_classifier()
    cache = E.ImageCache(None if args.no_cache else args.cache)  # each base image is drawn once
    rows, files = [], {}
    for name, concept, extra in RUNS:
        files[name] = out / f"{name}.safetensors"
        if wanted is not None and name not in wanted:
            continue
        extra = extra + args.train_args.split()
        secs = train(concept, extra, files[name])
        erased = C.load_zimage(E.DEFAULT_MODEL)
        lora_file.apply_loras(erased.transformer, [files[name]])
        r = E.erasure_report(base, erased, clf, concept, args.prompts, seeds, cache=cache)
        r.update(run=" ".join([concept] + extra), train_seconds=round(secs, 1))
        rows.append(r)
        print(json.dumps(r), flush=True)
    concept_of = {name: concept for name, concept, _ in RUNS}
    for name, parts in MERGES:
        if wanted is not None and name not in wanted:
            continue
        merged = C.load_zimage(E.DEFAULT_MODEL)
        lora_file.apply_loras(merged.transformer, [files[n] for n in parts])  # w_i = 1/N (Eq. 63)
        for n in parts:
            r = E.erasure_report(base, merged, clf, concept_of[n], args.prompts, seeds, cache=cache)
            r.update(run=f"{concept_of[n]} ({name}: {' + '.join(parts)})", train_seconds=None)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print_tables(rows)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))


if __name__ == "__main__":
    main()
