"""train.py's command line, the cases tests/test_train.py does not cover: every bad input refused before
anything loads in one `error:` line naming the flag and the fix, with no file left behind; concepts looked up
in any case; resume refused when it would mix runs; one run per output; write failures that name the user's
path; files with the user's umask, identical bytes for identical runs, setup stages and a summary reported.

Refusals run in-process (`train.main`) with loading forbidden, so a check that came after loading fails the
test (tests/test_train.py runs one as a real process).
"""
import argparse
import errno
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest
import torch

import checkpoint as C
import cli
import lora_file
import train
import zerase as Z
from tests.checkpoints import make_random_checkpoint
from tests.test_cli_sample import refused
from tests.test_train import args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(train.DEFAULT_MODEL)  # stores its 28 concepts


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(C, "load_zimage", forbidden)


@pytest.fixture(scope="module")
def finished(random_ckpt, tmp_path_factory):
    """A finished 2-step run that kept its checkpoint, made under umask 022, with its stderr."""
    out = tmp_path_factory.mktemp("finished") / "circle.safetensors"
    old, err = os.umask(0o022), StringIO()
    try:
        with redirect_stderr(err):
            train.main(args(random_ckpt, out, "--steps", "2", "--keep-checkpoint"))
    finally:
        os.umask(old)
    return out, err.getvalue()


def tiny(concept: str, *extra) -> list[str]:
    return ["--model", TINY, "--concept", concept, *extra]


LONG = "a bowl of fruit on a table " * 400  # ~2,800 tokens: the encoder reads 512
CASES = [  # (argv, words the message must hold: the flag or value, and the fix)
    (tiny("Rembrandt"), ["'Rembrandt'", "--list-concepts", "--force with --category"]),
    (tiny("Rembrandt", "--category", "style"), ["'Rembrandt'", "--force"]),  # no useless LoRA any more
    (tiny("Van Gohg"), ["did you mean 'Van Gogh'?"]),
    (tiny("   ", "--category", "style"), ["--concept is missing or blank", "--concept \"Van Gogh\""]),
    (tiny("van gogh", "--resume"), ["--resume", "no checkpoint", "run without --resume"]),
    (tiny("van gogh", "--out", "{tmp}/x.pt"), ["--out", "must end with .safetensors"]),
    (tiny("van gogh", "--out", "/proc/x.safetensors"), ["--out", "choose a writable place"]),
    (tiny("van gogh", "--out", "{tmp}/" + "v" * 240 + ".safetensors"), ["--out", "too long", "shorter"]),
    (tiny("van gogh", "--resolution", "17"), ["--resolution 17", "multiple of 8", "e.g. 16"]),
    (tiny("van gogh", "--resolution", "-64"), ["--resolution", "positive number of pixels"]),
    (tiny("van gogh", "--lr", "nan"), ["--lr", "finite number > 0"]),
    (tiny("van gogh", "--layers", "a,b"), ["--layers 'a,b'", "e.g. 0,1,2"]),
    (tiny("van gogh", "--layers", "0,0"), ["--layers '0,0'", "each once"]),
    (tiny("van gogh", "--targets", "to_x"), ["--targets 'to_x'", "to_q, to_k or to_v"]),
    (tiny("van gogh", "--rank", "0"), ["--rank", "at least 1"]),
    (tiny("van gogh", "--pr-batch", "0"), ["--pr-batch", "at least 1"]),
    (tiny("van gogh", "--pr-neutral", "-1"), ["--pr-neutral", "0 (none)"]),
    (tiny("van gogh", "--beta", "inf"), ["--beta", "finite number >= 0"]),
    (tiny("van gogh", "--eta", "-1"), ["--eta", "finite number >= 0"]),
    (tiny("van gogh", "--lora-alpha", "0"), ["--lora-alpha", "finite number > 0"]),
    (tiny("van gogh", "--preserve", LONG), ["tokens", "at most 512", "shorten it"]),
    (tiny("van gogh", "--preserve", "a painting by van gogh"), ["--preserve", "must not contain"]),
    (tiny("van gogh", "--preserve", "caf\udce9 table"), ["--preserve", "pass it in UTF-8"]),
    (tiny("caf\udce9"), ["--concept", "pass it in UTF-8"]),
    (tiny("van gogh", "--dtype", "float8"), ["--dtype", "use one of float32"]),
    (tiny("van gogh", "--device", "tpu"), ["--device", "use cpu"]),
    (["--model", "{tmp}/nowhere", "--concept", "star"], ["--model", "not a directory"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a[2:])[:40] for a, _ in CASES])
def test_bad_input_is_one_line_naming_the_flag_and_the_fix_before_loading(argv, words, tmp_path, capsys,
                                                                          no_loading):
    if any(a.startswith("/proc/") for a in argv) and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = refused(train.main, argv + ([] if "--out" in argv else ["--out", str(tmp_path / "x.safetensors")]),
                   capsys)
    assert all(w in line for w in words), line
    assert not list(tmp_path.iterdir())


def test_steps_0_names_only_steps(tmp_path, capsys, no_loading):
    """It used to list seven flags without saying which was wrong."""
    line = refused(train.main, tiny("star", "--steps", "0", "--out", str(tmp_path / "x.safetensors")), capsys)
    assert set(re.findall(r"--[a-z-]+", line)) == {"--steps"} and "at least 1 (got 0)" in line


def test_concepts_are_found_in_any_case_and_unknown_ones_trained_only_with_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: a user's own loras/ must not matter here
    def plan(*extra):
        return train.check(train.parse_args([*extra, "--out", str(tmp_path / "x.safetensors")]))
    p = plan(*tiny("van gogh"))
    assert (p.concept, p.category, p.out.name) == ("Van Gogh", "style", "x.safetensors")
    assert plan(*tiny("  STAR ")).concept == "star"
    p = plan(*tiny("Rembrandt", "--category", "style", "--force"))
    assert (p.concept, p.category) == ("Rembrandt", "style")
    assert train.check(train.parse_args(tiny("Van Gogh"))).out == Path("loras/van-gogh.safetensors")


def test_list_concepts_prints_the_models_concepts_by_category(capsys):
    assert train.main(["--model", TINY, "--list-concepts"]) is None
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("style (10): Van Gogh, Monet") and len(out) == 3
    assert sum(int(re.search(r"\((\d+)\)", line)[1]) for line in out) == 28


# ---------------------------------------------------------------------------------------------------
# Outputs, resume, one run per output


def test_an_existing_lora_is_not_overwritten_without_force(finished, random_ckpt, capsys, no_loading):
    out, _ = finished
    line = refused(train.main, args(random_ckpt, out, "--steps", "2"), capsys)
    assert f"{out} exists" in line and "--force" in line


@pytest.mark.parametrize("extra, words", [
    (["--concept", "star"], ["other settings", "concept: 'circle' there, 'star' now"]),
    (["--rank", "8"], ["other settings", "rank: 4 there, 8 now"]),
    (["--steps", "2"], ["at step 2", "pass a larger --steps"]),
])
def test_resume_is_refused_when_it_would_mix_runs(finished, random_ckpt, extra, words, capsys, no_loading):
    """A checkpoint of other settings (another concept, another rank: a tensor-size traceback before) or at
    its last step is refused, the differing setting named."""
    out, _ = finished
    before = sorted(out.parent.iterdir())
    line = refused(train.main, args(random_ckpt, out, "--steps", "4", "--resume", *extra), capsys)
    assert all(w in line for w in words) and "--resume" in line, line
    assert sorted(out.parent.iterdir()) == before


def test_resume_is_refused_on_another_base_model(finished, tmp_path, capsys, no_loading):
    """Same architecture, other weights: the checkpoint's base-model fingerprint does not match."""
    other = make_random_checkpoint(tmp_path / "other", seed=1)
    capsys.readouterr()  # its progress bars
    line = refused(train.main, args(other, finished[0], "--steps", "4", "--resume"), capsys)
    assert "another base model" in line and "resume with the model it was trained on" in line


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(random_ckpt, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "circle.safetensors"
    lock = tmp_path / "circle.safetensors.lock"
    lock.write_text(str(os.getppid()))  # a live process holds it
    monkeypatch.setattr(train, "prepare", lambda a: pytest.fail("started although another run holds --out"))
    line = refused(train.main, args(random_ckpt, out, "--steps", "2"), capsys)
    assert f"another train.py (process {os.getppid()}) is writing {out}" in line and "wait for it" in line
    assert sorted(tmp_path.iterdir()) == [lock]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock.write_text(dead)  # its process has gone
    monkeypatch.undo()
    assert train.main(args(random_ckpt, out, "--steps", "1")) == out and not lock.exists()


class FullDisk:
    """The run's log file, whose second write fails as on a full disk."""

    def __init__(self, f):
        self.f, self.name, self.writes = f, f.name, 0

    def write(self, s):
        self.writes += 1
        if self.writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(s)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_a_full_disk_during_training_names_the_out_and_leaves_no_file(random_ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    real = train.open_log
    monkeypatch.setattr(train, "open_log", lambda path, keep: FullDisk(real(path, keep)))
    out = tmp_path / "circle.safetensors"
    line = refused(train.main, args(random_ckpt, out, "--steps", "3"), capsys, code=1, started=True)
    assert f"next to {out} (No space left on device)" in line
    assert not list(tmp_path.iterdir())  # no LoRA, no partial log, no checkpoint, no lock


def test_a_failed_lora_write_names_the_users_path_and_leaves_no_partial_file(random_ckpt, tmp_path, capsys,
                                                                             monkeypatch):
    def full(path, *a, **k):
        def write(tmp):
            Path(tmp).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        cli.atomic_write(path, write)
    monkeypatch.setattr(lora_file, "save_lora", full)
    out = tmp_path / "circle.safetensors"
    line = refused(train.main, args(random_ckpt, out, "--steps", "2"), capsys, started=True)
    assert f"could not write {out} (No space left on device)" in line and ".tmp" not in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".lock" in p.name]


# ---------------------------------------------------------------------------------------------------
# What a finished run leaves and says


def test_files_get_the_users_umask(finished):
    out, _ = finished
    for f in (out, out.with_suffix(".jsonl"), out.with_suffix(".ckpt.safetensors")):
        assert f.stat().st_mode & 0o777 == 0o644, f  # umask 022; a temporary file's 0600 used to survive


def test_an_atomic_write_gets_the_umask_whatever_mode_the_writer_used(tmp_path):
    """Some writers (mkstemp, some libraries) create 0600 files; the renamed file still gets the umask."""
    old = os.umask(0o022)
    try:
        cli.atomic_write(tmp_path / "x.bin", lambda tmp: os.close(os.open(tmp, os.O_CREAT, 0o600)))
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644


def test_two_identical_runs_write_identical_bytes(finished, random_ckpt, tmp_path):
    """Timings go to the log, metadata is written in a fixed order: the same command, the same file."""
    again = tmp_path / "circle.safetensors"
    with redirect_stderr(StringIO()):
        train.main(args(random_ckpt, again, "--steps", "2", "--keep-checkpoint"))
    assert again.read_bytes() == finished[0].read_bytes()


def test_setup_stages_are_reported_with_times_and_a_summary_ends_the_run(finished):
    _, err = finished
    for stage in ("loading the model", r"encoding \d+ prompts", "trajectory pools and frozen references"):
        assert re.search(rf"^{stage}.* \.\.\. \d+\.\d s$", err, re.M), stage
    summary = r"finished 2 steps in \d+ s; smoothed L_erase [\d.]+, L_attn [\d.]+, L_pr \S+; λ from"
    assert re.search(summary, err)


def test_the_bar_shows_losses_smoothed():
    """Bias-corrected moving averages: a constant loss shows as itself from step 1; a jumpy one is damped."""
    s = train.Smoothed()
    values = [s.update({"L_erase": v, "L_attn": 1.0, "L_pr": 0.0, "lambda": 0.0}) for v in [0.03, 4.4] * 10]
    assert all(v["L_attn"] == pytest.approx(1.0) for v in values)
    jumps = [v["L_erase"] for v in values[5:]]
    assert max(jumps) - min(jumps) < 0.5 < 4.4 - 0.03


def test_every_flag_has_help_and_its_default(monkeypatch):
    parsers = []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or real(self, *a, **k))
    train.parse_args([])
    p = parsers[0]
    fmt = p.formatter_class(p.prog)
    for a in p._actions[1:]:  # after -h
        if a.help != argparse.SUPPRESS:  # --alpha, the old spelling of --lora-alpha
            assert a.help, a.option_strings
            if a.default not in (None, False, []):
                assert "default" in fmt._expand_help(a), a.option_strings


# ---------------------------------------------------------------------------------------------------
# Ctrl-C during setup, resuming after a failed LoRA write, and flags named in every refusal


def test_ctrl_c_during_setup_is_one_line_and_exit_130(random_ckpt, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_pools", interrupted)  # the ~25 s stage on the tiny model
    try:
        line = refused(train.main, args(random_ckpt, tmp_path / "c.safetensors", "--steps", "2"), capsys,
                       code=130, started=True)
    except KeyboardInterrupt:  # escaping, it would also stop pytest
        pytest.fail("Ctrl-C during setup ended in a KeyboardInterrupt traceback")
    assert "interrupted" in line and not list(tmp_path.iterdir())


def test_resume_after_a_failed_lora_write_writes_the_lora(random_ckpt, tmp_path, monkeypatch, capsys):
    def full(path, *a, **k):
        cli.atomic_write(path, lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    real = lora_file.save_lora
    monkeypatch.setattr(lora_file, "save_lora", full)
    out = tmp_path / "circle.safetensors"
    refused(train.main, args(random_ckpt, out, "--steps", "2"), capsys, started=True)
    monkeypatch.setattr(lora_file, "save_lora", real)
    assert train.main(args(random_ckpt, out, "--steps", "2", "--resume")) == out and out.exists()


def test_a_too_long_preservation_prompt_names_preserve(tmp_path, capsys, no_loading):
    line = refused(train.main, tiny("star", "--preserve", LONG, "--out", str(tmp_path / "x.safetensors")),
                   capsys)
    assert "--preserve" in line


def test_an_unknown_concept_names_the_flag(tmp_path, capsys, no_loading):
    line = refused(train.main, tiny("Rembrandt", "--out", str(tmp_path / "x.safetensors")), capsys)
    assert "--concept" in line


def test_a_blank_alias_is_refused(tmp_path, capsys, no_loading):
    line = refused(train.main, tiny("star", "--alias", "  ", "--out", str(tmp_path / "x.safetensors")),
                   capsys)
    assert "--alias" in line


@pytest.mark.parametrize("concept, extra, want", [
    ("star", [], 3e-3),  # the tiny model stores ε for entities (its own sweep's measurement)
    ("Van Gogh", [], 1e-3), ("red", [], 1e-2),  # styles and colours keep Table 6's
    ("star", ["--eps", "0.02"], 0.02),  # --eps overrides what the model stores
])
def test_eps_is_the_models_stored_value_else_table_6s_and_eps_overrides_both(concept, extra, want):
    a = train.parse_args(tiny(concept, *extra))
    cfgs = C.read_configs(TINY)
    assert train.check_model_flags(a, cfgs, concept)["eps"] == pytest.approx(want)


def test_a_checkpoint_storing_no_eps_trains_at_table_6s(random_ckpt, tmp_path):
    cfgs = C.read_configs(random_ckpt)
    assert "eps" not in cfgs.defaults  # as the real Z-Image-Turbo: no zerase.json ε
    a = train.parse_args(args(random_ckpt, tmp_path / "x.safetensors"))  # --category entity
    assert train.check_model_flags(a, cfgs, "circle")["eps"] == train.EPS_BY_CATEGORY["entity"] == 1e-2


@pytest.mark.parametrize("stored", [-1e-3, "3e-3", None, True])
def test_a_bad_stored_eps_is_one_line_naming_zerase_json_and_eps(random_ckpt, tmp_path, capsys, stored):
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"eps": {"entity": stored}}))  # the real repo has none
    out = tmp_path / "x.safetensors"
    line = refused(train.main, args(ckpt, out), capsys)
    assert "zerase.json" in line and "--eps" in line and not out.exists()
    a = train.parse_args(args(ckpt, out, "--eps", "0.01"))  # the fix it names works
    assert train.check_model_flags(a, C.read_configs(ckpt), "circle")["eps"] == 0.01


@pytest.mark.parametrize("concept", ["Monet", "star", "red"])
def test_pr_neutral_adds_prompts_naming_no_concept_of_the_category_to_the_stored_ones(concept):
    cfgs = C.read_configs(TINY)
    plain = train.check(train.parse_args(tiny(concept))).cpr_prompts
    more = train.check(train.parse_args(tiny(concept, "--pr-neutral", "12"))).cpr_prompts
    assert more[:len(plain)] == plain and len(more) == len(plain) + 12
    category = cfgs.defaults["categories"][concept]
    same = [c for c, k in cfgs.defaults["categories"].items() if k == category]
    added = more[len(plain):]
    assert len(set(added)) == 12 and not any(Z.find_phrases(q, same) for q in added)
    again = train.check(train.parse_args(tiny(concept, "--pr-neutral", "12"))).cpr_prompts
    other = train.check(train.parse_args(tiny(concept, "--pr-neutral", "12", "--seed", "1"))).cpr_prompts
    assert again == more and other != more  # drawn by --seed


def test_beta_is_the_models_stored_value_else_the_papers_and_beta_overrides(random_ckpt, tmp_path):
    tiny_cfgs = C.read_configs(TINY)
    stored = tiny_cfgs.defaults["beta"]
    assert stored != train.BETA  # the tiny model departs from the paper's 0.1 (README)
    assert train.check(train.parse_args(tiny("star"))).beta == stored
    assert train.check(train.parse_args(tiny("star", "--beta", "0.5"))).beta == 0.5
    plan = train.check(train.parse_args(args(random_ckpt, tmp_path / "x.safetensors")))  # stores none
    assert plan.beta == train.BETA == 0.1 and plan.settings["beta"] == 0.1


def test_a_stored_beta_trains_exactly_the_lora_of_the_same_beta_given_as_a_flag(random_ckpt, tmp_path):
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"beta": 5.0}))
    a, b = tmp_path / "stored.safetensors", tmp_path / "flag.safetensors"
    train.main(args(ckpt, a, "--steps", "6", "--eps", "0"))  # ε = 0: any rise of L_pr moves λ
    train.main(args(random_ckpt, b, "--steps", "6", "--eps", "0", "--beta", "5"))
    (fa, ma), (fb, mb) = lora_file.read_lora(a), lora_file.read_lora(b)
    assert json.loads(ma["settings"])["beta"] == 5.0 and ma == mb
    assert all(torch.equal(fa[k], fb[k]) for k in fa) and fa.keys() == fb.keys()
    log = [json.loads(x) for x in a.with_suffix(".jsonl").read_text().splitlines() if '"step"' in x]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    log_b = [json.loads(x) for x in b.with_suffix(".jsonl").read_text().splitlines() if '"step"' in x]
    assert [strip(r) for r in log] == [strip(r) for r in log_b]
    for r, nxt in zip(log, log[1:]):  # Eq. 13 with the stored β: λ ← max(0, λ − β g̃)
        assert nxt["lambda"] == pytest.approx(Z.update_lambda(r["lambda"], r["g_tilde"], 5.0), abs=1e-12)
    assert any(r["lambda"] > 0 for r in log)  # λ moved, so the check above can tell β = 5 from 0.1


def test_eta_is_the_models_stored_value_for_the_category_else_the_papers_and_eta_overrides(random_ckpt,
                                                                                             tmp_path,
                                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: a user's own loras/ must not matter here
    stored = C.read_configs(TINY).defaults["eta"]
    assert stored and all(v != train.ETA for v in stored.values())  # the tiny model departs from 2 (README)
    for concept, category in (("red", "abstraction"), ("Van Gogh", "style"), ("star", "entity")):
        plan = train.check(train.parse_args(tiny(concept)))
        assert plan.eta == plan.settings["eta"] == stored.get(category, train.ETA)
        assert train.check(train.parse_args(tiny(concept, "--eta", "0.7"))).eta == 0.7
    plan = train.check(train.parse_args(args(random_ckpt, tmp_path / "x.safetensors")))  # stores none
    assert plan.eta == plan.settings["eta"] == train.ETA == 2.0


def test_a_stored_eta_trains_exactly_the_lora_of_the_same_eta_given_as_a_flag(random_ckpt, tmp_path):
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"eta": {"entity": 0.5, "style": 7.0}}))  # args: entity
    a, b, paper = (tmp_path / f"{n}.safetensors" for n in ("stored", "flag", "paper"))
    train.main(args(ckpt, a, "--steps", "4"))
    train.main(args(random_ckpt, b, "--steps", "4", "--eta", "0.5"))
    train.main(args(random_ckpt, paper, "--steps", "4"))
    (fa, ma), (fb, mb), (fp, mp) = (lora_file.read_lora(f) for f in (a, b, paper))
    assert json.loads(ma["settings"])["eta"] == 0.5 and ma == mb and json.loads(mp["settings"])["eta"] == 2.0
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not all(torch.equal(fa[k], fp[k]) for k in fa)  # η reaches the loss: 0.5 and 2 train apart


@pytest.mark.parametrize("stored", [-1.0, "1", None, True])
def test_a_bad_stored_eta_is_one_line_naming_zerase_json_and_eta(random_ckpt, tmp_path, capsys, stored):
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"eta": {"entity": stored}}))
    out = tmp_path / "x.safetensors"
    line = refused(train.main, args(ckpt, out), capsys)
    assert "zerase.json" in line and "η" in line and "--eta" in line and not out.exists()
    assert train.check(train.parse_args(args(ckpt, out, "--eta", "1.5"))).eta == 1.5  # the named fix


def test_a_bad_stored_beta_is_one_line_naming_zerase_json_and_beta(random_ckpt, tmp_path, capsys):
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps({"beta": -1}))
    out = tmp_path / "x.safetensors"
    line = refused(train.main, args(ckpt, out), capsys)
    assert "zerase.json" in line and "β" in line and "--beta" in line and not out.exists()
    assert train.check(train.parse_args(args(ckpt, out, "--beta", "0.2"))).beta == 0.2  # the named fix
