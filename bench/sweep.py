"""
Erase every concept of the embedded tiny model's world (10 styles, 10 entities, 8 colours) with train.py's
defaults and score each erasure with evaluate.erasure_report on held-out templates. Writes one JSON row per
concept plus the mean and worst per category and per measure, prints a Markdown table, and draws one
picture per category.

    python bench/sweep.py                                   # -> bench/results/sweep.json, docs/sweep/*.png
    python bench/sweep.py --concepts "Van Gogh,star"         # a subset (the JSON then holds only these)
    python bench/sweep.py --out out/sweep/fixed --json bench/results/sweep-fixed.json \\
        --pictures docs/sweep/fixed -- --fixed-lambda 10      # other training flags, swept side by side

One process per concept, --jobs at a time (default: os.cpu_count()), each with cores // jobs torch threads.
A process trains <out>/loras/<name>.safetensors with `python train.py --concept X --out FILE <flags after
-->` unless that file exists, evaluates it (--prompts canonical prompts, the other sets scaled as
evaluate.Sizes.from_n does but with at least 8 content and 16 neutral prompts, every prompt with each of
--seeds seeds), draws the erased images of its picture strip, and writes <out>/rows/<name>.json. Rerunning
resumes: a concept with a row is skipped, a finished LoRA is not retrained, and with every row present the
JSON, table and pictures are rebuilt in seconds. <out>/settings.json pins the flags and sizes of an output
folder; other settings need another --out. Base images are drawn once for the whole sweep: they are shared
through an evaluate.ImageCache folder (--cache) that every process reads and writes. The defaults
(5 prompts, 4 seeds: 284 images per model and concept) fit the 28 concepts in about 100 minutes on two
CPU cores, of which training takes four fifths. The JSON's wall_seconds runs from the first concept's start
to the last one's end.

Measures per concept (points are accuracy x 100; a drop is base minus erased):
  Acc_e            erased accuracy on the canonical prompts, and the worst variant set;
  Acc_ir           pooled over the other concepts of the category, and the worst single concept's drop;
  content / neutral  the worst head's change (erased - base), on prompts naming the concept with the other
                   two attributes / on prompts naming no concept of the category, ± its standard error
                   (evaluate.paired_se); a target's "clear_misses" are the concepts that miss it by more
                   than two standard errors;
  uncond TV        the largest total variation between base and erased class histograms of the empty prompt;
  FD               Fréchet distance of classifier features on unrelated prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dataclasses import asdict, replace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import lora_file  # noqa: E402
from cli import atomic_write, die  # noqa: E402
from tiny import world  # noqa: E402

# measure: (row summary key, +1 if larger is worse else -1, target limit or None, what the target says)
MEASURES = {
    "acc_e": ("acc_e", 1, 0.10, "Acc_e <= 0.10 for every concept"),
    "acc_e_variant": ("acc_e_variant", 1, 0.20, "Acc_e <= 0.20 on every variant set"),
    "acc_ir_drop": ("acc_ir_drop", 1, 5.0, "Acc_ir drop <= 5 points for every concept"),
    "acc_ir_other_drop": ("acc_ir_other_drop", 1, None, "worst single other concept's drop (points)"),
    "content_delta": ("content_delta", -1, -10.0, "content kept: every head within 10 points of base"),
    "neutral_delta": ("neutral_delta", -1, -5.0, "neutral: every head within 5 points of base"),
    "uncond_tv": ("uncond_tv", 1, None, "unconditional histogram shift (largest total variation)"),
    "FD": ("FD", 1, None, "FD on unrelated prompts"),
}
MEAN_TARGETS = {"acc_ir_drop": (2.0, "Acc_ir drop <= 2 points on average over the sweep")}
PICTURE = {"own": 4, "neutral": 3, "other": 3}  # images per group of a picture row
SIZES = {"content": 8, "neutral": 16}  # more than Sizes.from_n(5) gives: the measures of what users lose


def name_of(concept: str) -> str:
    return concept.lower().replace(" ", "-")


def all_concepts() -> list[str]:
    return [c for cs in world.CONCEPTS.values() for c in cs]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "out" / "sweep" / "default"), help="LoRAs, rows and logs")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "sweep.json"))
    p.add_argument("--pictures", default=str(ROOT / "docs" / "sweep"), help="folder of the category pictures")
    p.add_argument("--cache", default=str(ROOT / "out" / "sweep" / "cache"), help="base-image cache folder")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="concepts at a time")
    p.add_argument("--prompts", type=int, default=5, help="canonical prompts per concept (evaluate.Sizes)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--size", action="append", metavar="SET=N", help="prompts of one set instead of "
                   f"Sizes.from_n's (fields: {', '.join(E.Sizes.__dataclass_fields__)}); default: "
                   + " ".join(f"--size {k}={v}" for k, v in SIZES.items()))
    p.add_argument("--concepts", help="comma-separated subset (default: every concept of the world)")
    p.add_argument("--rebuild", action="store_true", help="recompute the summaries, aggregates and "
                   "targets of --json from the reports its rows hold (after a change of this file's "
                   "measures; nothing is trained or drawn)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one concept, in its own process
    args = p.parse_args(argv)
    args.train_flags, args.out = flags, Path(args.out)
    args.concepts = [c.strip() for c in args.concepts.split(",")] if args.concepts else all_concepts()
    if unknown := [c for c in args.concepts if c not in all_concepts()]:
        p.error(f"unknown concept {unknown[0]!r}; the world's concepts: {', '.join(all_concepts())}")
    try:
        sizes = dict(kv.split("=") for kv in args.size) if args.size else SIZES
        args.sizes = replace(E.Sizes.from_n(args.prompts), **{k: int(v) for k, v in sizes.items()})
    except (ValueError, TypeError) as e:
        p.error(f"--size takes SET=N with a set of evaluate.Sizes ({e})")
    if args.jobs < 1 or args.prompts < 1 or args.seeds < 1:
        p.error("--jobs, --prompts and --seeds must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------
# One concept (the worker process): train, evaluate, picture strip


def train(concept: str, lora: Path, flags: list[str], threads: int, log: Path) -> dict:
    """train.py with the defaults (plus `flags`) unless the LoRA exists; its command, seed and seconds."""
    cmd = ["python", "train.py", "--concept", concept, "--out", os.path.relpath(lora, ROOT), *flags]
    if not lora.exists():
        resume = ["--resume"] if lora.with_suffix(".ckpt.safetensors").exists() else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(log, "w") as f:
            subprocess.run([sys.executable, *cmd[1:], *resume], cwd=ROOT, env=env, stdout=f, stderr=f,
                           check=True)
    last = json.loads(lora.with_suffix(".jsonl").read_text().splitlines()[-1])
    return {"command": shlex.join(cmd), "seed": lora_settings(lora)["seed"], "seconds": last.get("seconds"),
            "bytes": lora.stat().st_size, "settings": resolved_settings(lora)}


def lora_settings(lora: Path) -> dict:
    return json.loads(lora_file.read_lora(lora)[1]["settings"])


def resolved_settings(lora: Path) -> dict:
    """The settings train.py resolves per model and category rather than from flags alone (ε, η, β and the
    erase steps, which a model may store, and the anchor --anchor auto picks), as they were for this LoRA, so
    a comparison of sweeps (bench/sweep_compare.py) knows what each row ran at without reading flags. A LoRA
    from before --erase-steps existed was erased on every step: None, as train.py records that."""
    settings = lora_settings(lora)  # one read of the file, not one per key
    return {**{k: settings[k] for k in ("eps", "eta", "beta", "anchor")},
            "erase_steps": settings.get("erase_steps")}


def picture_items(concept: str) -> dict[str, list[tuple[str, int]]]:
    """The (prompt, seed) pairs of a concept's picture rows: its own canonical prompts, neutral prompts of
    its category, and one prompt of each of the next concepts of the category; all drawn in the report."""
    cat = world.category_of(concept)
    cs = world.CONCEPTS[cat]
    others = [cs[(cs.index(concept) + k) % len(cs)] for k in range(1, PICTURE["other"] + 1)]
    return {"own": [(p, 0) for p, _ in E.concept_prompts(concept, PICTURE["own"], 0)],
            "neutral": [(p, 0) for p, _ in E.neutral_prompts(cat, PICTURE["neutral"], 0)],
            "other": [(E.concept_prompts(o, 1, 0)[0][0], 0) for o in others]}


def worker(args) -> None:
    """Train, evaluate and draw one concept; writes <out>/rows/<name>.json and <out>/pictures/<name>.npz."""
    import torch
    import checkpoint as C
    from tiny.classifier import load_classifier
    concept, name, threads = args.worker, name_of(args.worker), max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.time()
    torch.set_num_threads(threads)
    lora = args.out / "loras" / f"{name}.safetensors"
    trained = train(concept, lora, args.train_flags, threads, args.out / "logs" / f"{name}.train.log")
    base, erased = C.load_zimage(E.DEFAULT_MODEL), C.load_zimage(E.DEFAULT_MODEL)
    lora_file.apply_loras(erased.transformer, [lora])
    cache = E.ImageCache(args.cache)
    report = E.erasure_report(base, erased, load_classifier(), concept, args.prompts,
                              list(range(args.seeds)), sizes=args.sizes, cache=cache)
    print(E.format_report(report), flush=True)
    items = picture_items(concept)
    flat = [it for group in items.values() for it in group]
    np.savez_compressed(args.out / "pictures" / f"{name}.npz", base=E.images(base, flat, cache)[0],
                        erased=E.images(erased, flat)[0], prompts=np.array([p for p, _ in flat]))
    row = {**report, "train": trained, "summary": summarise(report), "threads": threads,
           "started": round(started), "finished": round(time.time())}
    atomic_write(args.out / "rows" / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(row)))


def summarise(r: dict) -> dict:
    """The figures of the table and the targets from one erasure report (points = accuracy x 100)."""
    def pts(v):
        return 100 * (v["erased"] - v["base"])

    def worst_delta(heads):  # the worst head's change, where, and its standard error (points)
        h = min(heads, key=lambda h: pts(heads[h]))
        se = E.paired_se(heads[h])
        return round(pts(heads[h]), 1), h, None if se is None else round(100 * se, 1)
    variant = max(r["Acc_e_variants"], key=lambda v: r["Acc_e_variants"][v]["erased"])
    other = min(r["Acc_ir_by_concept"], key=lambda c: pts(r["Acc_ir_by_concept"][c]))
    (content, content_at, content_se), (neutral, neutral_at, neutral_se) = \
        worst_delta(r["content_kept"]), worst_delta(r["neutral"])
    tv = r["unconditional"]["total_variation"]
    return {"acc_e": round(r["Acc_e"]["erased"], 3), "acc_e_base": round(r["Acc_e"]["base"], 3),
            "acc_e_variant": round(r["Acc_e_variants"][variant]["erased"], 3), "acc_e_variant_at": variant,
            "acc_ir_base": round(r["Acc_ir"]["base"], 3), "acc_ir_erased": round(r["Acc_ir"]["erased"], 3),
            "acc_ir_drop": round(-pts(r["Acc_ir"]), 1),
            "acc_ir_other_drop": round(-pts(r["Acc_ir_by_concept"][other]), 1), "acc_ir_other_drop_at": other,
            "content_delta": content, "content_delta_at": content_at, "content_delta_se": content_se,
            "neutral_delta": neutral, "neutral_delta_at": neutral_at, "neutral_delta_se": neutral_se,
            "uncond_tv": round(max(tv.values()), 3), "uncond_tv_at": max(tv, key=tv.get),
            "uncond_FD": round(r["unconditional"]["FD"], 2), "FD": round(r["FD"], 2)}


# ---------------------------------------------------------------------------------------------------
# The sweep: processes, aggregates, table, pictures


def run_all(args) -> list[str]:
    """A worker process per concept without a row, --jobs at a time; the concepts that failed."""
    todo = [c for c in args.concepts if not (args.out / "rows" / f"{name_of(c)}.json").exists()]
    print(f"{len(args.concepts) - len(todo)} of {len(args.concepts)} concepts done; {len(todo)} to run, "
          f"{args.jobs} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def one(concept):
        cmd = [sys.executable, __file__, "--worker", concept, "--out", str(args.out), "--cache", args.cache,
               "--jobs", str(args.jobs), "--prompts", str(args.prompts), "--seeds", str(args.seeds),
               *[f"--size={k}={v}" for k, v in asdict(args.sizes).items()], "--", *args.train_flags]
        t0 = time.time()
        with open(args.out / "logs" / f"{name_of(concept)}.log", "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
        print(f"  {concept}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s "
              f"({time.strftime('%H:%M:%S')})", flush=True)
        return concept if rc else None
    with ThreadPoolExecutor(args.jobs) as pool:
        return [c for c in pool.map(one, todo) if c]


def covered_seconds(spans: list[tuple[float, float]]) -> float:
    """Wall time during which at least one of the (start, end) jobs ran: the length of the union of the
    intervals, so jobs side by side count once and the pauses between sessions of a resumed bench not at
    all (first start to last end would count both)."""
    wall, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        wall += max(0.0, end - max(start, reach))  # only the part past what is already covered
        reach = max(reach, end)
    return wall


def aggregate(rows: list[dict]) -> dict:
    """Per category and over the sweep: the mean and the worst (with its concept) of every measure."""
    out = {}
    for group in [*world.CONCEPTS, "all"]:
        rs = [r for r in rows if group in ("all", r["category"])]
        if not rs:
            continue
        out[group] = {}
        for m, (key, sign, _, _) in MEASURES.items():
            w = max(rs, key=lambda r: sign * r["summary"][key])
            out[group][m] = {"mean": round(float(np.mean([r["summary"][key] for r in rs])), 3),
                             "worst": w["summary"][key], "worst_concept": w["concept"]}
    return out


def targets(rows: list[dict], agg: dict) -> list[dict]:
    """Every target of the sweep: the worst concept's figure (or the mean) against the limit, met or not."""
    res = []
    for m, (key, sign, limit, text) in MEASURES.items():
        if limit is not None:
            a = agg["all"][m]
            res.append({"target": text, "measure": m, "limit": limit, "value": a["worst"],
                        "concept": a["worst_concept"], "met": sign * a["worst"] <= sign * limit,
                        "missed_by": [r["concept"] for r in rows if sign * r["summary"][key] > sign * limit]})
            if (se_key := f"{key}_se") in rows[0]["summary"]:  # a paired difference: a miss beyond noise?
                res[-1]["clear_misses"] = [
                    r["concept"] for r in rows if (se := r["summary"][se_key]) is not None
                    and sign * (r["summary"][key] - sign * 2 * se) > sign * limit]
    for m, (limit, text) in MEAN_TARGETS.items():
        v = agg["all"][m]["mean"]
        res.append({"target": text, "measure": m, "limit": limit, "value": v, "met": v <= limit})
    return res


def markdown(rows: list[dict], agg: dict) -> str:
    """The sweep table: one line per concept, then the mean and the worst per category and overall."""
    lines = ["| concept | category | Acc_e base→erased | worst variant Acc_e | Acc_ir base→erased "
             "(worst other concept Δ) | content kept worst head Δ | neutral worst head Δ | FD |",
             "|" + "---|" * 8]
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['concept']} | {r['category']} | {s['acc_e_base']:.2f}→{s['acc_e']:.2f} | "
                     f"{s['acc_e_variant']:.2f} ({s['acc_e_variant_at']}) | {s['acc_ir_base']:.3f}→"
                     f"{s['acc_ir_erased']:.3f} ({s['acc_ir_other_drop_at']} "
                     f"{0.0 - s['acc_ir_other_drop']:+.1f}) | "
                     f"{s['content_delta']:+.1f} ± {s['content_delta_se']} ({s['content_delta_at']}) | "
                     f"{s['neutral_delta']:+.1f} ± {s['neutral_delta_se']} ({s['neutral_delta_at']}) | "
                     f"{s['FD']:.2f} |")
    for group, a in agg.items():
        for kind in ("mean", "worst"):
            def f(m, fmt):
                v = a[m][kind] + 0.0  # no "-0.0"
                return format(v, fmt) + (f" ({a[m]['worst_concept']})" if kind == "worst" else "")
            lines.append(f"| **{kind}** | {group} | {f('acc_e', '.2f')} | {f('acc_e_variant', '.2f')} | "
                         f"drop {f('acc_ir_drop', '.1f')}, other {f('acc_ir_other_drop', '.1f')} | "
                         f"{f('content_delta', '+.1f')} | {f('neutral_delta', '+.1f')} | {f('FD', '.2f')} |")
    return "\n".join(lines)


def label(text: str, width: int, height: int):
    """A white PIL image with `text` in black, left-aligned and vertically centred."""
    from PIL import Image, ImageDraw, ImageFont
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((4, height // 2), text, fill="black", anchor="lm",
                             font=ImageFont.load_default(size=15))
    return img


def picture(category: str, out: Path, dest: Path) -> Path | None:
    """One picture per category: per concept a base row and an erased row of its own prompts, neutral
    prompts and other concepts' prompts (the same prompt and noise in both rows), with labels."""
    from PIL import Image
    strips = [(c, out / "pictures" / f"{name_of(c)}.npz") for c in world.CONCEPTS[category]]
    strips = [(c, np.load(f)) for c, f in strips if f.exists()]
    if not strips:
        return None
    side, lw, head = 64, 170, 28  # native size: a picture is ~830 px wide
    cols = sum(PICTURE.values())
    canvas = Image.new("RGB", (lw + cols * side + 2 * 8, head + len(strips) * (2 * side + 6)), "white")
    x = lw
    for group, k in PICTURE.items():
        canvas.paste(label({"own": "its own prompts", "neutral": f"prompts naming no {category}",
                            "other": "other concepts' prompts"}[group], k * side, head), (x, 0))
        x += k * side + 8
    for i, (concept, d) in enumerate(strips):
        for j, kind in enumerate(("base", "erased")):
            y = head + i * (2 * side + 6) + j * side
            canvas.paste(label(f"{concept}: {kind}", lw, side), (0, y))
            x = lw
            for n, img in enumerate(d[kind]):
                x += 8 if n in (PICTURE["own"], PICTURE["own"] + PICTURE["neutral"]) else 0
                canvas.paste(Image.fromarray(img), (x, y))
                x += side
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{category}.png"
    canvas.save(path)
    return path


def check_settings(args) -> dict:
    """The settings of this output folder; a folder made with other settings is refused."""
    settings = {"train_flags": args.train_flags, "prompts": args.prompts, "seeds": list(range(args.seeds)),
                "sizes": asdict(args.sizes)}
    f = args.out / "settings.json"
    if f.exists() and json.loads(f.read_text()) != settings:
        die(f"{args.out} holds a sweep with other settings ({f.read_text().strip()}); pass another --out.")
    for sub in ("loras", "rows", "logs", "pictures"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings))
    return settings


def figures(rows: list[dict]) -> dict:
    """Each row's summary, from its stored report (so a change of summarise needs no rerun), and the
    sweep's targets and aggregates over them."""
    for r in rows:
        r["summary"] = summarise(r)
    agg = aggregate(rows)
    return {"targets": targets(rows, agg), "aggregate": agg}


def write_sweep(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1)))


def rebuild(path: Path) -> dict:
    """A sweep JSON with its rows' summaries, the aggregates and the targets computed again from the stored
    reports; everything else (command, timings, pictures, the reports themselves) as it was."""
    try:
        res = json.loads(path.read_text())
        rows = res["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"--rebuild needs a sweep JSON written by this script ({path}: {e}).")
    res.update(figures(rows))
    write_sweep(path, res)
    return res


def report_targets(res: dict) -> None:
    for t in res["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}"
              + (f" ({t['concept']})" if "concept" in t else "")
              + (f"; beyond 2 SE: {', '.join(t['clear_misses']) or 'none'}" if "clear_misses" in t else ""))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.rebuild:
        res = rebuild(Path(args.json))
        print(markdown(res["rows"], res["aggregate"]))
        return report_targets(res)
    settings, t0 = check_settings(args), time.time()
    failed = run_all(args)
    wall = time.time() - t0
    rows = [json.loads(f.read_text()) for c in args.concepts
            if (f := args.out / "rows" / f"{name_of(c)}.json").exists()]
    for r in rows:
        if "anchor" not in r["train"].get("settings", {}) and (
                lora := args.out / "loras" / f"{name_of(r['concept'])}.safetensors").exists():
            r["train"]["settings"] = resolved_settings(lora)  # a row written before they were all kept
    span = covered_seconds([(r["started"], r["finished"]) for r in rows])
    pictures = [os.path.relpath(p, ROOT) for k in world.CONCEPTS
                if (p := picture(k, args.out, Path(args.pictures))) is not None]
    res = {"command": shlex.join(["python", "bench/sweep.py", *(argv or sys.argv[1:])]), **settings,
           "jobs": args.jobs, "threads_per_job": max(1, (os.cpu_count() or 1) // args.jobs),
           "wall_seconds": span,  # while at least one concept ran, over every resumed run (pauses apart)
           **figures(rows), "pictures": pictures, "rows": rows}
    write_sweep(Path(args.json), res)
    print(markdown(rows, res["aggregate"]))
    report_targets(res)
    print(f"this run {wall:.0f} s; the sweep, while any concept ran (over resumed runs): {span:.0f} s")
    print(f"wrote {args.json} and {', '.join(pictures)}")
    if failed:
        die(f"{len(failed)} concept(s) failed: {', '.join(failed)}; see {args.out / 'logs'}")


if __name__ == "__main__":
    main()
