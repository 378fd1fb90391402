"""bench/sweep_compare.py: the defaults' sweep takes each concept's row from the sweep of the anchor that
train.ANCHOR_BY_CATEGORY names for its category, or, where the model stores its own ε for the category,
from the sweep run at that ε; its aggregates are bench/sweep.py's over those rows."""
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sweep  # noqa: E402
import sweep_compare as S  # noqa: E402
import train  # noqa: E402
import checkpoint as C  # noqa: E402

CONCEPTS = {"Van Gogh": "style", "star": "entity", "red": "colour"}  # the world's categories
BETA = train.default_beta(C.read_configs(train.DEFAULT_MODEL).defaults)  # the tiny model's stored β


def fake_sweep(offset: float) -> dict:
    """A sweep whose every measure of concept i is offset + i (so each row tells which sweep it is from)."""
    rows = []
    for i, (c, cat) in enumerate(CONCEPTS.items()):
        summary = {key: offset + i for key, *_ in sweep.MEASURES.values()}
        summary.update({f"{key}_at": "x" for key, *_ in sweep.MEASURES.values()})
        rows.append({"concept": c, "category": cat, "summary": summary})
    return {"command": f"sweep {offset}", "prompts": 5, "seeds": [0], "sizes": {}, "rows": rows,
            "aggregate": sweep.aggregate(rows), "train_flags": ["--beta", repr(BETA)]}


def test_each_row_comes_from_its_categorys_anchor_or_the_sweep_of_its_stored_eps(tmp_path):
    null, content, eps = fake_sweep(0.0), fake_sweep(100.0), fake_sweep(200.0)
    eps["train_flags"] += ["--eps", "3e-3"]  # the ε the tiny model stores for entities
    out = tmp_path / "defaults.json"
    files = [f"null={_write(tmp_path / 'n.json', null)}", f"content={_write(tmp_path / 'c.json', content)}",
             f"eps={_write(tmp_path / 'e.json', eps)}"]
    S.main([*files, "--category-from", "entity=eps", "--defaults", str(out)])
    d = json.loads(out.read_text())
    stored = C.read_configs(train.DEFAULT_MODEL).defaults
    for r in d["rows"]:
        category = stored["categories"][r["concept"]]
        want = "eps" if r["category"] == "entity" else train.ANCHOR_BY_CATEGORY.get(category, "null")
        assert d["sweep_of"][r["concept"]] == want
        assert r["summary"]["FD"] // 100 == {"null": 0, "content": 1, "eps": 2}[want]
    assert d["aggregate"] == sweep.aggregate(d["rows"])
    assert {d["sweep_of"][c] for c in CONCEPTS} == {"eps", "content"}  # the check above can tell them apart


def test_a_missing_anchor_sweep_is_named(tmp_path):
    with pytest.raises(SystemExit, match="content=FILE"):
        only_null = f"null={_write(tmp_path / 'n.json', fake_sweep(0.0))}"
        S.main([only_null, "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("eps_flags", [None, ["--eps", "1e-2"]])
def test_rows_trained_at_another_eps_than_the_defaults_are_refused(tmp_path, eps_flags):
    # The entities' rows of a sweep at Table 6's ε (no --eps) or at another --eps are not the defaults'.
    files = [f"null={_write(tmp_path / 'n.json', fake_sweep(0.0))}",
             f"content={_write(tmp_path / 'c.json', fake_sweep(100.0))}"]
    extra = []
    if eps_flags:
        flags = eps_flags + ["--beta", repr(BETA)]
        files.append(f"eps={_write(tmp_path / 'e.json', {**fake_sweep(200.0), 'train_flags': flags})}")
        extra = ["--category-from", "entity=eps"]
    with pytest.raises(SystemExit, match="--category-from entity=LABEL with a sweep run with --eps 0.003"):
        S.main([*files, *extra, "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


def test_rows_trained_at_another_beta_than_the_models_stored_one_are_refused(tmp_path):
    # Sweeps run at the paper's β (no --beta) are not the defaults' sweep once the model stores its own.
    assert BETA != train.BETA
    paper = [{**fake_sweep(x), "train_flags": []} for x in (0.0, 100.0)]
    files = [f"{k}={_write(tmp_path / f'{k}.json', d)}" for k, d in zip(("null", "content"), paper)]
    with pytest.raises(SystemExit, match=f"with a sweep run with --beta {BETA:g}"):
        S.main([*files, "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


def _write(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))
    return path


def test_a_sweep_of_one_category_sits_beside_a_full_one(tmp_path, capsys):
    full = fake_sweep(0.0)
    part = fake_sweep(100.0)
    part["rows"] = [r for r in part["rows"] if r["category"] == "entity"]
    part["aggregate"] = sweep.aggregate(part["rows"])
    S.main([f"full={_write(tmp_path / 'f.json', full)}", f"part={_write(tmp_path / 'p.json', part)}"])
    lines = capsys.readouterr().out.splitlines()
    style = [ln for ln in lines if ln.startswith("| style | acc_e |")]
    entity = [ln for ln in lines if ln.startswith("| entity | acc_e |")]
    assert style and style[0].rstrip(" |").endswith("–")  # no style rows in the partial sweep
    assert entity and "(star)" in entity[0].split("|")[-2]  # its entity row is there


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=12))
def test_covered_seconds_is_the_length_of_the_union(jobs):
    # Integer (start, length) jobs: the union's length is the number of unit seconds some job covers.
    spans = [(s, s + n) for s, n in jobs]
    covered = {t for s, e in spans for t in range(s, e)}
    assert sweep.covered_seconds(spans) == len(covered)
