"""bench/sweep_compare.py: the defaults' sweep takes each concept's row from the sweep of the anchor that
train.ANCHOR_BY_CATEGORY names for its category, or, where the model stores its own ε or η for the
category (or its own β), from a sweep run at those; its aggregates are bench/sweep.py's over those rows."""
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


STORED = C.read_configs(train.DEFAULT_MODEL).defaults
ETA_COLOUR = STORED["eta"]["abstraction"]  # the tiny model's η for colours (README)
ETA_STYLE = STORED["eta"]["style"]  # and for styles, whose rows come from the content anchor's sweep
AT_ETA_STYLE = ["--eta", repr(ETA_STYLE)]
ANCHOR = {k: train.ANCHOR_BY_CATEGORY.get(k, "null") for k in ("style", "entity", "abstraction")}  # auto's
# the flags of a sweep of one category at everything else the tiny model's defaults train it with
AT_ENTITY = ["--eps", "3e-3", "--eta", repr(train.default_eta(STORED, "entity")),
             "--anchor", ANCHOR["entity"]]
AT_COLOUR = ["--eta", repr(ETA_COLOUR), "--anchor", ANCHOR["abstraction"]]
AT_STYLE = [*AT_ETA_STYLE, "--anchor", ANCHOR["style"]]


def test_each_row_comes_from_its_categorys_anchor_or_the_sweep_of_its_stored_eps_or_eta(tmp_path):
    null, content, eps, eta = fake_sweep(0.0), fake_sweep(100.0), fake_sweep(200.0), fake_sweep(300.0)
    eps["train_flags"] += AT_ENTITY  # with the ε the tiny model stores for entities
    eta["train_flags"] += AT_COLOUR
    content["train_flags"] += AT_ETA_STYLE
    out = tmp_path / "defaults.json"
    files = [f"null={_write(tmp_path / 'n.json', null)}", f"content={_write(tmp_path / 'c.json', content)}",
             f"eps={_write(tmp_path / 'e.json', eps)}", f"eta={_write(tmp_path / 'h.json', eta)}"]
    S.main([*files, "--category-from", "entity=eps", "--category-from", "colour=eta", "--defaults", str(out)])
    d = json.loads(out.read_text())
    for r in d["rows"]:
        category = STORED["categories"][r["concept"]]
        want = {"entity": "eps", "colour": "eta"}.get(r["category"]) or \
            train.ANCHOR_BY_CATEGORY.get(category, "null")
        assert d["sweep_of"][r["concept"]] == want
        assert r["summary"]["FD"] // 100 == {"null": 0, "content": 1, "eps": 2, "eta": 3}[want]
    assert d["aggregate"] == sweep.aggregate(d["rows"])
    assert {d["sweep_of"][c] for c in CONCEPTS} == {"eps", "eta", "content"}  # the check can tell them apart


def test_a_colour_row_from_a_sweep_at_the_papers_eta_is_refused(tmp_path):
    # the colours' rows would come from the content anchor's sweep, run at the paper's η
    assert ETA_COLOUR != train.ETA
    files = [f"{k}={_write(tmp_path / f'{k}.json', fake_sweep(x))}"
             for k, x in (("null", 0), ("content", 100))]
    eps = {**fake_sweep(200.0), "train_flags": ["--beta", repr(BETA), *AT_ENTITY]}
    style = {**fake_sweep(300.0), "train_flags": ["--beta", repr(BETA), *AT_STYLE]}
    files += [f"eps={_write(tmp_path / 'e.json', eps)}", f"style={_write(tmp_path / 's.json', style)}"]
    want = f"--category-from colour=LABEL with a sweep run with --eta {ETA_COLOUR:g}"
    with pytest.raises(SystemExit, match=want):
        S.main([*files, "--category-from", "entity=eps", "--category-from", "style=style", "--defaults",
                str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


def test_rows_that_record_their_settings_are_checked_by_those_not_by_the_sweeps_flags(tmp_path):
    # bench/sweep.py records each LoRA's resolved ε, η, β in its row: a sweep run with no flags at all then
    # ran at what the model stores, which the flags alone would read as the paper's.
    d = {**fake_sweep(0.0), "train_flags": []}
    for r in d["rows"]:
        category = STORED["categories"][r["concept"]]
        r["train"] = {"settings": {"eps": train.default_eps(STORED, category),
                                   "eta": train.default_eta(STORED, category), "beta": BETA,
                                   "anchor": ANCHOR[category]}}
    out = tmp_path / "d.json"
    S.main([f"all={_write(tmp_path / 'a.json', d)}", *sum((["--category-from", f"{k}=all"] for k in
                                                            ("style", "entity", "colour")), []),
            "--defaults", str(out)])
    assert set(json.loads(out.read_text())["sweep_of"].values()) == {"all"}
    red = next(r for r in d["rows"] if r["concept"] == "red")
    red["train"]["settings"]["eta"] = train.ETA  # one row recorded at another η than the stored one
    _write(tmp_path / "a.json", d)
    with pytest.raises(SystemExit, match="'red' at --eta"):
        S.main([f"all={tmp_path / 'a.json'}", "--category-from", "style=all", "--category-from", "entity=all",
                "--category-from", "colour=all", "--defaults", str(tmp_path / "e.json")])


@pytest.mark.parametrize("how", ["recorded", "flag", "unknown"])
def test_rows_trained_with_another_anchor_than_their_categorys_are_refused(tmp_path, how):
    # An entity sweep at every stored setting but the anchor, told by what its rows record, by its --anchor
    # flag, or not at all (a sweep of --anchor auto from before rows recorded the anchor it resolved to).
    other = "content" if ANCHOR["entity"] == "null" else "null"
    wrong = {"recorded": AT_ENTITY[:-2], "flag": [*AT_ENTITY[:-2], "--anchor", other],
             "unknown": AT_ENTITY[:-2]}  # AT_ENTITY without its --anchor
    part = {**fake_sweep(200.0), "train_flags": ["--beta", repr(BETA), *wrong[how]]}
    if how == "recorded":
        for r in part["rows"]:
            r["train"] = {"settings": {"anchor": other}}
    style = {**fake_sweep(100.0), "train_flags": ["--beta", repr(BETA), *AT_STYLE]}
    colour = {**fake_sweep(300.0), "train_flags": ["--beta", repr(BETA), *AT_COLOUR]}
    files = [f"content={_write(tmp_path / 'c.json', style)}", f"colour={_write(tmp_path / 'h.json', colour)}",
             f"entity={_write(tmp_path / 'e.json', part)}"]
    cli = [*files, "--category-from", "entity=entity", "--category-from", "colour=colour"]
    want = "with " + other if how != "unknown" else "does not say with which"
    msg = f"'star' with --anchor {ANCHOR['entity']}, the sweep 'entity' {want}"
    with pytest.raises(SystemExit, match=msg):
        S.main([*cli, "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()
    part["train_flags"] = ["--beta", repr(BETA), *AT_ENTITY]  # the same sweep at the right anchor passes
    for r in part["rows"]:
        r.pop("train", None)
    _write(tmp_path / "e.json", part)
    S.main([*cli, "--defaults", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["sweep_of"]["star"] == "entity"


def test_a_missing_anchor_sweep_is_named(tmp_path):
    with pytest.raises(SystemExit, match="content=FILE"):
        only_null = f"null={_write(tmp_path / 'n.json', fake_sweep(0.0))}"
        S.main([only_null, "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("eps_flags", [None, ["--eps", "1e-2"]])
def test_rows_trained_at_another_eps_than_the_defaults_are_refused(tmp_path, eps_flags):
    # The entities' rows of a sweep at Table 6's ε (no --eps) or at another --eps are not the defaults'.
    content = {**fake_sweep(100.0), "train_flags": ["--beta", repr(BETA), *AT_ETA_STYLE]}  # styles pass
    files = [f"null={_write(tmp_path / 'n.json', fake_sweep(0.0))}",
             f"content={_write(tmp_path / 'c.json', content)}"]
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
    paper = [{**fake_sweep(x), "train_flags": AT_ETA_STYLE} for x in (0.0, 100.0)]  # all but β stored
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


def test_a_sweep_row_records_the_eps_eta_and_beta_train_resolved(random_ckpt, tmp_path):
    # What trained_at reads: the LoRA's own settings, here a stored η that no flag names.
    import shutil
    from tests.test_train import args
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"eta": {"entity": 0.5}, "erase_steps": {"entity": 3}}))
    out = tmp_path / "x.safetensors"
    train.main(args(ckpt, out, "--steps", "1"))  # --category entity
    want = {"eps": train.EPS_BY_CATEGORY["entity"], "eta": 0.5, "beta": train.BETA,
            "anchor": ANCHOR["entity"], "erase_steps": 3}
    assert sweep.resolved_settings(out) == want


@pytest.mark.parametrize("how", ["recorded", "flag"])
def test_rows_erased_on_fewer_steps_than_the_defaults_are_refused(tmp_path, how):
    # A sweep at --erase-steps 5 is not the defaults' sweep of a model that stores none (every step).
    assert train.resolve_erase_steps(None, STORED, "entity") is None
    entity = {**fake_sweep(200.0), "train_flags": ["--beta", repr(BETA), *AT_ENTITY]}
    if how == "flag":
        entity["train_flags"] += ["--erase-steps", "5"]
    else:
        for r in entity["rows"]:
            r["train"] = {"settings": {"eps": 3e-3, "eta": train.default_eta(STORED, "entity"), "beta": BETA,
                                       "anchor": ANCHOR["entity"], "erase_steps": 5}}
    content = {**fake_sweep(100.0), "train_flags": ["--beta", repr(BETA), *AT_ETA_STYLE]}
    files = [f"null={_write(tmp_path / 'n.json', fake_sweep(0.0))}",
             f"content={_write(tmp_path / 'c.json', content)}", f"es={_write(tmp_path / 'e.json', entity)}"]
    with pytest.raises(SystemExit, match="at every step, the sweep 'es' at --erase-steps 5"):
        S.main([*files, "--category-from", "entity=es", "--defaults", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()
