"""bench/plot_log.py draws a real train.py log: one panel per loss, λ and g̃; the smoothed curves are the
progress bar's values; a file that is no log is refused in one line."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from tests.test_cli_sample import refused
from tests.test_train import args

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_log", ROOT / "bench" / "plot_log.py")
plot_log = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_log)


@pytest.fixture(scope="module")
def log(random_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "circle.safetensors"
    train.main(args(random_ckpt, out, "--steps", "5"))
    return out.with_suffix(".jsonl")


def test_a_real_log_is_drawn_with_a_panel_per_curve(log, tmp_path):
    pytest.importorskip("matplotlib")
    png = plot_log.main([str(log), "--out", str(tmp_path / "curves.png")])
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (5 * 190, 800, 3)  # L_erase, L_attn, L_pr, λ, g̃: 1.9 inches each at 100 dpi
    assert (img < 128).any() and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_the_smoothed_curves_are_the_progress_bars_values(log):
    steps, summary = plot_log.read_log(log)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and summary["finished"] == 5
    s, want = train.Smoothed(), []
    for r in steps:
        want.append(s.update(r)["L_erase"])
    assert plot_log.smoothed(steps)["L_erase"] == want
    assert want[0] == pytest.approx(steps[0]["L_erase"])  # bias-corrected: the first value is the step's own


def test_an_unfinished_log_is_drawn_too(log, tmp_path):
    pytest.importorskip("matplotlib")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:3]))
    steps, summary = plot_log.read_log(cut)
    assert len(steps) == 3 and summary == {}
    assert plot_log.main([str(cut)]).exists()


@pytest.mark.parametrize("content, argv, words", [
    (None, [], ["cannot read the log", "pass the .jsonl"]),
    ("", [], ["holds no training steps", "at least one step"]),
    (json.dumps({"finished": 0, "seconds": 1.0}) + "\n", [], ["holds no training steps"]),
    ("{not json\n", [], ["line 1 is not JSON"]),
    ("ok", ["--out", "{tmp}/x.jpg"], ["--out", "must end with .png"]),
])
def test_a_file_that_is_no_log_is_one_line(content, argv, words, log, tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(log.read_text() if content == "ok" else content)
    line = refused(plot_log.main, [str(path), *[a.format(tmp=tmp_path) for a in argv]], capsys)
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([path.name] if content is not None else [])
