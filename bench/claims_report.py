"""
docs/claims.md from the results of bench/claims.py: per claim a table (mean ± sd over training seeds, n the
number of seeds of each point), one verdict line by the rule stated under it, and PNG plots in
docs/claims/. A point without a result is listed as not run; nothing is filled in.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from sweep import covered_seconds
from claims import (CLAIMS, EVAL_N, EVAL_SEEDS, GAP_EVERY, LAYER_SETS, MERGE_CONCEPTS, STRIP, alone, job_key,
                    point)

VARIANTS = ("alias", "misspelling", "held_out", "paraphrase")
COLUMNS = ("Acc_e", "Acc_ir", "H_a", "kept", "neutral", "uncond_FD", "FD")
NOT_RUN = ("not run", "")
MODES = Path(__file__).resolve().parent / "results" / "modes.json"  # written by bench/modes.py
LR = 1e-3  # train.py's default α, the learning rate of every claim-8 run
COLLAPSE, KEPT, ERASED, SAME_E, SAME_IR = 0.2, 0.1, 0.2, 0.1, 0.05  # the verdict thresholds (see RULES)
RULES = {
    1: f"reproduced if, in every layer set, each naive ESD-only model (the ungated LoRA, and full "
       f"fine-tuning where it ran) loses ≥ {COLLAPSE} of the base Acc_ir while gated keeps it within "
       f"{KEPT}; partly if gated keeps ≥ {KEPT} more Acc_ir than ungated somewhere.",
    2: f"reproduced if zeroing erases the canonical spelling (Acc_e ≤ {ERASED}), its mean Acc_e over the "
       f"variants is ≥ 0.3 higher, and Z-Erase's variant mean is ≥ 0.2 below zeroing's; partly if zeroing "
       f"erases the canonical spelling and one of the other two holds.",
    3: f"balanced: Acc_e ≤ {ERASED} and Acc_ir within {KEPT} of the base. Reproduced if no static λ is "
       f"balanced and some ε is; partly if the best H_a over ε beats the best over λ by ≥ 0.05.",
    4: "monotone: Acc_e and Acc_ir do not rise (by more than 0.05) from one ε to the next larger; β barely "
       "matters: Acc_e and Acc_ir vary by ≤ 0.1 over β. Reproduced if both, partly if one.",
    5: f"reproduced if the full loss has the best H_a (within 0.02) and adding L_pr raises Acc_ir by "
       f"≥ {KEPT} (with or without L_attn); partly if one of the two.",
    6: "reproduced if Z-Erase's H_a beats DiT-Localization's best K by ≥ 0.05; partly if within 0.05.",
    7: f"same quality: |ΔAcc_e| ≤ {SAME_E} and |ΔAcc_ir| ≤ {SAME_E / 2}; reproduced if the same quality and "
       "exact costs more time (×1.1); partly if one of the two.",
    8: "reproduced if the mean L_pr of every window of steps is ≤ t·ε·α at the window's end; partly if that "
       "holds in the last window only.",
    9: f"reproduced if every concept's Acc_e merged is within {SAME_E} of alone at N = 2, 3 and 5 (and "
       f"Acc_ir within {SAME_E}); partly if at N = 2.",
}


# ---------------------------------------------------------------------------------------------------------
# Results -> numbers


def measures(r: dict, side: str = "erased") -> dict:
    """The table's numbers from one erasure report (side "base" or "erased")."""
    def mean(d):
        vals = [v[side] for v in d.values() if v[side] is not None]
        return sum(vals) / len(vals) if vals else None
    m = {"Acc_e": r["Acc_e"][side], **{v: r["Acc_e_variants"][v][side] for v in VARIANTS},
         "Acc_ir": r["Acc_ir"][side], "kept": mean(r["content_kept"]), "neutral": mean(r["neutral"]),
         "uncond_FD": r["unconditional"]["FD"] if side == "erased" else 0.0,
         "FD": r["FD"] if side == "erased" else 0.0}
    m["H_a"] = m["Acc_ir"] - m["Acc_e"]
    m["variants"] = sum(m[v] for v in VARIANTS) / len(VARIANTS)
    return m


def load(out: Path) -> dict[str, dict]:
    return {json.loads(f.read_text())["key"]: json.loads(f.read_text())
            for f in sorted((out / "results").glob("*.json"))}


def stat(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sd or None for one value, n)."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def summary(results: dict, name: str, concept: str | None = None, seeds: int = 3) -> dict | None:
    """Per measure (mean, sd, n) over the seeds of a point (its merge report for `concept`); None if
    nothing finished. Training cost too (train_s: the loop's seconds, rss_mb: peak RSS)."""
    rows = []
    for s in range(seeds if point(name).seeded else 1):
        r = results.get(job_key(name, s))
        if r is not None:
            m = measures(r["reports"][concept] if concept else r["report"])
            if "train" in r:
                m.update(train_s=r["train"]["loop_s"], rss_mb=r["train"]["peak_rss_mb"])
            rows.append(m)
    if not rows:
        return None
    return {k: stat([m[k] for m in rows]) for k in rows[0] if all(m[k] is not None for m in rows)}


def fmt(s: tuple | None, digits: int = 2) -> str:
    if s is None:
        return "not run"
    mean, sd, _ = s
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(rows: list[tuple[str, dict | None]], columns=COLUMNS, base: dict | None = None) -> str:
    """A markdown table: one row per (label, summary), n = seeds; a summary of None is "not run"."""
    lines = ["| point | n | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    if base:
        lines.append("| base model | – | " + " | ".join(f"{base[c]:.2f}" if c in base else "–"
                                                      for c in columns) + " |")
    for label, s in rows:
        cells = ["not run"] * len(columns) if s is None else [fmt(s.get(c), 1 if "_s" in c or "mb" in c
                                                                 else 2) for c in columns]
        lines.append(f"| {label} | {s['Acc_e'][2] if s else 0} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def m(s: dict | None, key: str) -> float:
    return s[key][0]


# ---------------------------------------------------------------------------------------------------------
# Verdicts: (verdict, the numbers it rests on); each returns NOT_RUN when its points have not finished


def verdict_1(get, base) -> tuple[str, str]:
    done = [(s, get(f"esd-gated-{s}"), get(f"esd-ungated-{s}")) for s in LAYER_SETS]
    done = [(s, g, u) for s, g, u in done if g and u]
    if not done:
        return NOT_RUN
    b, full = base["Acc_ir"], {s: get(f"esd-full-{s}") for s, _, _ in done}
    held = [s for s, g, u in done if m(u, "Acc_ir") <= b - COLLAPSE and m(g, "Acc_ir") >= b - KEPT
            and (full[s] is None or m(full[s], "Acc_ir") <= b - COLLAPSE)]
    helps = [s for s, g, u in done if m(g, "Acc_ir") - m(u, "Acc_ir") >= KEPT]
    text = "; ".join(f"{s} layers: Acc_ir gated {m(g, 'Acc_ir'):.2f} vs ungated {m(u, 'Acc_ir'):.2f}"
                     + (f" vs full fine-tuning {m(full[s], 'Acc_ir'):.2f}" if full[s] else "")
                     + f" (Acc_e {m(g, 'Acc_e'):.2f} / {m(u, 'Acc_e'):.2f}"
                     + (f" / {m(full[s], 'Acc_e'):.2f})" if full[s] else ")") for s, g, u in done)
    text += f" (base Acc_ir {b:.2f}, ESD-only)"
    if (d := get("default")) and (n := get("nogate")):
        text += (f"; full method gated Acc_ir {m(d, 'Acc_ir'):.2f}, ungated {m(n, 'Acc_ir'):.2f} (Acc_e "
                 f"{m(d, 'Acc_e'):.2f} / {m(n, 'Acc_e'):.2f})")
    ok = len(held) == len(LAYER_SETS)
    return ("reproduced" if ok else "partly" if helps else "not reproduced"), text


def verdict_2(get, base) -> tuple[str, str]:
    z, d = get("zeroing"), get("default")
    if not z:
        return NOT_RUN
    erases, brittle = m(z, "Acc_e") <= ERASED, m(z, "variants") >= m(z, "Acc_e") + 0.3
    text = (f"zeroing Acc_e canonical {m(z, 'Acc_e'):.2f}, variants " +
            ", ".join(f"{v} {m(z, v):.2f}" for v in VARIANTS) + f" (mean {m(z, 'variants'):.2f})")
    better = d is not None and m(d, "variants") <= m(z, "variants") - 0.2
    if d:
        text += (f"; Z-Erase canonical {m(d, 'Acc_e'):.2f}, variants " +
                 ", ".join(f"{v} {m(d, v):.2f}" for v in VARIANTS) + f" (mean {m(d, 'variants'):.2f})")
    ok = erases and brittle and better
    return ("reproduced" if ok else "partly" if erases and (brittle or better) else "not reproduced"), text


FIXED = ("fixed-0", "fixed-0.01", "fixed-0.1", "fixed-1", "fixed-10", "fixed-100")
EPS = ("eps-1e-4", "eps-1e-3", "eps-1e-2", "eps-1e-1")
BETA = ("beta-0.01", "beta-0.1", "beta-1")


def verdict_3(get, base) -> tuple[str, str]:
    fixed = {n: s for n in FIXED if (s := get(n))}
    eps = {n: s for n in EPS if (s := get(n))}
    if not fixed or not eps:
        return NOT_RUN

    def balanced(s):
        return m(s, "Acc_e") <= ERASED and m(s, "Acc_ir") >= base["Acc_ir"] - KEPT
    text = "; ".join(f"{n} Acc_e {m(s, 'Acc_e'):.2f} Acc_ir {m(s, 'Acc_ir'):.2f}"
                     for n, s in {**fixed, **eps}.items())
    best_f, best_e = max(m(s, "H_a") for s in fixed.values()), max(m(s, "H_a") for s in eps.values())
    text += f" (best H_a: static {best_f:.2f}, Lagrangian {best_e:.2f}; base Acc_ir {base['Acc_ir']:.2f})"
    ok = not any(map(balanced, fixed.values())) and any(map(balanced, eps.values()))
    return ("reproduced" if ok else "partly" if best_e >= best_f + 0.05 else "not reproduced"), text


def verdict_4(get, base) -> tuple[str, str]:
    eps = [(n, s) for n in EPS if (s := get(n))]
    beta = [(n, s) for n in BETA if (s := get(n))]
    if len(eps) < 2 and len(beta) < 2:
        return NOT_RUN
    parts, checks = [], []
    if len(eps) >= 2:
        mono = all(m(b, k) <= m(a, k) + 0.05 for (_, a), (_, b) in zip(eps, eps[1:])
                   for k in ("Acc_e", "Acc_ir"))
        checks.append(mono)
        parts.append("over ε " + ", ".join(n[4:] for n, _ in eps) + ": Acc_e " +
                     " → ".join(f"{m(s, 'Acc_e'):.2f}" for _, s in eps) + ", Acc_ir " +
                     " → ".join(f"{m(s, 'Acc_ir'):.2f}" for _, s in eps) + (" (monotone)" if mono else ""))
    if len(beta) >= 2:
        spread = {k: max(m(s, k) for _, s in beta) - min(m(s, k) for _, s in beta)
                  for k in ("Acc_e", "Acc_ir")}
        checks.append(max(spread.values()) <= 0.1)
        parts.append("over β " + ", ".join(n[5:] for n, _ in beta) + f": Acc_e spread {spread['Acc_e']:.2f}, "
                     f"Acc_ir spread {spread['Acc_ir']:.2f}")
    ok = len(checks) == 2 and all(checks)
    return ("reproduced" if ok else "partly" if any(checks) else "not reproduced"), "; ".join(parts)


def verdict_5(get, base) -> tuple[str, str]:
    names = ("losses-erase", "losses-erase,attn", "losses-erase,pr", "losses-erase,attn,pr")
    s = {n: get(n) for n in names}
    if not s["losses-erase,attn,pr"] or sum(v is not None for v in s.values()) < 2:
        return NOT_RUN
    done = {n: v for n, v in s.items() if v}
    best = m(done["losses-erase,attn,pr"], "H_a") >= max(m(v, "H_a") for v in done.values()) - 0.02
    pairs = ((names[0], names[2]), (names[1], names[3]))  # without and with L_pr
    pr = [m(s[b], "Acc_ir") - m(s[a], "Acc_ir") for a, b in pairs if s[a] and s[b]]
    text = "; ".join(f"{{{n[7:]}}} Acc_e {m(v, 'Acc_e'):.2f}, variants {m(v, 'variants'):.2f}, Acc_ir "
                     f"{m(v, 'Acc_ir'):.2f}, H_a {m(v, 'H_a'):.2f}" for n, v in done.items())
    checks = [best] + ([max(pr) >= KEPT] if pr else [])
    ok = len(checks) == 2 and all(checks)
    return ("reproduced" if ok else "partly" if any(checks) else "not reproduced"), text


def verdict_6(get, base) -> tuple[str, str]:
    ks = {n: s for n in ("localize-k1", "localize-k2", "localize-k4") if (s := get(n))}
    d = get("default")
    if not ks or not d:
        return NOT_RUN
    best = max(m(s, "H_a") for s in ks.values())
    text = "; ".join(f"K={n[-1]} Acc_e {m(s, 'Acc_e'):.2f} Acc_ir {m(s, 'Acc_ir'):.2f} H_a {m(s, 'H_a'):.2f}"
                     for n, s in ks.items()) + f"; Z-Erase H_a {m(d, 'H_a'):.2f}"
    gap = m(d, "H_a") - best
    return ("reproduced" if gap >= 0.05 else "partly" if gap >= -0.05 else "not reproduced"), text


def idle_cost() -> dict | None:
    """bench/modes.py's figures (the two modes alternated on the otherwise idle CPU), if it has run."""
    return json.loads(MODES.read_text()) if MODES.exists() else None


def verdict_7(get, base) -> tuple[str, str]:
    i, e = get("implicit"), get("exact")
    if not i or not e:
        return NOT_RUN
    same = abs(m(i, "Acc_e") - m(e, "Acc_e")) <= SAME_E and abs(m(i, "Acc_ir") - m(e, "Acc_ir")) <= SAME_E / 2
    text = (f"Acc_e implicit {m(i, 'Acc_e'):.2f} vs exact {m(e, 'Acc_e'):.2f}, Acc_ir {m(i, 'Acc_ir'):.2f} "
            f"vs {m(e, 'Acc_ir'):.2f}; ")
    if cost := idle_cost():  # the bench's own times shared the CPU with other jobs: the idle ones decide
        t, rss = cost["median_ms_per_step"], cost["peak_rss_mb"]
        ti, te, ri, re = t["implicit"], t["exact"], rss["implicit"], rss["exact"]
        text += f"idle `bench/modes.py`: {ti:.1f} vs {te:.1f} ms/step"
    else:
        ti, te, ri, re = m(i, "train_s"), m(e, "train_s"), m(i, "rss_mb"), m(e, "rss_mb")
        text += f"training loop (contended) {ti:.0f} s vs {te:.0f} s"
    text += f" (×{te / ti:.2f}), peak RSS {ri:.0f} vs {re:.0f} MiB (×{re / ri:.2f})"
    checks = [same, te / ti >= 1.1]
    return ("reproduced" if all(checks) else "partly" if any(checks) else "not reproduced"), text


def verdict_9(get, base) -> tuple[str, str]:
    parts, ok_n = [], {}
    for n in (2, 3, 5):
        pairs = [(c, get(alone(c)), get(f"merge-{n}", c)) for c in MERGE_CONCEPTS[:n]]
        if not all(a and g for _, a, g in pairs):
            continue
        ok_n[n] = all(m(g, "Acc_e") <= m(a, "Acc_e") + SAME_E and m(g, "Acc_ir") >= m(a, "Acc_ir") - SAME_E
                      for _, a, g in pairs)
        parts.append(f"N={n}: " + ", ".join(f"{c} Acc_e {m(a, 'Acc_e'):.2f}→{m(g, 'Acc_e'):.2f} "
                                            f"Acc_ir {m(a, 'Acc_ir'):.2f}→{m(g, 'Acc_ir'):.2f}"
                                            for c, a, g in pairs))
    if not ok_n:
        return NOT_RUN
    text = "alone → merged: " + "; ".join(parts)
    if len(ok_n) == 3 and all(ok_n.values()):
        return "reproduced", text
    return ("partly" if ok_n.get(2) else "not reproduced"), text


# ---------------------------------------------------------------------------------------------------------
# Claim 8: the drift of L_pr along the default runs, from their per-step logs


def drift(out: Path, seeds: int = 3, eps: float = 1e-3, lr: float = LR) -> list[dict]:
    """Per window of steps: the mean L_pr of the default runs (on each step's training batch, at θ before
    the step's update; L_pr(θ_0) = 0 as the LoRA starts at zero), mean ± sd over seeds, and the bound
    t·ε·α at the window's end (ε: styles' 1e-3, α: the default learning rate)."""
    logs = []
    for s in range(seeds):
        f = out / "loras" / f"{job_key('default', s)}.jsonl"
        if f.exists() and (out / "results" / f"{job_key('default', s)}.json").exists():
            logs.append([r for r in map(json.loads, f.read_text().splitlines()) if "step" in r])
    if not logs:
        return []
    steps = len(logs[0])
    ends = sorted({max(1, round(steps * f)) for f in (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)})
    rows, lo = [], 1
    for hi in ends:
        means = [statistics.fmean(r["L_pr"] for r in log if lo <= r["step"] <= hi) for log in logs]
        rows.append({"steps": (lo, hi), "L_pr": stat(means), "bound": hi * eps * lr})
        lo = hi + 1
    return rows


def verdict_8(rows: list[dict]) -> tuple[str, str]:
    if not rows:
        return NOT_RUN
    under = [r["L_pr"][0] <= r["bound"] for r in rows]
    worst = max(r["L_pr"][0] / r["bound"] for r in rows)
    last = rows[-1]
    text = (f"at step {last['steps'][1]}: mean L_pr {last['L_pr'][0]:.2e} vs t·ε·α = {last['bound']:.1e}; "
            f"largest ratio L_pr / (t·ε·α) over the windows ×{worst:.2g}")
    return ("reproduced" if all(under) else "partly" if under[-1] else "not reproduced"), text


def gap(out: Path, seeds: int = 3) -> list[dict]:
    """Lemma C.3 along the gap-check runs (the default run with train.py --check-gtilde): per logged step,
    g̃ (Eq. 34, two losses on g̃'s batch) against the exact g = ∇L_pr(θ_{t-1})·d_{t-1} + ε (Eq. 33) on the
    same batch, and the smoothness G that Eq. 35's bound |g̃ − g| ≤ Gα‖d‖²/2 would need at that step."""
    rows = []
    for s in range(seeds):
        f = out / "loras" / f"{job_key('gap-check', s)}.jsonl"
        if f.exists() and (out / "results" / f"{job_key('gap-check', s)}.json").exists():
            for r in map(json.loads, f.read_text().splitlines()):
                if "g_exact" in r:
                    diff = abs(r["g_tilde"] - r["g_exact"])
                    rows.append({"seed": s, "step": r["step"], "g_tilde": r["g_tilde"], "g": r["g_exact"],
                                 "gap": diff, "G": 2 * LR * diff / r["step_sq"] if r["step_sq"] else None})
    return rows


def gap_summary(rows: list[dict], eps: float = 1e-3) -> str:
    """One paragraph: how closely g̃ follows g, and whether it moves λ the same way (the sign of g̃)."""
    if not rows:
        return "The gap-check runs (Lemma C.3) have not finished: not run."
    med = lambda xs: statistics.median(xs)  # noqa: E731
    same = sum((r["g_tilde"] > 0) == (r["g"] > 0) for r in rows) / len(rows)
    rel = [r["gap"] / abs(r["g"] - eps) for r in rows if r["g"] != eps]
    Gs = [r["G"] for r in rows if r["G"] is not None]
    seeds = len({r["seed"] for r in rows})
    return (f"Lemma C.3, measured ({len(rows)} steps, every {GAP_EVERY}th of {seeds} gap-check runs = the "
            f"default run with `train.py --check-gtilde {GAP_EVERY}`, which trains the same LoRA bit for "
            f"bit): "
            f"median |g̃ − g| = {med([r['gap'] for r in rows]):.3g} against median |g| = "
            f"{med([abs(r['g']) for r in rows]):.3g} and ε = {eps:g}; |g̃ − g| / |g − ε| median "
            f"{med(rel):.2g}, largest {max(rel):.2g}; g̃ has g's sign (moves λ the same way) at "
            f"{same:.0%} of the steps. The G that Eq. 35 would need, 2α|g̃ − g|/‖Δθ‖²: median "
            f"{med(Gs):.3g}, largest {max(Gs):.3g} (the bound holds for any G above the loss's true "
            f"smoothness, which is not known; what is measured is the gap itself).")


def drift_table(rows: list[dict]) -> str:
    lines = ["| steps | n | mean L_pr (θ_t) − L_pr(θ_0) | t·ε·α at the window's end |", "|---|---|---|---|"]
    for r in rows:
        mean, sd, n = r["L_pr"]
        lines.append(f"| {r['steps'][0]}–{r['steps'][1]} | {n} | {mean:.2e}" + (f" ± {sd:.1e}" if sd else "")
                     + f" | {r['bound']:.1e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, PNG)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bars(path: Path, rows: list[tuple[str, dict | None]], keys: tuple[str, ...], title: str) -> bool:
    """Grouped bars of `keys` per finished row, error bars one sd; False if no row has finished."""
    rows = [(label, s) for label, s in rows if s]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) * len(keys) / 2), 3.6))
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        xs = [i + j * w for i in range(len(rows))]
        ax.bar(xs, [s[k][0] if k in s else 0 for _, s in rows], w, label=k,
               yerr=[(s[k][1] or 0) if k in s else 0 for _, s in rows], capsize=2)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], [label for label, _ in rows], rotation=30,
                  ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pareto(path: Path, get, base: dict) -> bool:
    """Claim 3: Acc_e (erasure, lower is better) against Acc_ir (preservation), and FD per point."""
    groups = {"static λ": [(n[6:], get(n)) for n in FIXED], "Z-Erase ε": [(n[4:], get(n)) for n in EPS]}
    groups = {g: [(n, s) for n, s in pts if s] for g, pts in groups.items()}
    if not any(groups.values()):
        return False
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for (g, pts), marker in zip(groups.items(), "os"):
        a.scatter([m(s, "Acc_e") for _, s in pts], [m(s, "Acc_ir") for _, s in pts], marker=marker, label=g)
        for n, s in pts:
            a.annotate(n, (m(s, "Acc_e"), m(s, "Acc_ir")), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
        b.scatter([m(s, "Acc_e") for _, s in pts], [m(s, "FD") for _, s in pts], marker=marker, label=g)
    a.scatter([base["Acc_e"]], [base["Acc_ir"]], marker="*", c="k", label="base")
    a.set(xlabel="Acc_e (erased concept, lower = erased)", ylabel="Acc_ir (other styles)")
    b.set(xlabel="Acc_e", ylabel="FD to the base (unrelated prompts)")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sweeps(path: Path, get) -> bool:
    """Claim 4: Acc_e and Acc_ir against ε and against β (log axes), error bars one sd."""
    panels = [("ε", [(float(n[4:]), get(n)) for n in EPS]), ("β", [(float(n[5:]), get(n)) for n in BETA])]
    panels = [(x, [(v, s) for v, s in pts if s]) for x, pts in panels]
    if not any(pts for _, pts in panels):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (x, pts) in zip(axes, panels):
        for k in ("Acc_e", "Acc_ir"):
            ax.errorbar([v for v, _ in pts], [s[k][0] for _, s in pts], [s[k][1] or 0 for _, s in pts],
                        marker="o", capsize=2, label=k)
        ax.set(xscale="log", xlabel=x, ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def drift_plot(path: Path, out: Path, seeds: int) -> bool:
    """Claim 8: L_pr along each default run (moving mean over 25 steps) against t·ε·α."""
    logs = [f for s in range(seeds) if (f := out / "loras" / f"{job_key('default', s)}.jsonl").exists()]
    if not logs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for f in logs:
        pr = [r["L_pr"] for r in map(json.loads, f.read_text().splitlines()) if "step" in r]
        k = min(25, len(pr))
        ax.plot(range(k, len(pr) + 1), [statistics.fmean(pr[i - k:i]) for i in range(k, len(pr) + 1)],
                lw=1, label=f"L_pr, {f.stem}")
        ax.plot(range(1, len(pr) + 1), [t * 1e-6 for t in range(1, len(pr) + 1)], "k--", lw=1)
    ax.plot([], [], "k--", label="t·ε·α (ε = α = 1e-3)")
    ax.set(yscale="log", xlabel="step t", ylabel="L_pr(θ_t) − L_pr(θ_0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def image_grid(path: Path, out: Path, names: list[str], scale: int = 2) -> bool:
    """The seed-0 images of each point (rows, labelled) for the prompts of claims.STRIP (columns)."""
    from PIL import Image, ImageDraw
    files = [("base model", out / "images" / "base.png")]
    files += [(n, out / "images" / f"{job_key(n, 0)}.png") for n in names]
    strips = [(n, Image.open(f).convert("RGB")) for n, f in files if f.exists()]
    if all(n == "base model" for n, _ in strips):  # no point has finished
        return False
    w, h = strips[0][1].size
    pad, head = 150, 14
    grid = Image.new("RGB", (pad + w * scale, head + h * scale * len(strips)), "white")
    draw = ImageDraw.Draw(grid)
    for k, prompt in enumerate(STRIP):
        draw.text((pad + k * w * scale // len(STRIP) + 2, 1), prompt[:21], fill="black")
    for i, (n, img) in enumerate(strips):
        grid.paste(img.resize((w * scale, h * scale), Image.NEAREST), (pad, head + i * h * scale))
        draw.text((4, head + i * h * scale + h * scale // 2 - 5), n, fill="black")
    grid.save(path)
    return True


# ---------------------------------------------------------------------------------------------------------
# docs/claims.md


def label(name: str) -> str:
    from claims import SAME
    return f"{name} (= {SAME[name]})" if name in SAME else name


COLUMNS_OF = {2: ("Acc_e",) + VARIANTS + ("variants", "Acc_ir", "FD"),
              7: ("Acc_e", "Acc_ir", "H_a", "FD", "train_s", "rss_mb")}
BARS_OF = {1: ("Acc_e", "Acc_ir", "kept", "neutral"), 2: ("Acc_e",) + VARIANTS,
           5: ("Acc_e", "variants", "Acc_ir"), 6: ("Acc_e", "Acc_ir", "H_a"), 7: ("Acc_e", "Acc_ir"),
           9: ("Acc_e", "Acc_ir")}
NOTES = {
    1: "Full fine-tuning (finetune.py) trains the to_q/to_k/to_v weights of the layer set themselves, no "
       "LoRA and no gate, with L_erase alone and α = 1e-4 (a tenth of the LoRA's: every entry of W moves; "
       "the rule reads these runs), and once on all layers at the LoRA's α = 1e-3 (esd-full-all-lr1e-3); "
       "its frozen references come from a kept copy of θ_0.",
    2: "Zeroing is given the canonical spelling only (baselines.attention_zeroing, every unified and "
       "context-refiner layer); the variants are the evaluation's aliases, misspellings, held-out spellings "
       "and paraphrase templates, never seen by either method.",
    6: "baselines.localize picks the top-K unified layers by the attention mass image queries put on the "
       "concept's tokens over 8 calibration prompts (not the evaluation's); baselines.dit_localization then "
       "substitutes the empty caption's attention input for the caption rows in those layers.",
    7: "Times in the table are of runs that shared the CPU with other jobs and mean nothing as a ratio; "
       "the verdict reads `python bench/modes.py` instead, which alternates the two modes on the idle CPU "
       "(bench/results/modes.json). On the tiny model the second backward of the exact mode costs no more "
       "than the implicit mode's extra L_pr evaluations for g̃ (three per two steps).",
    9: "Each concept alone is `train.py --concept X --anchor null` at Table 6's ε for its category, "
       "η = 2 and β = 0.1 (as every point here: the paper's settings, not the tiny model's stored ones); "
       "merge-N averages the first N of those LoRAs of the same seed (w = 1/N, Eq. 63).",
}
VERDICTS = {1: verdict_1, 2: verdict_2, 3: verdict_3, 4: verdict_4, 5: verdict_5, 6: verdict_6, 7: verdict_7,
            9: verdict_9}


def claim_rows(n: int, get) -> list[tuple[str, dict | None]]:
    if n == 9:
        return ([(f"{c} alone ({alone(c)})", get(alone(c))) for c in MERGE_CONCEPTS] +
                [(f"merge-{k}: {c}", get(f"merge-{k}", c)) for k in (2, 3, 5) for c in MERGE_CONCEPTS[:k]])
    return [(label(p), get(p)) for p in CLAIMS[n].points]


def section(n: int, get, base: dict, out: Path, plots: Path, seeds: int) -> tuple[str, str]:
    """A claim's markdown section and its verdict."""
    lines = [f"## {n}. {CLAIMS[n].title}", ""]
    if n == 8:
        rows = drift(out, seeds)
        verdict, text = verdict_8(rows)
        lines += [drift_table(rows) if rows else "The default runs have not finished: not run.", ""]
        figs = [("drift", drift_plot(plots / "claim8_drift.png", out, seeds))]
        lines += [gap_summary(gap(out, seeds)), ""]
    else:
        rows = claim_rows(n, get)
        lines += [table(rows, COLUMNS_OF.get(n, COLUMNS), None if n == 9 else base), ""]
        lines += [NOTES[n], ""] if n in NOTES else []
        if missing := [lab for lab, s in rows if s is None]:
            lines += ["Not run: " + ", ".join(missing) + ".", ""]
        verdict, text = VERDICTS[n](get, base)
        if missing and verdict != "not run":
            verdict += ", from the finished points only"
        figs = [("bars", n in BARS_OF and bars(plots / f"claim{n}.png", rows, BARS_OF[n], CLAIMS[n].title))]
        figs += [("pareto", n == 3 and pareto(plots / "claim3_pareto.png", get, base)),
                 ("sweeps", n == 4 and sweeps(plots / "claim4_sweeps.png", get)),
                 ("images", n in (1, 2, 6) and image_grid(plots / f"claim{n}_images.png", out,
                                                          list(CLAIMS[n].points)))]
    lines += [f"**Verdict: {verdict}**" + (f" — {text}." if text else "."), "", f"Rule: {RULES[n]}", ""]
    names = {"bars": f"claim{n}.png", "pareto": "claim3_pareto.png", "sweeps": "claim4_sweeps.png",
             "images": f"claim{n}_images.png", "drift": "claim8_drift.png"}
    lines += [f"![claim {n} {k}]({plots.name}/{names[k]})" for k, made in figs if made] + [""]
    return "\n".join(lines), verdict


def timing(out: Path, results: dict) -> str:
    """Process time of the finished runs (their own seconds) and the wall time during which at least one
    of them was running: the union of the runs' [end - seconds, end] intervals (result files' times), so
    the pauses between sessions of a resumed bench are not counted."""
    if not results:
        return "no run has finished yet"
    wall = covered_seconds([((end := (out / "results" / f"{k}.json").stat().st_mtime) - r.get("seconds", 0),
                             end) for k, r in results.items()])
    busy = sum(r.get("seconds", 0) for r in results.values())
    return (f"{len(results)} runs took {busy / 3600:.2f} process-hours "
            f"({sum(r.get('train', {}).get('wall_s', 0) for r in results.values()) / 3600:.2f} of them "
            f"training), {wall / 3600:.2f} h of wall time while the bench ran (resumed over several "
            f"sessions; pauses not counted), niced next to other jobs")


HEADER = """# The paper's claims on the tiny model

Generated by `python bench/claims.py report` from the runs of `python bench/claims.py run` (results under
`{out}`). Every point erases {concept} (a style) from the embedded tiny Z-Image model with train.py's defaults
but the paper's settings where the tiny model stores its own: Eq. 5's target around ∅ (`--anchor null`),
Table 6's ε, η = 2 and β = 0.1, unless its name says otherwise (1,000 AdamW steps, ε = 1e-3 for a style,
β = 0.1, rank 4 on to_q/to_k/to_v of all 6 unified layers), and is scored by
`evaluate.erasure_report` on fixed prompts ({n} canonical prompts, the other sets in proportion) and fixed
image seeds {eval_seeds}. n is the number of training seeds a point
finished (mean ± sd over them; the baselines are deterministic, one run). Columns: Acc_e (canonical
spelling; lower = erased), the variants (alias, misspelling, held-out spelling, paraphrase; `variants` their
mean), Acc_ir (the other 9 styles), H_a = Acc_ir − Acc_e, kept (entity and colour heads on prompts naming
the concept), neutral (every head on prompts naming no style), uncond_FD and FD (Fréchet distance to the
base model's images: empty prompt, unrelated prompts), train_s (training loop seconds, 1 thread, niced,
next to other jobs: contended) and rss_mb (peak RSS of the training process).
The verdict rules are fixed thresholds, stated under each verdict.

Cost: {timing}.

{summary}
"""


def write(out: Path, docs: Path, claims: list[int], seeds: int = 3) -> Path:
    results = load(out)
    plots = docs / "claims"
    plots.mkdir(parents=True, exist_ok=True)

    def get(name, concept=None):
        return summary(results, name, concept, seeds)
    first = next((r for r in results.values() if r.get("report", {}).get("concept") == "Van Gogh"), None)
    base = measures(first["report"], "base") if first else {}
    sections, verdicts = [], []
    for n in claims:
        if not base and n != 8:
            sections.append(f"## {n}. {CLAIMS[n].title}\n\n**Verdict: not run.**\n")
            verdicts.append(f"{n}. {CLAIMS[n].title.split(' (')[0]}: **not run**")
            continue
        text, verdict = section(n, get, base, out, plots, seeds)
        sections.append(text)
        verdicts.append(f"{n}. {CLAIMS[n].title.split(' (')[0]}: **{verdict}**")
    quick = any(r.get("quick") for r in results.values())
    head = HEADER.format(out=out.name if quick else "out/claims", concept="Van Gogh",
                         n=1 if quick else EVAL_N,
                         eval_seeds=[0] if quick else list(EVAL_SEEDS), timing=timing(out, results),
                         summary="\n".join(verdicts))
    if quick:
        head = ("**Smoke test (--quick): a few training steps, tiny sets; the numbers mean nothing.**\n\n"
                + head)
    path = docs / "claims.md"
    path.write_text(head + "\n" + "\n".join(sections))
    (plots / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))  # what it rests on
    return path
