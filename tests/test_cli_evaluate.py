"""evaluate.py's command line: bad input refused before anything loads (one `error:` line naming the flag
and the fix, exit 2, no file left), outputs checked up front and written atomically, a progress bar while
images are drawn.
"""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint as C
import evaluate as E
from tests.test_cli_sample import refused, zero_lora
from tests.test_evaluate import FakeModel, fake  # noqa: F401  (fake: a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {"zero": zero_lora(E.DEFAULT_MODEL, d / "zero.safetensors", concept="red"),
            "unscored": zero_lora(E.DEFAULT_MODEL, d / "rembrandt.safetensors", concept="Rembrandt")}


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(C, "load_zimage", forbidden)


CASES = [  # (argv, words the message must hold: the flag, and the fix)
    (["--lora", "{zero}", "--concept", "Rembrandt"], ["--concept 'Rembrandt'",
                                                      "it is one of Van Gogh, Monet"]),
    (["--lora", "{zero}", "--concept", "van gohg"], ["--concept 'van gohg'", "did you mean 'Van Gogh'?"]),
    (["--lora", "{unscored}"], ["--lora", "'Rembrandt'", "pass --concept with one it does"]),
    (["--lora", "{tmp}/missing.safetensors"], ["--lora", "not a readable", "pass a LoRA written by"]),
    (["--concept", "red"], ["--concept", "pass the --lora"]),
    (["--prompts", "0"], ["--prompts", "at least 1"]),
    (["--prompts", "-3"], ["--prompts", "at least 1"]),
    (["--seeds", "-1"], ["--seeds", "at least 1"]),
    (["--seeds", "0"], ["--seeds", "at least 1"]),
    (["--threads", "0"], ["--threads", "at least 1", "leave it out"]),
    (["--json", "{tmp}/r.txt"], ["--json", "must end with .json"]),
    (["--json", "{tmp}/" + "r" * 300 + ".json"], ["--json", "too long", "shorter name"]),
    (["--json", "/proc/r.json"], ["--json", "cannot be created", "choose a writable place"]),
    (["--grid", "{tmp}/g.jpg"], ["--grid", "must end with .png"]),
    (["--grid", "/proc/g.png"], ["--grid", "cannot be created", "choose a writable place"]),
    (["--grid", "{tmp}/g.png", "--lora", "{zero}"], ["--grid", "without --lora"]),
    (["--reliability", "--lora", "{zero}"], ["--reliability", "without --lora"]),
    (["--cache", "{tmp}/file.txt/cache"], ["--cache", "cannot be created", "choose another place"]),
    (["--model", "{tmp}/nowhere"], ["--model", "not a directory"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_bad_input_is_one_line_naming_the_flag_and_the_fix_before_loading(argv, words, loras, tmp_path,
                                                                          capsys, no_loading):
    if any(a.startswith("/proc/") for a in argv) and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "file.txt").write_text("")  # a file where a folder would have to be
    paths = {k: str(v) for k, v in loras.items()} | {"tmp": str(tmp_path)}
    line = refused(E.main, [a.format(**paths) for a in argv] + ["--cache", str(tmp_path / "cache")]
                   * ("--cache" not in argv), capsys)
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written, no cache folder


def test_concepts_are_looked_up_in_any_case(loras, tmp_path, no_loading):
    """--concept ' VAN GOGH ' is Van Gogh; without --concept, the concept the LoRA was trained on."""
    args = E._parser().parse_args(["--lora", str(loras["zero"]), "--concept", " VAN GOGH ", "--concept",
                                   "van gogh", "--no-cache"])
    assert E._check(args) == ["Van Gogh"]
    assert E._check(E._parser().parse_args(["--lora", str(loras["zero"]), "--no-cache"])) == ["red"]


def test_a_real_process_refuses_an_unknown_concept_without_a_traceback(loras, tmp_path):
    """It used to end in a KeyError traceback."""
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--lora", str(loras["zero"]), "--concept",
                        "Rembrandt", "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--concept 'Rembrandt'" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_the_json_is_written_atomically_and_a_failed_write_names_the_users_path(monkeypatch, tmp_path,
                                                                                 capsys):
    """--json gets the figures; a full disk ends in one line naming --json's path (exit 1), no partial
    file."""
    monkeypatch.setattr(E, "_run", lambda args, concepts: {"H_a": 0.5})
    out = tmp_path / "r.json"
    E.main(["--json", str(out), "--no-cache"])
    assert json.loads(out.read_text()) == {"H_a": 0.5} and [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    out.unlink()
    line = refused(E.main, ["--json", str(out), "--no-cache"], capsys, code=1)
    assert f"could not write {out} (No space left on device)" in line and ".tmp" not in line
    assert not list(tmp_path.iterdir())


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    def interrupted(args, concepts):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "_run", interrupted)
    line = refused(E.main, ["--json", str(tmp_path / "r.json"), "--no-cache"], capsys, code=130)
    assert "interrupted" in line and not list(tmp_path.iterdir())


def test_the_progress_bar_counts_the_images_the_sampler_draws(capsys):
    """The bar is fed by the DiT's calls: 3 images drawn (CFG on the tiny model) show as 3/3."""
    zi = C.load_zimage(E.DEFAULT_MODEL)
    assert E.sampling_settings(zi)["guidance"] > 0  # CFG: two rows per image per DiT call
    with E.progress([zi], "drawing", 3) as bar:
        E.sample_images(zi, [("a red star", 0), ("a blue heart", 1), ("", 2)], batch=2)
    assert bar.n == 3 and "3/3" in capsys.readouterr().err
    assert not zi.transformer._forward_pre_hooks  # removed afterwards


def test_the_bar_total_is_what_the_report_draws(fake, monkeypatch):  # noqa: F811
    """_report_images is every distinct image of both models, less the base images in the cache."""
    monkeypatch.setattr(E, "model_key", lambda zi: zi.tag)
    cache = E.ImageCache()
    for _ in range(2):  # the second time the base images come from the cache
        total = E._report_images(FakeModel("base"), "Van Gogh", 1, [0, 1], cache)
        r = E.erasure_report(FakeModel("base"), FakeModel("erased"), None, "Van Gogh", 1, [0, 1], cache=cache)
        assert total == r["images"]["drawn_base"] + r["images"]["drawn_erased"]
    assert r["images"]["drawn_base"] == 0


def test_every_flag_has_help_and_its_default():
    p = E._parser()
    fmt = p.formatter_class(p.prog)
    for a in p._actions[1:]:  # after -h
        assert a.help, a.option_strings
        if a.default not in (None, False, []):
            assert "default" in fmt._expand_help(a), a.option_strings
