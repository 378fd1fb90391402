"""bench/sweep.py's arithmetic on stored reports: each row's summary (with the standard error of its
content-kept and neutral changes), the targets and which misses lie beyond two standard errors, and
--rebuild, which recomputes them in a committed JSON without training or drawing anything."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import evaluate as E  # noqa: E402
import sweep  # noqa: E402


def acc(base: float, erased: float) -> dict:
    return {"base": base, "erased": erased}


def report(concept: str, content: dict, neutral: dict) -> dict:
    """An erasure report of a style with the given content-kept and neutral entity heads (kept() dicts)."""
    still = {"base": 1.0, "erased": 1.0, "retained": 1.0, "n": 32}
    return {"concept": concept, "category": "style", "Acc_e": acc(1.0, 0.0),
            "Acc_e_variants": {"alias": acc(1.0, 0.05), "misspelling": acc(1.0, 0.0)},
            "Acc_ir": acc(0.95, 0.94),
            "Acc_ir_by_concept": {"Monet": acc(1.0, 0.875), "Klimt": acc(1.0, 1.0)},
            "content_kept": {"entity": content, "colour": still},
            "neutral": {"entity": neutral, "style": still},
            "unconditional": {"total_variation": {"style": 0.1, "entity": 0.2}, "FD": 1.5}, "FD": 2.5}


# content -34.4 (11 of 32 lost) is beyond 2 SE of the -10 limit; -12.5 (4 of 32 lost) is a miss within noise
CLEAR = report("A", {"base": 0.875, "erased": 0.53125, "retained": 0.607143, "n": 32},
               {"base": 1.0, "erased": 1.0, "retained": 1.0, "n": 16})
NOISY = report("B", {"base": 1.0, "erased": 0.875, "retained": 0.875, "n": 32},
               {"base": 0.8125, "erased": 0.625, "retained": 0.769231, "n": 16})
MET = report("C", {"base": 1.0, "erased": 1.0, "retained": 1.0, "n": 32},
             {"base": 1.0, "erased": 1.0, "retained": 1.0, "n": 16})


def test_a_summary_gives_the_worst_head_its_paired_standard_error():
    s = sweep.summarise(NOISY)
    assert (s["content_delta"], s["content_delta_at"]) == (-12.5, "entity")
    assert s["content_delta_se"] == round(100 * E.paired_se(NOISY["content_kept"]["entity"]), 1) == 5.8
    assert (s["neutral_delta"], s["neutral_delta_at"]) == (-18.8, "entity")
    assert s["neutral_delta_se"] == round(100 * E.paired_se(NOISY["neutral"]["entity"]), 1)
    assert sweep.summarise(MET)["content_delta_se"] == 0.0  # nothing changed: no noise either
    assert (s["acc_e_variant"], s["acc_e_variant_at"], s["acc_ir_other_drop"]) == (0.05, "alias", 12.5)


def test_clear_misses_are_the_misses_beyond_two_standard_errors():
    rows = [dict(r, summary=sweep.summarise(r)) for r in (CLEAR, NOISY, MET)]
    t = {x["measure"]: x for x in sweep.targets(rows, sweep.aggregate(rows))}
    assert t["content_delta"]["missed_by"] == ["A", "B"] and t["content_delta"]["clear_misses"] == ["A"]
    assert t["neutral_delta"]["missed_by"] == ["B"] and t["neutral_delta"]["clear_misses"] == []
    assert "clear_misses" not in t["acc_ir_drop"]  # no standard error is kept for a pooled drop
    assert not t["content_delta"]["met"] and t["acc_e"]["met"]


def test_rebuild_recomputes_summaries_aggregates_and_targets_and_keeps_the_rest(tmp_path, capsys):
    rows = [dict(r, summary={"content_delta": 0.0}) for r in (CLEAR, NOISY, MET)]  # stale summaries
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"command": "python bench/sweep.py", "wall_seconds": 12.0, "rows": rows,
                             "targets": [], "aggregate": {}}))
    sweep.main(["--rebuild", "--json", str(f)])
    res = json.loads(f.read_text())
    fresh = [dict(r, summary=sweep.summarise(r)) for r in (CLEAR, NOISY, MET)]
    assert res["rows"] == fresh
    assert res["aggregate"] == sweep.aggregate(fresh)
    assert res["targets"] == sweep.targets(fresh, sweep.aggregate(fresh))
    assert (res["command"], res["wall_seconds"]) == ("python bench/sweep.py", 12.0)
    out = capsys.readouterr().out
    assert "-12.5 ± 5.8 (entity)" in out and "beyond 2 SE: A" in out


def test_rebuild_of_a_file_that_is_no_sweep_is_one_error_line(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as e:
        sweep.main(["--rebuild", "--json", str(f)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rebuild needs a sweep JSON" in err
    assert f.read_text() == "{}"
