"""bench/claims.py's pure logic, without training: the run list, resumability, and the report (mean ± sd,
verdict rules, "not run") from synthetic result files."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import claims  # noqa: E402
import claims_report as R  # noqa: E402


def test_every_claim_point_is_a_known_run():
    for c in claims.CLAIMS.values():
        for name in c.points:
            assert claims.point(name).name in claims.POINTS


def test_jobs_are_unique_ordered_by_priority_and_seeded_only_where_training():
    jobs = claims.jobs(list(claims.CLAIMS), 3)
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    assert keys[:2] == ["zeroing", "default-s0"]  # claim 2 first: the cheap runs
    assert "fixed-0-s0" not in keys and "losses-erase,attn-s0" in keys  # an alias is trained once
    assert "zeroing" in keys and not any(k.startswith("zeroing-") for k in keys)  # deterministic: once
    assert keys.index("merge-5-s0") > max(keys.index(f"alone-{c}-s0") for c in ("star", "green", "circle"))
    merge = next(j for j in jobs if j.key == "merge-2-s1")
    assert merge.after == ("default-s1", "alone-star-s1")
    first_of_seed_1 = keys.index("default-s1")
    assert all(j.seed == 0 for j in jobs[:first_of_seed_1]) and keys.index("merge-5-s0") < first_of_seed_1


def test_claims_selection():
    keys = [j.key for j in claims.jobs([2, 6], 3)]
    assert keys == ["zeroing", "default-s0", "localize-k1", "localize-k2", "localize-k4", "default-s1",
                    "default-s2"]


def test_a_run_with_a_result_or_in_flight_is_skipped(tmp_path):
    jobs = claims.jobs([2, 6], 1)
    assert [j.key for j in claims.todo(jobs, tmp_path)][:3] == ["zeroing", "default-s0", "localize-k1"]
    claims.result_path(tmp_path, "zeroing").parent.mkdir(parents=True)
    claims.result_path(tmp_path, "zeroing").write_text("{}")
    claims.marker(tmp_path, "default-s0").parent.mkdir(parents=True)
    claims.marker(tmp_path, "default-s0").write_text(str(os.getpid()))  # a live process runs it
    claims.marker(tmp_path, "localize-k1").write_text("999999999")  # a process that has gone
    assert [j.key for j in claims.todo(jobs, tmp_path)][0] == "localize-k1"


def report(acc_e, acc_ir, variants=(0.0, 0.0, 0.0, 0.0)):
    """A synthetic erasure_report with the fields the report reads; the base model at Acc_e 1, Acc_ir 0.9."""
    ba = (lambda b, e: {"base": b, "erased": e})  # noqa: E731
    return {"concept": "Van Gogh", "Acc_e": ba(1.0, acc_e), "Acc_ir": ba(0.9, acc_ir),
            "Acc_e_variants": {v: ba(1.0, x) for v, x in zip(R.VARIANTS, variants)},
            "content_kept": {"entity": ba(1.0, 0.9), "colour": ba(0.8, 0.7)},
            "neutral": {"style": ba(1.0, 1.0)}, "unconditional": {"FD": 1.5}, "FD": 2.5}


def write_result(out, name, seed, rep, **extra):
    key = claims.job_key(name, seed)
    path = claims.result_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "point": name, "report": rep, **extra}))


def test_summary_is_mean_and_sd_over_seeds(tmp_path):
    for s, acc in enumerate([0.4, 0.6]):
        write_result(tmp_path, "default", s, report(0.1, acc))
    s = R.summary(R.load(tmp_path), "default")
    assert s["Acc_ir"][0] == pytest.approx(0.5) and s["Acc_ir"][1] == pytest.approx(0.1414, abs=1e-3)
    assert s["Acc_ir"][2] == 2 and s["kept"][0] == pytest.approx(0.8)
    assert R.fmt(s["Acc_ir"]) == "0.50 ± 0.14" and R.fmt((0.5, None, 1)) == "0.50"
    assert R.fmt(None) == "not run"
    assert R.summary(R.load(tmp_path), "nogate") is None


def summaries(**points):
    """get(name) over synthetic summaries: points maps a name to (Acc_e, Acc_ir[, variants])."""
    made = {n: R.measures(report(*v)) for n, v in points.items()}
    return lambda name, concept=None: ({k: (x, None, 1) for k, x in made[name].items()}
                                       if name in made else None)


BASE = R.measures(report(0.0, 0.0), "base")  # Acc_e 1.0, Acc_ir 0.9


def test_verdict_1_rules():
    full = {f"esd-{g}-{s}": (0.0, 0.85 if g == "gated" else 0.3)
            for s in R.LAYER_SETS for g in ("gated", "ungated")}
    assert R.verdict_1(summaries(**full), BASE)[0] == "reproduced"
    collapsed = {**full, **{f"esd-full-{s}": (0.0, 0.2) for s in R.LAYER_SETS}}
    assert R.verdict_1(summaries(**collapsed), BASE)[0] == "reproduced"
    kept = {**full, "esd-full-second": (0.0, 0.85)}  # full fine-tuning did not collapse in one layer set
    assert R.verdict_1(summaries(**kept), BASE)[0] == "partly"
    assert "full fine-tuning 0.85" in R.verdict_1(summaries(**kept), BASE)[1]
    some = {**full, "esd-gated-first": (0.0, 0.5)}  # gated helps (+0.2) but loses 0.4 there
    assert R.verdict_1(summaries(**some), BASE)[0] == "partly"
    none = {n: (0.0, 0.3) for n in full}
    assert R.verdict_1(summaries(**none), BASE)[0] == "not reproduced"
    assert R.verdict_1(summaries(), BASE) == R.NOT_RUN


def test_verdict_2_rules():
    brittle = dict(zeroing=(0.0, 0.9, (0.2, 0.9, 0.9, 0.6)), default=(0.0, 0.9, (0.0, 0.1, 0.1, 0.0)))
    assert R.verdict_2(summaries(**brittle), BASE)[0] == "reproduced"
    robust = dict(zeroing=(0.0, 0.9, (0.0, 0.1, 0.0, 0.0)), default=(0.0, 0.9))
    assert R.verdict_2(summaries(**robust), BASE)[0] == "not reproduced"
    only_zeroing = dict(zeroing=brittle["zeroing"])
    assert R.verdict_2(summaries(**only_zeroing), BASE)[0] == "partly"


def test_verdict_3_and_4_rules():
    binary = {"fixed-0.01": (0.0, 0.3), "fixed-100": (1.0, 0.9), "eps-1e-3": (0.0, 0.88)}
    assert R.verdict_3(summaries(**binary), BASE)[0] == "reproduced"
    static_ok = {**binary, "fixed-1": (0.0, 0.88)}
    assert R.verdict_3(summaries(**static_ok), BASE)[0] == "not reproduced"
    mono = {"eps-1e-4": (0.5, 0.9), "eps-1e-3": (0.1, 0.88), "eps-1e-2": (0.0, 0.7),
            "beta-0.01": (0.1, 0.85), "beta-1": (0.15, 0.9)}
    assert R.verdict_4(summaries(**mono), BASE)[0] == "reproduced"
    assert R.verdict_4(summaries(**{**mono, "eps-1e-2": (0.6, 0.7)}), BASE)[0] == "partly"


def test_verdict_7_decides_cost_by_the_idle_modes_bench_when_it_has_run(tmp_path, monkeypatch):
    made = {n: {**R.measures(report(0.0, 0.9)), "train_s": t, "rss_mb": 400.0}
            for n, t in (("implicit", 400.0), ("exact", 100.0))}  # contended: exact looks 4x faster
    get = (lambda name, concept=None: {k: (x, None, 1) for k, x in made[name].items()})  # noqa: E731
    monkeypatch.setattr(R, "MODES", tmp_path / "modes.json")
    assert R.verdict_7(get, BASE)[0] == "partly"  # no idle figures: same quality, the loop's times
    assert "contended" in R.verdict_7(get, BASE)[1]
    idle = {"median_ms_per_step": {"implicit": 90.0, "exact": 120.0},
            "peak_rss_mb": {"implicit": 430, "exact": 460}}
    (tmp_path / "modes.json").write_text(json.dumps(idle))
    verdict, text = R.verdict_7(get, BASE)
    assert verdict == "reproduced" and "90.0 vs 120.0 ms/step (×1.33)" in text and "430 vs 460" in text


def test_report_marks_unfinished_points_not_run(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    write_result(out, "zeroing", 0, report(0.0, 0.9, (0.2, 0.9, 0.9, 0.6)))
    for s in range(2):
        write_result(out, "default", s, report(0.0, 0.9 - 0.1 * s, (0.0, 0.1, 0.1, 0.0)))
    text = R.write(out, docs, [1, 2], seeds=3).read_text()
    assert "1. Naive fine-tuning collapses, the gate prevents it: **not run**" in text
    assert "2. Attention zeroing erases but is brittle: **reproduced**" in text
    assert "| default | 2 | 0.00 ± 0.00 | " in text and "0.85 ± 0.07" in text  # Acc_ir over two seeds
    assert "| esd-gated-all | 0 | not run |" in text
    assert (docs / "claims" / "claim2.png").exists()


def test_wall_time_counts_overlaps_once_and_pauses_not_at_all(tmp_path):
    # Two runs side by side (0-100 s and 50-150 s), then a pause of a day, then one run of 60 s: the bench
    # ran 150 + 60 s, not the 86,560 s from its first start to its last end.
    runs = [("default", 0, 0, 100), ("default", 1, 50, 100), ("nogate", 0, 86500, 60)]
    for name, seed, start, seconds in runs:
        write_result(tmp_path, name, seed, report(0.0, 0.9), seconds=seconds)
        path = claims.result_path(tmp_path, claims.job_key(name, seed))
        os.utime(path, (1e9 + start + seconds, 1e9 + start + seconds))
    text = R.timing(tmp_path, R.load(tmp_path))
    assert "0.07 process-hours" in text  # 260 s
    assert "0.06 h of wall time" in text  # 210 s


def test_lemma_c3_gap_is_read_from_the_gap_check_logs(tmp_path):
    # Two logged steps: g̃ 0.5 vs g 0.4 (gap 0.1, same sign) and g̃ -0.2 vs g 0.3 (gap 0.5, opposite sign).
    write_result(tmp_path, "gap-check", 0, report(0.0, 0.9))
    log = tmp_path / "loras" / f"{claims.job_key('gap-check', 0)}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"step": 24, "g_tilde": 0.1, "L_pr": 0.0},
            {"step": 25, "g_tilde": 0.5, "g_exact": 0.4, "step_sq": 2e-6, "L_pr": 0.0},
            {"step": 50, "g_tilde": -0.2, "g_exact": 0.3, "step_sq": 1e-6, "L_pr": 0.0}, {"finished": 50}]
    log.write_text("\n".join(map(json.dumps, recs)))
    rows = R.gap(tmp_path, seeds=3)
    assert [r["step"] for r in rows] == [25, 50]
    assert [r["gap"] for r in rows] == pytest.approx([0.1, 0.5])
    assert [r["G"] for r in rows] == pytest.approx([2 * R.LR * 0.1 / 2e-6, 2 * R.LR * 0.5 / 1e-6])
    text = R.gap_summary(rows)
    assert "median |g̃ − g| = 0.3 " in text and "at 50% of the steps" in text
    assert R.gap_summary([]).endswith("not run.")


def test_every_training_runs_at_the_papers_anchor_eps_eta_and_beta_unless_the_point_sets_its_own():
    import train
    def argv(name):
        return train.parse_args(claims.train_command(claims.point(name), 0, Path("x"), False)[2:])
    assert argv("alone-star").eps == train.EPS_BY_CATEGORY["entity"] == 1e-2  # not the tiny model's 3e-3
    assert argv("alone-star").anchor == "null" and argv("alone-green").anchor == "null"
    assert argv("alone-green").eps == 1e-2 and argv("default").eps == 1e-3
    assert argv("eps-1e-1").eps == 0.1  # the point's own --eps comes last
    assert argv("default").beta == train.BETA == 0.1 and argv("beta-1").beta == 1.0  # likewise β
    assert argv("alone-green").eta == argv("default").eta == train.ETA == 2.0  # not the tiny model's 1
    full = claims.train_command(claims.point("esd-full-all"), 0, Path("x"), False)
    assert full[1].endswith("finetune.py") and "--eps" not in full
