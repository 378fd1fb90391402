"""erase_many.py: several concepts, one process each, under torchrun (gloo, two CPU processes) on the
embedded tiny model. Each concept's LoRA and log are what train.py writes for it alone with the same flags;
the merged file is the Eq. 63 average apply_loras builds from the separate files; a rerun skips finished
concepts and resumes an interrupted one; bad input ends in one `error:` line before anything trains.

The launcher runs in a subprocess (`torchrun`, or `python -m torch.distributed.run` where it is not on
PATH); the reference runs and the bad-input cases run in-process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoint as C
import erase_many
import lora_file
import sample
import train
import zerase as Z

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ("Van Gogh", "star", "red")  # 3 concepts on 2 ranks: rank 0 takes Van Gogh and red
NAMES = ("van-gogh", "star", "red")  # train.py's default file names
# a few 32-pixel steps; ε = 0 so that λ moves; a checkpoint at step 2, which the resume test stops after
FLAGS = ("--steps", "3", "--pool", "2", "--variants", "4", "--resolution", "32", "--eps", "0",
         "--preserve", "a blue heart", "--preserve", "a green tree", "--checkpoint-every", "2")
RANK_THREADS = max(1, (os.cpu_count() or 1) // 2)  # what each of the 2 ranks uses


def launcher() -> list[str]:
    """torchrun, or the same launcher as a module of this interpreter where torchrun is not on PATH."""
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def start(out: Path, *extra: str, concepts=CONCEPTS, flags=FLAGS) -> subprocess.Popen:
    """erase_many.py under the launcher, two processes on the CPU; stdout and stderr go to out.log."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*launcher(), "--standalone", "--nproc-per-node", "2", str(ROOT / "erase_many.py"),
           "--concepts", ",".join(concepts), "--out", str(out), *extra, "--", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_path = Path(log.name)
    log.close()
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait for a launcher run; its output, which must show success."""
    proc.wait(timeout=300)
    text = proc.log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def train_alone(out_dir: Path, concept: str, name: str) -> None:
    """train.py on one concept with the same flags, in-process, with the ranks' number of torch threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        train.main([*FLAGS, "--concept", concept, "--out", str(out_dir / f"{name}.safetensors")])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder written by erase_many with --merge, folder of one-by-one train.py runs, launcher output). The
    reference runs while the launcher does."""
    root = tmp_path_factory.mktemp("erase_many")
    proc = start(root / "many", "--merge", str(root / "many" / "merged.safetensors"))
    try:
        for concept, name in zip(CONCEPTS, NAMES):
            train_alone(root / "alone", concept, name)
    except BaseException:
        proc.kill()
        raise
    return root / "many", root / "alone", finish(proc)


def tensors_and_meta(path: Path) -> tuple[dict, dict]:
    """A safetensors file's tensors and metadata, as stored."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_lora(a: Path, b: Path) -> None:
    """Two LoRA files hold the same tensors, bit for bit, and the same metadata."""
    ta, ma = tensors_and_meta(a)
    tb, mb = tensors_and_meta(b)
    assert ma == mb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def steps_logged(log: Path) -> list[dict]:
    """A run's per-step records (the closing record holds timings, which differ between runs)."""
    return [r for r in map(json.loads, log.read_text().splitlines()) if "step" in r]


@pytest.mark.slow
def test_each_concept_gets_the_lora_and_log_train_py_writes_for_it_alone(runs):
    """Rank r trains concepts r, r + 2, ... with cpu_count // 2 threads; every LoRA equals, tensor for tensor
    and in its metadata, the one train.py writes for that concept alone, and so does every logged step."""
    many, alone, out = runs
    for rank, concept in ((0, "Van Gogh"), (1, "star"), (0, "red")):
        assert f"[rank {rank}/2] train {concept!r}" in out
    assert out.count(f"(cpu, {RANK_THREADS} torch threads)") == 3
    for name in NAMES:
        assert_same_lora(many / f"{name}.safetensors", alone / f"{name}.safetensors")
        steps = steps_logged(many / f"{name}.jsonl")
        assert steps == steps_logged(alone / f"{name}.jsonl") and [r["step"] for r in steps] == [1, 2, 3]
    assert any(r["lambda"] > 0 for r in steps_logged(many / "red.jsonl"))  # λ did move (ε = 0)


def load_dit():
    """The tiny model's DiT, fresh from its checkpoint."""
    return C.load_zimage(sample.DEFAULT_MODEL, text_encoder=False, vae=False).transformer


@pytest.mark.slow
def test_the_merged_file_is_the_eq_63_average_of_the_concepts_loras(runs, tmp_path):
    """apply_loras of the merged file gives the model apply_loras of the three files gives (same factors,
    same scale, same output); its metadata says what it is made of; sample.py --lora reads it."""
    many, _, out = runs
    merged, files = many / "merged.safetensors", [many / f"{n}.safetensors" for n in NAMES]
    assert "wrote" in out and str(merged) in out
    averaged, single = load_dit(), load_dit()
    lora_file.apply_loras(averaged, files)
    lora_file.apply_loras(single, [merged])
    sa, sb = Z.lora_state(averaged), Z.lora_state(single)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    scales = [{m.scale for m in Z.lora_modules(dit).values()} for dit in (averaged, single)]
    assert scales[0] == scales[1] == {1.0}
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(1, 4, 8, 8, generator=g), [torch.randn(7, 64, generator=g)]
    with torch.no_grad():
        assert torch.equal(averaged(x, torch.tensor([0.5]), cap), single(x, torch.tensor([0.5]), cap))
    _, meta = lora_file.read_lora(merged)
    settings = json.loads(meta["settings"])
    assert json.loads(meta["concepts"]) == list(CONCEPTS) and meta["concept"] == ", ".join(CONCEPTS)
    assert (meta["rank"], meta["scale"], settings["weights"]) == (12, 1.0, [1 / 3] * 3)
    for f, c in zip(files, settings["components"]):
        _, m = lora_file.read_lora(f)
        assert (c["file"], c["sha256"], c["concept"], c["rank"], c["scale"]) == \
            (f.name, erase_many.sha256(f), m["concept"], m["rank"], m["scale"])
        assert c["settings"] == json.loads(m["settings"])
    png = sample.main(["--lora", str(merged), "--prompt", "a star", "--height", "32", "--width", "32",
                       "--steps", "1", "--out", str(tmp_path / "merged.png")])
    assert png.exists()


def interrupted_after_two_steps(monkeypatch, out_dir: Path, concept: str, name: str) -> None:
    """train.py on one concept, stopped (as by Ctrl-C) once step 2's checkpoint is written."""
    step = train.STEPS["implicit"]

    def stop_at_2(run, i):
        """The step function, except that step 3 (index 2) is interrupted before it starts."""
        if i == 2:
            raise KeyboardInterrupt
        return step(run, i)

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setitem(train.STEPS, "implicit", stop_at_2)
        train_alone(out_dir, concept, name)


@pytest.mark.slow
def test_a_rerun_skips_finished_concepts_and_resumes_an_interrupted_one(runs, tmp_path, monkeypatch):
    """Van Gogh and red finished (their files are left untouched), star stopped after step 2: the same command
    skips the first two, resumes star from its checkpoint, and ends where the uninterrupted runs did."""
    many, alone, _ = runs
    again = tmp_path / "many"
    again.mkdir()
    for name in ("van-gogh", "red"):
        for suffix in (".safetensors", ".jsonl"):
            shutil.copy2(many / f"{name}{suffix}", again / f"{name}{suffix}")
    interrupted_after_two_steps(monkeypatch, again, "star", "star")
    assert (again / "star.ckpt.safetensors").exists() and not (again / "star.safetensors").exists()
    finished = {n: (again / f"{n}.safetensors").stat().st_mtime_ns for n in ("van-gogh", "red")}
    out = finish(start(again, "--merge", str(again / "merged.safetensors")))
    assert "[rank 0/2] skip 'Van Gogh'" in out and "[rank 0/2] skip 'red'" in out
    assert "[rank 1/2] resume 'star'" in out
    assert f"resumed from {again / 'star.ckpt.safetensors'} at step 2" in out
    assert "] train '" not in out
    assert finished == {n: (again / f"{n}.safetensors").stat().st_mtime_ns for n in ("van-gogh", "red")}
    assert_same_lora(again / "star.safetensors", alone / "star.safetensors")
    assert steps_logged(again / "star.jsonl") == steps_logged(alone / "star.jsonl")
    assert (again / "merged.safetensors").read_bytes() == (many / "merged.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit status 2, nothing trained


@pytest.fixture
def alone(monkeypatch):
    """erase_many.main in this process, as `python erase_many.py` (world size 1), with train.main
    replaced by a function that fails the test: nothing may train."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"train.main was called with {argv}"))
    return erase_many.main


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(arguments, what the error must say) for each kind of bad input."""
    out, afile = str(tmp_path / "out"), tmp_path / "a-file"
    afile.write_text("")
    return [(["--concepts", "", "--out", out], "--concepts is empty"),
            (["--concepts", " , ", "--out", out], "--concepts is empty"),
            (["--concepts", "star,,red", "--out", out], "has an empty name"),
            (["--concepts", "Van Gogh,star,van gogh", "--out", out], "'Van Gogh' and 'van gogh'"),
            (["--concepts", "star", "--out", str(afile / "loras")], "not a writable folder"),
            (["--concepts", "star", "--out", out, "--model", str(tmp_path / "no-model")], "not a directory"),
            (["--concepts", "star,Rembrandt", "--out", out], "concept 'Rembrandt': the model does not know"),
            (["--concepts", "star", "--out", out, "--", "--steps", "x"], "invalid int value: 'x'"),
            (["--concepts", "star", "--out", out, "--", "--steps", "0"], "--steps must be at least 1"),
            (["--concepts", "star", "--out", out, "--", "--device", "cpu"], "erase_many sets --concept"),
            (["--concepts", "star", "--out", out, "--merge", f"{out}/star.safetensors"], "own LoRA files")]


def test_bad_input_ends_in_one_error_line_and_exit_status_2_before_anything_trains(alone, tmp_path, capsys):
    """Empty or duplicate concepts, an unwritable --out, a missing --model, an unknown concept, bad or
    reserved train.py flags, a --merge onto a component: one `error:` line naming it, exit status 2."""
    for argv, says in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            alone(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], argv
        assert not list(tmp_path.glob("**/*.safetensors")), argv


def test_a_concept_that_fails_does_not_stop_the_others_and_no_merged_file_is_written(alone, tmp_path,
                                                                                      monkeypatch, capsys):
    """A run that fails (here: train.py ending on a NaN loss, exit status 3) is reported at the end, after
    the rank's other concepts have trained; the merge is not written and says why."""
    calls = []

    def fake_train(argv):
        """Fails for star, writes an (empty) LoRA file for the others."""
        concept, out = argv[argv.index("--concept") + 1], Path(argv[argv.index("--out") + 1])
        calls.append(concept)
        if concept == "star":
            erase_many.die("the loss became NaN/inf at step 2", code=3)
        out.write_bytes(b"")

    monkeypatch.setattr(train, "main", fake_train)
    merged, threads = tmp_path / "merged.safetensors", torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            alone(["--concepts", ",".join(CONCEPTS), "--out", str(tmp_path), "--merge", str(merged)])
    finally:
        torch.set_num_threads(threads)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 3 and calls == list(CONCEPTS) and not merged.exists()
    assert err[0] == "error: the loss became NaN/inf at step 2" and len(err) == 2
    assert err[1].startswith("error: rank 0: 1 of 3 concepts failed ('star': exit 3); ")
    assert f"{merged} was not written: star.safetensors missing; fix the errors above and rerun" in err[1]


def test_bad_input_under_the_launcher_and_alone_prints_one_line_and_no_traceback(tmp_path):
    """As a real process: exit status 2 alone; under torchrun rank 0 prints the one line (the other rank
    found the same and stays quiet), the worker's exit code 2 is in the launcher's report."""
    cmd = [sys.executable, str(ROOT / "erase_many.py"), "--concepts", "star,star", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --concepts names 'star' and 'star'")
    proc = start(tmp_path / "many", concepts=("star", "star"))
    proc.wait(timeout=120)
    text = proc.log_path.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [r.stderr.strip()] and "exitcode  : 2" in text
    assert not list(tmp_path.glob("**/*.safetensors"))
