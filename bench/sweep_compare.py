"""
Sweeps side by side: for each category of the tiny world, the mean and worst of every sweep measure in
each of several bench/sweep.py JSON files (one column group per file), as a Markdown table; then, per
concept, which file does better on each measure. The README's before/after table of --anchor is this.

    python bench/sweep_compare.py null=bench/results/sweep-null.json content=bench/results/sweep-content.json
    python bench/sweep_compare.py null=... content=... --defaults bench/results/sweep.json

--defaults FILE: with sweeps labelled by train.py's --anchor values, also the sweep of train.py's defaults,
assembled concept by concept: --anchor auto trains, for a concept, exactly the LoRA of the anchor
train.ANCHOR_BY_CATEGORY names for its category (tests/test_anchor.py), so its row is that sweep's row.
Where the model stores its own ε, η or erase steps for a category or its own β (zerase.json "eps", "eta",
"erase_steps", "beta"), every row must come from a sweep run with those, and with the anchor its category
gets (checked against what the row records, else its sweep's train.py flags --eps, --eta, --erase-steps,
--beta, --anchor); --category-from names the sweep for a category:

    python bench/sweep_compare.py null=... content=... eps3e-3=... --category-from entity=eps3e-3 \
        --defaults bench/results/sweep.json

Written as JSON in bench/sweep.py's layout (rows, aggregate, targets) with where each row came from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as C  # noqa: E402
import train  # noqa: E402
from cli import atomic_write  # noqa: E402
from sweep import MEASURES, aggregate, targets  # noqa: E402

SHOWN = ("acc_e", "acc_e_variant", "acc_ir_drop", "content_delta", "neutral_delta", "uncond_tv", "FD")


def load(spec: str) -> tuple[str, dict]:
    label, _, path = spec.rpartition("=")
    return label or Path(path).stem, json.loads(Path(path).read_text())


def table(sweeps: list[tuple[str, dict]]) -> str:
    """One row per (category, measure): mean / worst (concept) in each sweep; – where a sweep did not
    cover the category (a sweep of one category's concepts, e.g. an ε tried on the entities only)."""
    head = "| category | measure | " + " | ".join(label for label, _ in sweeps) + " |"
    lines = [head, "|---|---|" + "---|" * len(sweeps)]
    for cat in sweeps[0][1]["aggregate"]:
        for key in SHOWN:
            cells = []
            for _, d in sweeps:
                a = d["aggregate"].get(cat, {}).get(key)
                cells.append("–" if a is None
                             else f"{a['mean']:.3g} / {a['worst']:.3g} ({a['worst_concept']})")
            lines.append(f"| {cat} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins(a: tuple[str, dict], b: tuple[str, dict]) -> str:
    """Per category and measure: how many concepts `b` does better than `a` on, and worse (ties apart)."""
    rows_a = {r["concept"]: r for r in a[1]["rows"]}
    out = [f"| category | measure | {b[0]} better | {b[0]} worse |", "|---|---|---|---|"]
    for cat in a[1]["aggregate"]:
        for key in SHOWN:
            sign = MEASURES[key][1]  # +1: larger is worse
            diffs = [sign * (rows_a[r["concept"]]["summary"][key] - r["summary"][key])
                     for r in b[1]["rows"] if r["category"] == cat and r["concept"] in rows_a]
            better, worse = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
            out.append(f"| {cat} | {key} | {better} | {worse} |")
    return "\n".join(out)


def defaults(sweeps: list[tuple[str, dict]], category_from: dict[str, str] | None = None) -> dict:
    """The sweep of train.py's defaults from the sweeps of each --anchor value, or for a category named in
    `category_from` from the sweep given there (see the module doc)."""
    category_from = category_from or {}
    by_label = {label: {r["concept"]: r for r in d["rows"]} for label, d in sweeps}
    flags = {label: d.get("train_flags") or [] for label, d in sweeps}
    stored = C.read_configs(train.DEFAULT_MODEL).defaults
    rows, source = [], {}
    for r in sweeps[0][1]["rows"]:
        category = stored["categories"][r["concept"]]
        label = category_from.get(r["category"]) or train.ANCHOR_BY_CATEGORY.get(category, "null")
        if label not in by_label:
            raise SystemExit(f"no sweep labelled {label!r} (for {r['concept']!r}); pass {label}=FILE")
        settings = (("--eps", train.default_eps(stored, category), train.EPS_BY_CATEGORY[category]),
                    ("--eta", train.default_eta(stored, category), train.ETA),
                    ("--beta", train.default_beta(stored), train.BETA))
        for flag, want, paper in settings:
            if want != trained_at(by_label[label][r["concept"]], flags[label], flag, paper):
                raise SystemExit(f"the defaults train {r['concept']!r} at {flag} {want:g}, the sweep "
                                 f"{label!r} did not; pass --category-from {r['category']}=LABEL with a "
                                 f"sweep run with {flag} {want:g}")
        steps = train.resolve_erase_steps(None, stored, category)
        if steps != (ran := erase_steps_of(by_label[label][r["concept"]], flags[label], stored, category)):
            every = lambda k: "every step" if k is None else f"--erase-steps {k}"  # noqa: E731
            raise SystemExit(f"the defaults train {r['concept']!r} at {every(steps)}, the sweep {label!r} at "
                             f"{every(ran)}; pass --category-from {r['category']}=LABEL with a sweep run at "
                             f"{every(steps)}")
        anchor = train.ANCHOR_BY_CATEGORY.get(category, "null")  # what --anchor auto trains it with
        if anchor != (ran := anchor_of(by_label[label][r["concept"]], flags[label], label)):
            said = f"with {ran}" if ran else "does not say with which"
            raise SystemExit(f"the defaults train {r['concept']!r} with --anchor {anchor}, the sweep "
                             f"{label!r} {said}; pass --category-from {r['category']}=LABEL with a sweep run "
                             f"with --anchor {anchor}")
        rows.append(by_label[label][r["concept"]])
        source[r["concept"]] = label
    agg = aggregate(rows)
    files = {label: d.get("command") for label, d in sweeps}
    return {"assembled_from": files, "sweep_of": source, "prompts": sweeps[0][1]["prompts"],
            "seeds": sweeps[0][1]["seeds"], "sizes": sweeps[0][1]["sizes"], "targets": targets(rows, agg),
            "aggregate": agg, "rows": rows}


def trained_at(row: dict, flags: list[str], flag: str, paper: float) -> float:
    """A row's --eps, --eta or --beta as train.py resolved it: recorded in the row by bench/sweep.py, or for a
    row from before it recorded them, read from the sweep's flags (ran_at)."""
    recorded = row.get("train", {}).get("settings", {})
    return float(recorded[k]) if (k := flag.removeprefix("--")) in recorded else ran_at(flags, flag, paper)


def erase_steps_of(row: dict, flags: list[str], stored: dict, category: str) -> int | None:
    """The sampler steps a row's LoRA erased on (None: every step), as train.py resolved them: recorded in the
    row by bench/sweep.py; else from the sweep's --erase-steps flag; else every step (every sweep from
    before the row recorded it ran so)."""
    recorded = row.get("train", {}).get("settings", {})
    if "erase_steps" in recorded:
        return recorded["erase_steps"]
    flag = flag_value(flags, "--erase-steps")
    return train.resolve_erase_steps(int(flag), stored, category) if flag is not None else None


def anchor_of(row: dict, flags: list[str], label: str) -> str | None:
    """The anchor a row was trained with: recorded in the row by bench/sweep.py; else the sweep's --anchor
    flag; else its label where the label is an --anchor value (the sweeps of each anchor, labelled so);
    else None: a sweep of --anchor auto from before rows recorded it, whose resolution then is not known."""
    if anchor := row.get("train", {}).get("settings", {}).get("anchor"):
        return anchor
    if (flag := flag_value(flags, "--anchor")) not in (None, "auto"):
        return flag
    return label if label in ("null", "content") else None


def ran_at(flags: list[str], flag: str, paper: float) -> float:
    """The value of a setting the model may store (--eps, --eta, --beta) that a sweep passed to train.py;
    without the flag, the paper's (every sweep here was run before the model stored its own; a newer one
    without the flag would have run at the stored value)."""
    return float(value) if (value := flag_value(flags, flag)) is not None else paper


def flag_value(flags: list[str], flag: str) -> str | None:
    """The value after `flag` among a sweep's train.py flags (its first occurrence), or None without it."""
    return flags[flags.index(flag) + 1] if flag in flags else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", metavar="LABEL=FILE", help="bench/sweep.py JSON files")
    p.add_argument("--defaults", metavar="FILE", help="also write the sweep of train.py's defaults here")
    p.add_argument("--category-from", action="append", default=[], metavar="CATEGORY=LABEL",
                   help="with --defaults: take this world category's rows from the sweep LABEL (e.g. "
                        "entity=eps3e-3, a sweep run with the ε the model stores for entities)")
    a = p.parse_args(argv)
    sweeps = [load(s) for s in a.sweeps]
    if a.defaults:
        d = defaults(sweeps, dict(c.split("=", 1) for c in a.category_from))
        atomic_write(a.defaults, lambda tmp: Path(tmp).write_text(json.dumps(d, indent=1) + "\n"))
        sweeps.append(("defaults", d))
    print(table(sweeps))
    for other in sweeps[1:]:
        print()
        print(wins(sweeps[0], other))


if __name__ == "__main__":
    main()
