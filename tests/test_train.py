"""train.py end to end on the small random checkpoint: what a run writes, exact resumption, the modes and
baselines, and how it stops on bad input or a NaN loss (one `error:` line, no traceback, no LoRA file).

Runs are in-process (`train.main`, a few 32-pixel steps each); a subprocess only where the exit status and
stderr of a real process are the point.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as C
import lora_file
import train
import zerase as Z

ROOT = Path(__file__).resolve().parents[1]


def args(ckpt, out, *extra) -> list[str]:
    return ["--concept", "circle", "--model", str(ckpt), "--category", "entity", "--resolution", "32",
            "--pool", "2", "--variants", "4", "--out", str(out), *extra]


def log_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()) if "step" in r]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# The reference run: 6 steps, checkpoints at 3 and 6, ε = 0 so that λ has to move (any rise of L_pr makes
# g̃ < 0). Other tests reproduce it in pieces and compare.
BASE = ("--steps", "6", "--checkpoint-every", "3", "--eps", "0")


@pytest.fixture(scope="module")
def reference(random_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "circle.safetensors"
    assert train.main(args(random_ckpt, out, *BASE)) == out
    return out


# ---------------------------------------------------------------------------------------------------
# What a run writes


def test_a_run_writes_a_lora_file_and_a_log_of_every_loss_and_lambda_per_step(reference):
    """A run writes a trained zerase LoRA and a JSONL log of L_erase, L_attn, L_pr and λ ≥ 0 per step."""
    # Every B moves from 0 except the last layer's to_q: gated, it only changes that layer's caption
    # queries, which no output reads, so it gets no gradient. λ does become positive (ε = 0).
    factors, meta = lora_file.read_lora(reference)
    assert meta["concept"] == "circle" and meta["gated"]
    last = f"layers.{max(meta['layers'])}.attention.to_q.lora_B"
    for k in (k for k in factors if k.endswith("lora_B")):
        assert (factors[k].abs().sum() > 0) == (k != last), k
    recs = log_records(reference)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert all(math.isfinite(r[k]) for k in ("L_erase", "L_attn", "L_pr", "lambda"))
        assert r["lambda"] >= 0 and r["L_erase"] > 0 and r["L_attn"] > 0
    assert max(r["lambda"] for r in recs) > 0


def test_the_logged_lambda_follows_the_implicit_update_of_eq_15(reference):
    """Each logged λ is max(0, λ_prev - β g̃_prev), g̃ = (L_pr before - after)/α + ε (Eqs. 13, 15)."""
    alpha, beta, eps = 1e-3, 0.1, 0.0  # train.py's --lr and --beta defaults, BASE's --eps
    recs = log_records(reference)
    assert recs[0]["lambda"] == 0.0
    for prev, cur in zip(recs, recs[1:]):
        g = (prev["L_pr_before_measured"] - prev["L_pr_after"]) / alpha + eps  # default: --gtilde-batch fresh
        assert prev["g_tilde"] == pytest.approx(g, rel=1e-9, abs=1e-12)
        assert cur["lambda"] == pytest.approx(max(0.0, prev["lambda"] - beta * g), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("where", ["fresh", "train"])
def test_g_tilde_is_measured_on_the_chosen_batch_before_and_after_the_update(random_ckpt, tmp_path, where):
    """--gtilde-batch fresh: g̃ = (L_pr before - after)/α + ε on a separate preservation batch, measured
    before and after the same update; train (Algorithm 1 literally): on the training batch, whose L_pr
    (before) is the one the step was trained on. λ follows Eq. 13 from that g̃ either way."""
    alpha, beta = 1e-3, 0.1
    out = tmp_path / f"{where}.safetensors"
    train.main(args(random_ckpt, out, "--steps", "4", "--eps", "0", "--gtilde-batch", where))
    recs = log_records(out)
    before = "L_pr_before_measured" if where == "fresh" else "L_pr"
    for prev, cur in zip(recs, recs[1:]):
        g = (prev[before] - prev["L_pr_after"]) / alpha
        assert prev["g_tilde"] == pytest.approx(g, rel=1e-9, abs=1e-12)
        assert cur["lambda"] == pytest.approx(max(0.0, prev["lambda"] - beta * g), rel=1e-9, abs=1e-12)
    if where == "fresh":  # another batch than the fitted one, renewed every other step
        assert any(r["L_pr_before_measured"] != r["L_pr"] for r in recs[1:])
        assert [r["L_pr_before_measured"] for r in recs[1::2]] == [r["L_pr_after"] for r in recs[0::2]]
        assert recs[2]["L_pr_before_measured"] != recs[1]["L_pr_after"]
    else:
        assert all("L_pr_before_measured" not in r for r in recs)
    assert json.loads(lora_file.read_lora(out)[1]["settings"])["gtilde_batch"] == where


def test_within_a_generous_tolerance_lambda_stays_at_zero_not_below(random_ckpt, tmp_path):
    """With ε = 1 (g̃ > 0 at every step) the projection of Eq. 13 keeps λ at exactly 0, never below."""
    out = tmp_path / "eps1.safetensors"
    train.main(args(random_ckpt, out, "--steps", "3", "--eps", "1"))
    recs = log_records(out)
    assert all(r["g_tilde"] > 0 for r in recs)
    assert [r["lambda"] for r in recs] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# Resumption


def step_lines(out: Path) -> list[str]:
    return [line for line in out.with_suffix(".jsonl").read_text().splitlines() if '"step"' in line]


def interrupt_in_step(n: int, monkeypatch):
    """Ctrl-C in the n-th step's losses; returns the real train.losses."""
    real, calls = train.losses, []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "losses", interrupting)
    return real


def test_resuming_after_an_interrupt_gives_a_bit_identical_lora_and_log(random_ckpt, tmp_path, monkeypatch,
                                                                        reference, capsys):
    """Ctrl-C ends the run with one line and exit 130, keeping the checkpoint and the log of the checkpointed
    steps; --resume then gives the uninterrupted run's LoRA bit for bit, and the same per-step log."""
    out = tmp_path / "circle.safetensors"
    real = interrupt_in_step(5, monkeypatch)  # the last checkpoint is at step 3
    with pytest.raises(SystemExit) as e:
        train.main(args(random_ckpt, out, *BASE))
    assert e.value.code == 130
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "interrupted at step 4" in lines[0] and "--resume" in lines[0], lines
    assert not out.exists() and out.with_suffix(".ckpt.safetensors").exists()
    assert [r["step"] for r in log_records(out)] == [1, 2, 3]

    monkeypatch.setattr(train, "losses", real)
    train.main(args(random_ckpt, out, *BASE, "--resume"))
    assert "resumed from" in capsys.readouterr().err
    got, want = lora_file.read_lora(out)[0], lora_file.read_lora(reference)[0]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert step_lines(out) == step_lines(reference)
    assert not out.with_suffix(".ckpt.safetensors").exists()  # removed after the finished run


@pytest.mark.parametrize("extra", [("--anchor", "null"), ("--erase-steps", "3")])
def test_resuming_with_the_papers_anchor_or_erase_steps_gives_a_bit_identical_lora_and_log(random_ckpt,
                                                                                          tmp_path, monkeypatch,
                                                                                          extra):
    """The same with --anchor null, whose erase references are computed per step in chunks of
    run.ref_chunk steps (train.frozen_reference) rather than kept with the pool: the resumed run computes
    the chunk it resumes in as the uninterrupted run did; and with --erase-steps, where which draws keep the
    frozen output is a function of the pool and (seed, step)."""
    paper = (*BASE, *extra)
    want = train.main(args(random_ckpt, tmp_path / "uninterrupted.safetensors", *paper))
    out = tmp_path / "circle.safetensors"
    real = interrupt_in_step(5, monkeypatch)
    with pytest.raises(SystemExit):
        train.main(args(random_ckpt, out, *paper))
    monkeypatch.setattr(train, "losses", real)
    train.main(args(random_ckpt, out, *paper, "--resume"))
    got, ref = lora_file.read_lora(out)[0], lora_file.read_lora(want)[0]
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert step_lines(out) == step_lines(want)


def test_resuming_at_the_start_of_a_measurement_pair_gives_the_same_log(random_ckpt, tmp_path, monkeypatch,
                                                                       reference, capsys):
    """A checkpoint after step 4 (steps 4 and 5 share a fresh measurement batch): step 4's "before" was
    measured in step 3's call, with step 3's "after"; the resumed run uses that saved value, so its log
    (the measured L_pr before and after, g̃, λ) is the uninterrupted run's line for line."""
    out = tmp_path / "circle.safetensors"
    real = interrupt_in_step(6, monkeypatch)  # the last checkpoint is at step 4
    with pytest.raises(SystemExit):
        train.main(args(random_ckpt, out, "--steps", "6", "--checkpoint-every", "2", "--eps", "0"))
    monkeypatch.setattr(train, "losses", real)
    measured, real_values = [], train.pr_values
    monkeypatch.setattr(train, "pr_values", lambda run, bs: measured.append(len(bs)) or real_values(run, bs))
    train.main(args(random_ckpt, out, *BASE, "--resume"))
    assert "resumed from" in capsys.readouterr().err
    assert measured == [1, 2]  # step 4's "after"; step 5's with the next pair's: no "before" measured again
    assert step_lines(out) == step_lines(reference)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(random_ckpt, tmp_path, monkeypatch,
                                                                     capsys, reference):
    """A NaN loss stops the run with one error line, no LoRA file; the last checkpoint loads and resumes."""
    # resuming from it finishes with the uninterrupted run's LoRA bit for bit
    out = tmp_path / "circle.safetensors"
    real, calls = Z.erase_loss, []

    def nan_at_step_5(*a):
        calls.append(1)
        return real(*a) * (math.nan if len(calls) == 5 else 1.0)

    monkeypatch.setattr(Z, "erase_loss", nan_at_step_5)
    with pytest.raises(SystemExit) as e:
        train.main(args(random_ckpt, out, "--steps", "6", "--checkpoint-every", "2", "--eps", "0"))
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "NaN" in lines[0] and "step 5" in lines[0], err
    ckpt = out.with_suffix(".ckpt.safetensors")
    assert str(ckpt) in lines[0] and "Traceback" not in err
    assert not out.exists()

    dit = C.load_zimage(random_ckpt, text_encoder=False, vae=False).transformer
    params = Z.add_lora(dit, Z.LoRASpec(layers=(0, 1)))
    opt = torch.optim.AdamW(params, lr=1e-3)
    meta = C.load_training_state(ckpt, {"lora": dit}, {"opt": opt}, only=lambda k: "lora_" in k)
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in params)

    monkeypatch.setattr(Z, "erase_loss", real)
    train.main(args(random_ckpt, out, *BASE, "--resume"))
    got, want = lora_file.read_lora(out)[0], lora_file.read_lora(reference)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------
# --check-gtilde: the exact g_t of Eq. 33 next to g̃ (Lemma C.3)


def test_check_gtilde_logs_the_exact_g_every_n_steps_and_changes_no_training(reference, random_ckpt,
                                                                             tmp_path):
    out = tmp_path / "checked.safetensors"
    train.main(args(random_ckpt, out, *BASE, "--check-gtilde", "2"))
    recs, ref = log_records(out), log_records(reference)
    assert [r["step"] for r in recs if "g_exact" in r] == [2, 4, 6]  # the log counts steps from 1
    assert all(r["step_sq"] > 0 for r in recs if "g_exact" in r)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("g_exact", "step_sq")}  # noqa: E731
    assert [strip(r) for r in recs] == ref  # the same losses, g̃ and λ at every step
    got, want = lora_file.read_lora(out)[0], lora_file.read_lora(reference)[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_exact_g_is_what_the_loss_difference_tends_to_as_the_step_shrinks(random_ckpt, tmp_path):
    """Lemma C.3 on the model itself: from a θ where ∇L_pr ≠ 0, a step Δθ = −α·u gives g̃ (Eq. 34, two
    losses) and exact_g's g = ∇L_pr·u + ε (Eq. 33); their gap is the Taylor remainder over α, so it shrinks
    in proportion to α (Eq. 35) while g itself does not. A wrong sign or scale in exact_g leaves a gap that
    does not shrink."""
    eps = 1e-3
    run = train.prepare(train.parse_args(args(random_ckpt, tmp_path / "x.safetensors", "--steps", "1",
                                              "--eps", str(eps))))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.params:  # away from θ_0 = 0, where ∇L_pr = 0 (the references are θ_0's velocities)
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    u = [torch.randn(p.shape, generator=gen) for p in run.params]
    batch = run.preserve.batch([0, 1])
    grads, theta = train.pr_gradient(run, batch)
    gaps, gs = [], []
    for alpha in (1e-1, 1e-2, 1e-3):
        run.args.lr = alpha
        with torch.no_grad():
            for p, t, d in zip(run.params, theta, u):
                p.copy_(t - alpha * d)
        g = train.exact_g(run, grads, theta)
        assert g["step_sq"] == pytest.approx(alpha**2 * sum(d.square().sum().item() for d in u), rel=1e-4)
        with torch.no_grad():
            for p, t in zip(run.params, theta):
                p.copy_(t)
        before = train.pr_value(run, batch)
        with torch.no_grad():
            for p, t, d in zip(run.params, theta, u):
                p.copy_(t - alpha * d)
        g_tilde = Z.g_tilde(before, train.pr_value(run, batch), alpha, eps)
        gaps.append(abs(g_tilde - g["g_exact"]))
        gs.append(g["g_exact"])
    assert abs(gs[0] - eps) > 10 * gaps[-1]  # g is not ε: the check can tell a right g from a wrong one
    assert gs[0] == pytest.approx(gs[-1], rel=1e-5)  # ∇L_pr·d does not depend on α
    assert 5 < gaps[0] / gaps[1] < 20 and 5 < gaps[1] / gaps[2] < 20, gaps  # O(α): ×10 per ×10 in α


def test_check_gtilde_is_refused_where_there_is_no_g_tilde(random_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(args(random_ckpt, tmp_path / "x.safetensors", "--steps", "2", "--mode", "exact",
                        "--check-gtilde", "5"))
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--check-gtilde" in lines[0] and "implicit" in lines[0], lines
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# Modes and baselines


def test_exact_mode_logs_the_lambda_star_of_each_step(random_ckpt, tmp_path, monkeypatch):
    """--mode exact logs, at each step, the λ* ≥ 0 that the gradient surgery (Eqs. 11-12) returned."""
    seen = []
    real = Z.d_star_per_param

    def recording(*a):
        d, lam = real(*a)
        seen.append(float(lam))
        return d, lam

    monkeypatch.setattr(Z, "d_star_per_param", recording)
    out = tmp_path / "exact.safetensors"
    train.main(args(random_ckpt, out, "--steps", "3", "--mode", "exact", "--eps", "0"))
    recs = log_records(out)
    assert [r["lambda"] for r in recs] == seen and len(seen) == 3
    assert all(lam >= 0 for lam in seen)
    assert all("g_tilde" not in r for r in recs)
    assert json.loads(lora_file.read_lora(out)[1]["settings"])["mode"] == "exact"


def test_a_fixed_lambda_is_logged_and_used(random_ckpt, tmp_path):
    """--fixed-lambda 0.5 logs λ = 0.5 at every step, and the run differs from --fixed-lambda 0."""
    loras = {}
    for lam in ("0.5", "0"):
        out = tmp_path / f"fixed{lam}.safetensors"
        train.main(args(random_ckpt, out, "--steps", "3", "--fixed-lambda", lam))
        assert [r["lambda"] for r in log_records(out)] == [float(lam)] * 3
        assert all("g_tilde" not in r for r in log_records(out))
        loras[lam] = lora_file.read_lora(out)[0]
    assert any(not torch.equal(loras["0.5"][k], loras["0"][k]) for k in loras["0"])


def test_without_the_attention_loss_l_attn_is_zero_and_the_run_finishes(random_ckpt, tmp_path):
    """--losses erase,pr trains without Eq. 6: L_attn is logged as 0 at every step, L_erase is not."""
    out = tmp_path / "no-attn.safetensors"
    train.main(args(random_ckpt, out, "--steps", "2", "--losses", "erase,pr"))
    recs = log_records(out)
    assert all(r["L_attn"] == 0.0 and r["L_erase"] > 0 for r in recs)
    assert json.loads(lora_file.read_lora(out)[1]["settings"])["losses"] == ["erase", "pr"]


def test_no_gate_trains_an_ungated_lora(random_ckpt, tmp_path):
    """--no-gate runs and its file says gate = none, so it is applied to every token."""
    out = tmp_path / "no-gate.safetensors"
    train.main(args(random_ckpt, out, "--steps", "2", "--no-gate"))
    _, meta = lora_file.read_lora(out)
    assert meta["gate"] == "none" and not meta["gated"]
    assert len(log_records(out)) == 2


def test_every_preservation_prompt_gets_a_trajectory_and_pr_batch_draws_several(random_ckpt, tmp_path,
                                                                                 monkeypatch):
    """With more --preserve prompts than --pool, each prompt still gets its own frozen trajectory (a pool
    cut at --pool would never preserve the last ones), and --pr-batch K puts K of them in every step."""
    pools, batches = [], []
    real_pool, real_values = train.trajectory_pool, train.pr_values
    monkeypatch.setattr(train, "trajectory_pool", lambda zi, conds, *a: pools.append(len(conds)) or
                        real_pool(zi, conds, *a))
    monkeypatch.setattr(train, "pr_values", lambda run, bs: batches.extend(
        (len(b.x), len(b.c_pr), len(b.v_c)) for b in bs) or real_values(run, bs))
    prompts = ["a red square", "a blue star", "a green tree", "a pink moon", "a cyan heart"]
    out = tmp_path / "prbatch.safetensors"
    train.main(args(random_ckpt, out, "--steps", "2", "--pr-batch", "3",
                    *[a for p in prompts for a in ("--preserve", p)]))
    assert pools == [2, 5]  # the concept pool (--pool 2), then one trajectory per preservation prompt
    # the measurement batch before step 1, after step 1 (= before step 2, same batch and parameters), after
    # step 2 together with the next pair's batch
    assert batches == [(3, 3, 3)] * 4
    assert json.loads(lora_file.read_lora(out)[1]["settings"])["pr_batch"] == 3
    assert all(math.isfinite(r["L_pr"]) for r in log_records(out))


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_a_blank_concept_is_one_error_line_from_a_real_process(random_ckpt, tmp_path):
    """A blank --concept exits non-zero before anything is loaded: one error line, no traceback, no file."""
    out = tmp_path / "x.safetensors"
    argv = args(random_ckpt, out, "--steps", "2", "--concept", "   ")  # the last --concept counts
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "--concept" in lines[0] and "blank" in lines[0], r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--losses", "foo"), ("--losses", "erase,foo"), ("--steps", "0"),
                                         ("--layers", "99"), ("--layers", "-1"), ("--checkpoint-every", "0"),
                                         ("--pool", "0"), ("--variants", "0"), ("--eps", "-1"),
                                         ("--fixed-lambda", "-0.5"), ("--lr", "0"),
                                         ("--check-gtilde", "-1")])
def test_a_bad_flag_is_one_clear_error_line(flag, value, random_ckpt, tmp_path, capsys):
    """A bad flag value stops the run before training: non-zero exit, one error line naming the flag."""
    with pytest.raises(SystemExit) as e:
        train.main(args(random_ckpt, tmp_path / "x.safetensors", "--steps", "2", flag, value))
    assert e.value.code not in (0, None)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and flag in lines[0], lines
    assert not list(tmp_path.iterdir())
