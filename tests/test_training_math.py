"""The training math of train.py, pinned against independent computations (not against train.py's own log):
the erase target and its η (Eq. 5), the frozen references (Eqs. 5, 8), the trajectory pools' states and
times, the sign of λ in L_total (Algorithm 1), the exact surgery's direction and its constraint (Eqs. 9-12),
and the g̃ measurement's batch (Eq. 15).

Each test builds a run with train.prepare on the small random checkpoint and calls train.py's own step
functions; the expected values come from a freshly loaded base model and zerase's formulas.
"""
from contextlib import ExitStack

import pytest
import torch

import checkpoint as C
import train
import zerase as Z
from sample import denoise, initial_noise, turbo_sigmas


def make_run(ckpt, tmp_path, *extra) -> train.Run:
    """The paper's run (Eq. 5 around ∅: --anchor null; tests/test_anchor.py pins the content anchor)."""
    argv = ["--concept", "circle", "--model", str(ckpt), "--category", "entity", "--resolution", "32",
            "--pool", "2", "--variants", "4", "--anchor", "null", "--out", str(tmp_path / "x.safetensors"),
            *extra]
    run = train.prepare(train.parse_args(argv))
    run.log.close()
    return run


def base_dit(ckpt):
    return C.load_zimage(ckpt, text_encoder=False, vae=False).transformer


def randomize_lora_(run: train.Run, seed: int, std: float = 0.3) -> None:
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in Z.lora_modules(run.dit).values():
            m.lora_B.normal_(0.0, std, generator=rng)


def step_losses(run: train.Run, step: int):
    er, pr = train.draw(run, step)
    with ExitStack() as probed:
        return (er, pr, *train.losses(run, er, pr, probed))


def lora_params(run: train.Run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.params]


def test_at_step_one_L_pr_is_zero_and_L_erase_scales_as_one_plus_eta_squared(random_ckpt, tmp_path):
    """With Δθ = 0 the LoRA model IS the frozen model: L_pr (Eq. 8) is 0, and Eq. 5 gives
    L_erase(η) = (1 + η)² ‖v_θ(x_t, c_er) − v_θ(x_t, ∅)‖², so L_erase(2) / L_erase(0) = 9."""
    values = {}
    for eta in ("0", "2"):
        run = make_run(random_ckpt, tmp_path, "--eta", eta)
        _, _, L_erase, _, L_pr = step_losses(run, 0)
        assert L_pr.item() < 1e-9  # the references of Eq. 8 are the frozen model's outputs on the same inputs
        values[eta] = L_erase.item()
    assert values["0"] > 1e-4
    assert values["2"] / values["0"] == pytest.approx(9.0, rel=1e-4)


def test_the_erase_reference_is_the_frozen_model_even_with_a_lora_installed(random_ckpt, tmp_path):
    """With a random LoRA installed, L_erase equals ‖v_{θ+Δθ}(x_t, c_er) − target‖² where the target uses
    v_θ(x_t, c_er) and v_θ(x_t, ∅) of a freshly loaded base model (the LoRA never enters a reference)."""
    run = make_run(random_ckpt, tmp_path)
    randomize_lora_(run, seed=1)
    er, _, L_erase, _, _ = step_losses(run, 3)
    base = base_dit(random_ckpt)
    with torch.no_grad():
        v_c = base(er.x, er.t, [er.c_er])[0]
        v_null = base(er.x, er.t, [run.c_null])[0]
        v_lora = run.dit(er.x, er.t, [er.c_er])[0]
    torch.testing.assert_close(er.v_anchor, v_null, rtol=1e-5, atol=1e-6)
    want = Z.erase_loss(v_lora, v_null - 2.0 * (v_c - v_null))  # Eq. 5, η = 2
    assert L_erase.item() == pytest.approx(want.item(), rel=1e-4)
    assert (v_lora - v_c).abs().max() > 1e-2  # the LoRA does change the prediction: the check has teeth


@pytest.mark.parametrize("model", ["random", "tiny"])
def test_pool_states_are_the_sampler_states_at_their_own_time(random_ckpt, tmp_path, model):
    """State k of each pool trajectory is what sample.py's Euler loop reaches after k steps (with the model's
    own guidance: 0 for the random checkpoint, CFG 3 for the tiny model), labelled with t = 1 − σ_k of that
    state; its references v_θ(x, ∅) and v_θ(x_pr, c_pr) are the base model at that (x, t)."""
    ckpt = random_ckpt if model == "random" else train.DEFAULT_MODEL
    tiny = ["--model", str(ckpt), "--concept", "Van Gogh", "--category", "style", "--resolution", "64",
            "--anchor", "null"]  # the paper's pools: every trajectory under the bare Table 7 prompt
    extra = [] if model == "random" else tiny
    run = make_run(random_ckpt, tmp_path, *extra)
    base, zi = base_dit(ckpt), C.load_zimage(ckpt, vae=False)
    steps, guidance = zi.defaults.get("steps", 8), zi.defaults.get("guidance", 0.0)
    n, size = run.args.pool, run.args.resolution
    sigmas = turbo_sigmas(steps, zi.scheduler.shift)
    c_pr = run.preserve.c_pr[:len(run.preserve) // steps]  # the prompt of each preservation trajectory
    for pool, conds, seed in ((run.erase, [run.erase.c_er[0]] * n, run.args.seed),
                              (run.preserve, c_pr, run.args.seed + 1)):
        m = len(conds)
        x = initial_noise(m, base.cfg.in_channels, size, size, zi.vae_scale_factor, seed)
        for k in range(steps):
            rows = slice(k * m, (k + 1) * m)
            torch.testing.assert_close(pool.x[rows], x, rtol=1e-4, atol=1e-5)
            t = torch.full((m,), 1 - sigmas[k].item())
            torch.testing.assert_close(pool.t[rows], t)
            with torch.no_grad():
                v_null = base(x, t, [run.c_null] * m)
                v_ref = pool.v_anchor if pool is run.erase else pool.v_null  # the erase anchor: ∅ by default
                torch.testing.assert_close(v_ref[rows], v_null, rtol=1e-4, atol=1e-5)
                if pool is run.preserve:
                    torch.testing.assert_close(pool.v_c[rows], base(x, t, conds), rtol=1e-4, atol=1e-5)
            x = denoise(base, x, conds, sigmas[k:k + 2], [run.c_null] * m, guidance)


@pytest.mark.parametrize("kind", ["implicit", "fixed"])
def test_a_large_lambda_lowers_L_pr_where_lambda_zero_does_not(random_ckpt, tmp_path, kind):
    """L_total = L_er + λ L_pr (Algorithm 1): from the same LoRA state, one step with λ = 100 lowers the
    step's L_pr; with λ = 0 it does not lower it as much."""
    after = {}
    for lam in (0.0, 100.0):
        extra = ["--fixed-lambda", str(lam)] if kind == "fixed" else []
        run = make_run(random_ckpt, tmp_path, "--eps", "0", *extra)
        randomize_lora_(run, seed=2)
        run.lam = lam
        _, pr = train.draw(run, 0)
        before = train.pr_value(run, pr)
        train.STEPS[run.kind](run, 0)
        after[lam] = train.pr_value(run, pr)
    assert after[100.0] < before and after[100.0] < after[0.0]


def test_the_exact_step_moves_along_d_star_and_with_sgd_keeps_the_first_order_rise_within_alpha_eps(
        random_ckpt, tmp_path):
    """--mode exact --optim sgd: Δθ = −α d*(∇L_er, ∇L_pr) of Eq. 11 (gradients recomputed here), so
    ∇L_pr·Δθ ≤ αε (Eq. 9); with AdamW the same step can break that bound: the guarantee is the direction's."""
    lr, eps = 1e-3, 1e-4
    rises = {}
    for optim in ("sgd", "adamw"):
        run = make_run(random_ckpt, tmp_path, "--mode", "exact", "--optim", optim, "--eps", str(eps))
        randomize_lora_(run, seed=1)
        _, _, L_erase, L_attn, L_pr = step_losses(run, 0)
        g_er = torch.autograd.grad(L_erase + L_attn, run.params, retain_graph=True, materialize_grads=True)
        g_pr = torch.autograd.grad(L_pr, run.params, materialize_grads=True)
        d, lam_star = Z.d_star_per_param(g_er, g_pr, eps)
        assert lam_star > 0  # a conflict: the constraint is active, so the bound is tight
        before = lora_params(run)
        train.exact_step(run, 0)
        assert run.lam == pytest.approx(float(lam_star), rel=1e-5)
        delta = [a - b for a, b in zip(lora_params(run), before)]
        rises[optim] = sum((g * dt).sum() for g, dt in zip(g_pr, delta)).item()  # ∇L_pr·Δθ
        if optim == "sgd":
            for dt, d_p in zip(delta, d):
                torch.testing.assert_close(dt, -lr * d_p, rtol=1e-3, atol=1e-7)  # fp32 ulp of θ
    assert rises["sgd"] <= lr * eps * (1 + 2e-2)  # Δθ carries the fp32 rounding of θ
    assert rises["sgd"] == pytest.approx(lr * eps, rel=2e-2)  # active constraint: equality
    assert rises["adamw"] > 10 * lr * eps


def test_g_tilde_measures_after_on_the_samples_it_measured_before(random_ckpt, tmp_path, monkeypatch):
    """--gtilde-batch fresh: the "after" of each step is measured on exactly the preservation samples of its
    "before" (same states, times and prompts), and a carried "before" is one on the same samples: step 2p's
    "after" is step 2p+1's "before"; step 2p+1's "after" is measured in one call with step 2p+2's "before",
    on the next pair's batch, and that value is the one step 2p+2 uses."""
    seen = []
    real = train.pr_values
    def recording(run, batches):
        values = real(run, batches)
        seen.append((batches, values))
        for b, v in zip(batches, values):  # one call on several batches: each batch's own L_pr
            assert v == pytest.approx(real(run, [b])[0], rel=1e-5)
        return values

    monkeypatch.setattr(train, "pr_values", recording)
    run = make_run(random_ckpt, tmp_path, "--eps", "0", "--pr-batch", "2")
    batches, recs = [], []
    for step in range(5):
        n = len(seen)
        batches.append(run.meter.batch(run, step, train.draw(run, step)[1]))
        recs.append(train.implicit_step(run, step))
        run.step += 1
        calls = seen[n:]
        assert len(calls) == (2 if step == 0 else 1)  # later steps reuse the previous step's measurement
        assert all(same_samples(c[0][0], batches[step]) for c in calls)
        assert len(calls[-1][0]) == (2 if step % 2 else 1)  # odd steps measure the next pair's batch too
        if step % 2:
            assert same_samples(batches[step], batches[step - 1])
            next_batch = run.meter.batch(run, step + 1, None)
            assert same_samples(calls[-1][0][1], next_batch) and not same_samples(next_batch, batches[step])
        if step:
            assert recs[step]["L_pr_before_measured"] == seen[n - 1][1][-1]  # the carried value
    assert not same_samples(batches[0], batches[2])  # a new batch every other step


def same_samples(a: train.PreserveBatch, b: train.PreserveBatch) -> bool:
    return (torch.equal(a.x, b.x) and torch.equal(a.t, b.t) and torch.equal(a.v_c, b.v_c)
            and len(a.c_pr) == len(b.c_pr) and all(torch.equal(p, q) for p, q in zip(a.c_pr, b.c_pr)))
