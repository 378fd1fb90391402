"""sample.py's command line: every bad input is refused before anything loads, in one `error:` line that names
the flag and the fix, with no file left behind; --compare draws a labelled, upscaled grid.

Refusals run in-process (`sample.main`) with loading forbidden, so a check that came after loading fails the
test; one subprocess shows a real process's exit status and stderr.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as C
import lora_file
import sample
import zerase as Z

ROOT = Path(__file__).resolve().parents[1]


def refused(main, argv, capsys, code=2, started=False) -> str:
    """main(argv) must end with SystemExit(code) and exactly one stderr line "error: ..." (the only line,
    unless the run had `started` and reported progress before); returns it. Any other exception propagates:
    it would have been a traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and (started or len(lines) == 1), err
    return lines[-1]


def zero_lora(model: Path, out: Path, concept: str = "Van Gogh", nan: bool = False) -> Path:
    """A LoRA file for `model` whose B factors are 0 (the base model exactly), or NaN."""
    dit = C.load_zimage(model, text_encoder=False, vae=False).transformer
    spec = Z.LoRASpec(layers=tuple(range(dit.cfg.n_layers)))
    Z.add_lora(dit, spec)
    if nan:
        for m in Z.lora_modules(dit).values():
            m.lora_B.data.fill_(float("nan"))
    lora_file.save_lora(out, dit, spec, lora_file.base_fingerprint(dit), {"concept": concept})
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory, random_ckpt):
    d = tmp_path_factory.mktemp("loras")
    return {"zero": zero_lora(sample.DEFAULT_MODEL, d / "zero.safetensors"),
            "nan": zero_lora(sample.DEFAULT_MODEL, d / "nan.safetensors", nan=True),
            "other base": zero_lora(random_ckpt, d / "other.safetensors")}


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: every refusal must come before it."""
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(sample, "load_zimage", forbidden)
    monkeypatch.setattr(C, "load_zimage", forbidden)


LONG = "a red star in the style of Van Gogh " * 300  # ~2,700 tokens: the encoder reads 512
CASES = [  # (argv, words the message must hold: the flag, and the fix)
    (["--lora", "{zero}:nan"], ["--lora", "finite number >= 0", "e.g."]),
    (["--lora", "{zero}:inf"], ["--lora", "finite number >= 0"]),
    (["--lora", "{zero}:-0.5"], ["--lora", "finite number >= 0"]),
    (["--lora", "{zero}:half"], ["--lora", "must be a number", "e.g."]),
    (["--lora", "{zero}", "--lora", "{zero}:0.5"], ["--lora", "give a weight to every --lora or to none"]),
    (["--lora", "{nan}"], ["--lora", "NaN", "train it again"]),
    (["--lora", "{other base}"], ["--lora", "another base model", "train a LoRA for this model"]),
    (["--lora", "{tmp}/missing.safetensors"], ["--lora", "not a readable", "pass a LoRA written by"]),
    (["--height", "0"], ["--height 0", "multiples of 8", "e.g. --height 8"]),
    (["--height", "60"], ["--height 60", "multiples of 8", "e.g. --height 56"]),
    (["--width", "-8"], ["--width -8", "multiples of 8"]),
    (["--out", "{tmp}/x.jpg"], ["--out", "must end with .png"]),
    (["--out", "{tmp}/" + "a" * 300 + ".png"], ["--out", "too long", "shorter name"]),
    (["--out", "/proc/x.png"], ["--out", "cannot be created", "choose a writable place"]),
    (["--out", "{tmp}/file.txt/x.png"], ["--out", "cannot be created", "choose another place"]),
    (["--prompt", LONG], ["--prompt", "tokens", "at most 512", "shorten it"]),
    (["--negative-prompt", LONG], ["--negative-prompt", "at most 512", "shorten it"]),
    (["--prompt", "a red \udcff star"], ["--prompt", "not valid UTF-8", "pass it in UTF-8"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--guidance", "nan"], ["--guidance", "finite number >= 0"]),
    (["--guidance", "-1"], ["--guidance", "finite number >= 0"]),
    (["--seed", "-1"], ["--seed", "between 0 and"]),
    (["--cols", "0"], ["--cols", "at least 1"]),
    (["--scale", "0"], ["--scale", "between 1 and 16"]),
    (["--compare"], ["--compare", "needs at least one --lora"]),
    (["--dtype", "float8"], ["--dtype", "use one of float32"]),
    (["--device", "tpu"], ["--device", "use cpu"]),
    (["--model", "{tmp}/nowhere"], ["--model", "not a directory"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_bad_input_is_one_line_naming_the_flag_and_the_fix_before_loading(argv, words, loras, tmp_path,
                                                                          capsys, no_loading):
    if "/proc/" in argv[-1] and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    paths = {k: str(v) for k, v in loras.items()} | {"tmp": str(tmp_path)}
    (tmp_path / "file.txt").write_text("")  # a file where a folder would have to be
    argv = [a.format(**paths) if "{" in a and not a.startswith("a red") else a for a in argv]
    line = refused(sample.main, [*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "s.png")])],
                   capsys)
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


def test_a_real_process_refuses_undecodable_argv_in_one_line(tmp_path):
    """Bytes that are not UTF-8 on the command line (argv surrogates): exit 2, one line, no traceback."""
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", b"caf\xe9 star", "--out", out],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --prompt is not valid UTF-8 text; pass it in UTF-8.", r.stderr
    assert not list(tmp_path.iterdir())


def test_an_explicit_size_is_used_as_given(tmp_path):
    """--height/--width are never replaced by the model's size (0 used to mean 64): 16x24 comes out 16x24."""
    out = tmp_path / "s.png"
    sample.main(["--prompt", "a red star", "--height", "16", "--width", "24", "--steps", "1",
                 "--out", str(out)])
    assert np.asarray(Image.open(out)).shape == (16, 24, 3)


def test_every_flag_has_help_and_its_default():
    """--help: every flag explains itself, and a flag with a default shows it."""
    p = sample._parser()
    fmt = p.formatter_class(p.prog)
    for a in p._actions:
        if a.option_strings == ["-h", "--help"]:
            continue
        assert a.help, a.option_strings
        if a.default not in (None, False, []):
            assert "default" in fmt._expand_help(a), a.option_strings
    assert "(default: 0)" in fmt._expand_help(next(a for a in p._actions if a.dest == "seed"))


# ---------------------------------------------------------------------------------------------------
# --compare: labelled rows and columns, tiles upscaled nearest-neighbour


def test_the_labelled_grid_places_each_tile_and_writes_the_labels():
    """Each tile sits where labelled_grid says, unchanged; the label strip and column holds dark text, and
    another prompt gives another header."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (3, 40, 96, 3), generator=g, dtype=torch.uint8) for _ in range(2)]
    names, prompts = ["base", "erased (van-gogh)"], ["a red star", "a blue heart", "a house"]
    img, origins = sample.labelled_grid(rows, names, prompts)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles.numpy()):
            y, x = origins[r][c]
            assert np.array_equal(img[y:y + 40, x:x + 96], tile)
    top, left = origins[0][0]
    assert top > 0 and left > 0
    assert (img[:top, left:] < 128).any() and (img[top:, :left] < 128).any()  # prompts, row names
    other, _ = sample.labelled_grid(rows, names, ["a tan star", "a blue heart", "a house"])
    assert not np.array_equal(other[:top], img[:top]) and np.array_equal(other[top:], img[top:])


def test_long_prompts_are_wrapped_to_the_tile_and_cut_after_three_lines():
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = sample._wrap(draw, "an " + "extraordinarily " * 20 + "Supercalifragilistic" * 3, font, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 120 for line in lines)
    assert sample._wrap(draw, "a red star", font, 120, 3) == ["a red star"]


def test_compare_draws_base_above_erased_upscaled_to_256_pixels(loras, tmp_path):
    """--compare on the 32-px images of a zero LoRA: the default scale is 8 (256 px tiles), both rows are
    the plain sample of each prompt, upscaled nearest-neighbour, and the row names are there."""
    prompts = ["a red star", "a blue heart in the style of Monet"]
    flags = [a for p in prompts for a in ("--prompt", p)]
    flags += ["--height", "32", "--width", "32", "--steps", "2"]
    sample.main([*flags, "--lora", str(loras["zero"]), "--compare", "--out", str(tmp_path / "c.png")])
    sample.main([*flags, "--cols", "2", "--out", str(tmp_path / "plain.png")])
    img, plain = np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "plain.png"))
    tiles = [torch.from_numpy(plain[:, 32 * i:32 * (i + 1)].copy()) for i in range(2)]
    big = sample.upscale(torch.stack(tiles), 8)
    want, origins = sample.labelled_grid([big, big], ["base", "erased (zero)"], prompts)
    assert big.shape[1:3] == (256, 256) and img.shape == want.shape
    for r in range(2):
        for c in range(2):
            y, x = origins[r][c]
            assert np.array_equal(img[y:y + 256, x:x + 256], big[c].numpy())
    assert np.array_equal(img, want)  # labels included
