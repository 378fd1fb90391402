"""Property tests for the Lagrangian-guided adaptive erasure modulation (§4.2, Appendices B and C).

Every closed form in zerase.py is checked against something computed without it: the primal QP Eq. 9 is
solved by KKT case enumeration with numpy linear algebra and probed with random feasible directions; the
dual Eq. 10 is minimised by a dense grid and a golden-section search; Lemma C.3 and Eq. 16 are checked
on random quadratics whose smoothness constant G = ‖H‖₂ is known exactly. All in float64.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zerase import d_star, d_star_per_param, dual_objective, g_tilde, lambda_star, update_lambda

F64 = torch.float64


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    # Values below 1e-6 become exact zeros: keeps exact-zero gradients common and avoids denormal
    # magnitudes whose squares underflow, which would test float64 rather than the method.
    plain = st.floats(lo, hi, allow_nan=False, allow_subnormal=False)
    return plain.map(lambda x: x if abs(x) >= 1e-6 else 0.0)


@st.composite
def gradient_pairs(draw) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(g_er, g_pr, eps) with dimension 1..20: independent, conflicting, aligned, or g_pr = 0."""
    n = draw(st.integers(1, 20))
    vec = st.lists(floats(-10, 10), min_size=n, max_size=n)
    g_er = torch.tensor(draw(vec), dtype=F64)
    noise = torch.tensor(draw(vec), dtype=F64)
    kind = draw(st.sampled_from(["independent", "conflict", "aligned", "no constraint"]))
    if kind == "independent":
        g_pr = noise
    elif kind == "conflict":  # ∇L_pr pulls against ∇L_er: λ* > 0 unless ε absorbs it
        g_pr = 0.1 * noise - draw(floats(0.05, 3)) * g_er
    elif kind == "aligned":  # no conflict: λ* = 0
        g_pr = 0.1 * noise + draw(floats(0.05, 3)) * g_er
    else:
        g_pr = torch.zeros(n, dtype=F64)
    eps = draw(st.one_of(st.just(0.0), floats(0, 10)))
    return g_er, g_pr, eps


def primal(d: torch.Tensor, g_er: torch.Tensor) -> torch.Tensor:
    """Objective of Eq. 9 for one direction d (n,) or for each row of a batch (K, n)."""
    return d @ g_er - 0.5 * (d * d).sum(-1)


def dual_expanded(lam: torch.Tensor | float, g_er: torch.Tensor, g_pr: torch.Tensor, eps: float):
    """Eq. 10 multiplied out as a polynomial in λ (works elementwise on a tensor of λ's)."""
    return 0.5 * (g_er @ g_er) + lam * (g_er @ g_pr) + 0.5 * lam**2 * (g_pr @ g_pr) + lam * eps


def tol(*magnitudes: float) -> float:
    """Absolute tolerance for float64 round-off on quantities of the given magnitudes."""
    return 1e-9 * (1.0 + sum(abs(float(m)) for m in magnitudes))


def solve_qp_by_kkt_enumeration(g_er: torch.Tensor, g_pr: torch.Tensor, eps: float):
    """Eq. 9 solved without the closed form: the optimum is a KKT point, so try both cases.

    Inactive constraint: stationarity of the objective alone, d = g_er, μ = 0. Active constraint:
    stationarity g_er - d + μ g_pr = 0 together with g_pr·d = -ε, one (n+1)x(n+1) linear system.
    Keep the feasible candidate with the largest objective. Returns (d, μ) as numpy / float.
    """
    g, a = g_er.numpy(), g_pr.numpy()
    n = g.shape[0]
    candidates = [(g, 0.0)]
    if a @ a > 0:
        kkt = np.block([[np.eye(n), -a[:, None]], [a[None, :], np.zeros((1, 1))]])
        sol = np.linalg.solve(kkt, np.concatenate([g, [-eps]]))
        candidates.append((sol[:n], float(sol[n])))
    # Feasibility up to round-off *relative* to the terms of g_pr·d: an absolute slack would call a tiny
    # violated constraint (|g| ~ 1e-6) satisfied and pick the unconstrained candidate.
    slack = lambda d: 1e-9 * (np.abs(a) @ (np.abs(d) + np.abs(g)) + eps)  # noqa: E731
    feasible = [(d, mu) for d, mu in candidates if a @ d >= -eps - slack(d)]
    return max(feasible, key=lambda c: g @ c[0] - 0.5 * c[0] @ c[0])


def golden_section_min(f, lo: float, hi: float, iters: int = 60) -> float:
    """Minimiser of a unimodal f on [lo, hi] by golden-section search (no derivatives)."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iters):
        c, d = b - r * (b - a), a + r * (b - a)
        if f(c) <= f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


@st.composite
def quadratic(draw, n: int):
    """L(θ) = ½θᵀHθ + bᵀθ with random symmetric (possibly indefinite) H; returns (H, b, G = ‖H‖₂)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(floats(0.05, 2))
    A = torch.randn(n, n, generator=gen, dtype=F64)
    H = scale * (A + A.T) / (2 * math.sqrt(n))
    b = torch.randn(n, generator=gen, dtype=F64)
    G = float(torch.linalg.eigvalsh(H).abs().max())  # Lipschitz constant of ∇L(θ) = Hθ + b
    return H, b, G


def quad(H: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> float:
    """The quadratic ½θᵀHθ + bᵀθ at θ, as a python float (like a logged loss value)."""
    return float(0.5 * theta @ H @ theta + b @ theta)


# --- Eqs. 9, 11, 12: the primal problem and its closed-form solution


@settings(max_examples=200, deadline=None)
@given(gradient_pairs())
def test_d_star_meets_the_preservation_constraint_with_equality_when_lambda_is_positive(case):
    """∇L_pr·d* ≥ -ε always (Eq. 9); = -ε when λ* > 0; λ* > 0 iff ∇L_er·∇L_pr < -ε; else d* = ∇L_er."""
    g_er, g_pr, eps = case
    d, lam = d_star(g_er, g_pr, eps)
    assert torch.isfinite(d).all() and torch.isfinite(lam) and lam >= 0
    scale = tol(g_er.norm() * g_pr.norm(), eps)
    slack = float(g_pr @ d) + eps
    assert slack >= -scale
    conflict = float(g_er @ g_pr) < -eps
    assert bool(lam > 0) == conflict
    if conflict:
        assert abs(slack) <= scale
    else:
        assert torch.equal(d, g_er)


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.integers(0, 2**32 - 1))
def test_no_random_feasible_direction_beats_d_star(case, seed):
    """Random perturbations of d*, and random points, projected onto the feasible half-space score ≤ d*."""
    g_er, g_pr, eps = case
    d, _ = d_star(g_er, g_pr, eps)
    gen = torch.Generator().manual_seed(seed)
    n = g_er.numel()
    radii = torch.logspace(-4, 1, 64, dtype=F64)[:, None] * (1 + d.norm())  # (64, 1) local to global
    D = torch.cat([d + radii * torch.randn(64, n, generator=gen, dtype=F64),
                   10 * torch.randn(64, n, generator=gen, dtype=F64),
                   torch.zeros(1, n, dtype=F64)])  # (129, n); d = 0 is always feasible
    # Explicit Euclidean projection onto {x : g_pr·x ≥ -ε}, row by row.
    violation = (D @ g_pr + eps).clamp(max=0)  # (129,)
    if g_pr @ g_pr > 0:
        D = D - (violation / (g_pr @ g_pr))[:, None] * g_pr
    assert (D @ g_pr + eps >= -tol(D.abs().max() * g_pr.abs().sum(), eps)).all()
    assert (primal(D, g_er) <= primal(d, g_er) + tol(d @ d, g_er @ g_er, D.abs().max() ** 2)).all()


@settings(max_examples=200, deadline=None)
@given(gradient_pairs())
def test_d_star_and_lambda_star_equal_the_kkt_solution_of_the_qp(case):
    """d* and λ* equal the optimum and multiplier of Eq. 9 found by KKT case enumeration (numpy)."""
    g_er, g_pr, eps = case
    d, lam = d_star(g_er, g_pr, eps)
    d_ref, mu_ref = solve_qp_by_kkt_enumeration(g_er, g_pr, eps)
    scale = 1e-7 * (1 + float(g_er.norm()) + float(lam * g_pr.norm()))
    assert np.abs(d.numpy() - d_ref).max() <= scale
    if g_pr @ g_pr > 0:  # μ is undetermined when the constraint has no direction
        assert abs(float(lam) - mu_ref) * float(g_pr.norm()) <= scale


@settings(max_examples=200, deadline=None)
@given(gradient_pairs())
def test_d_star_is_never_longer_than_the_erasure_gradient(case):
    """‖d*‖ ≤ ‖∇L_er‖: Eq. 9 projects ∇L_er onto a convex set containing 0, which cannot lengthen it."""
    g_er, g_pr, eps = case
    d, _ = d_star(g_er, g_pr, eps)
    assert float(d.norm()) <= float(g_er.norm()) * (1 + 1e-12) + 1e-12


def test_negative_tolerance_is_rejected():
    """ε < 0 can make Eq. 9 infeasible (∇L_pr = 0), so lambda_star refuses it."""
    with pytest.raises(ValueError):
        lambda_star(torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), -0.1)


# --- Eq. 10: the dual problem


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.integers(0, 2**32 - 1))
def test_dual_objective_is_the_lagrangian_maximised_over_d(case, seed):
    """Eq. 10 equals the Lagrangian Eq. 18 at d = ∇L_er + λ∇L_pr and bounds it at every other d."""
    g_er, g_pr, eps = case
    gen = torch.Generator().manual_seed(seed)
    lam = float(torch.rand((), generator=gen, dtype=F64)) * 10
    D = 5 * torch.randn(32, g_er.numel(), generator=gen, dtype=F64)  # (32, n)
    D = torch.cat([D, (g_er + lam * g_pr)[None]])  # last row: the maximiser Eq. 20
    lagrangian = primal(D, g_er) + lam * (eps + D @ g_pr)  # Eq. 18, (33,)
    value = float(dual_objective(lam, g_er, g_pr, eps))
    scale = tol(value, D.abs().max() ** 2, lam * eps)
    assert abs(value - float(dual_expanded(lam, g_er, g_pr, eps))) <= scale
    assert abs(value - float(lagrangian[-1])) <= scale
    assert (lagrangian <= value + scale).all()


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.integers(0, 2**32 - 1))
def test_lambda_star_minimises_the_dual_over_nonnegative_lambda(case, seed):
    """λ* scores ≤ every λ on a dense grid, the golden-section minimiser and random λ ≥ 0 (Eq. 10)."""
    g_er, g_pr, eps = case
    lam = float(lambda_star(g_er, g_pr, eps))
    assert lam >= 0  # dual feasibility: the minimum is taken over λ ≥ 0
    a2 = float(g_pr @ g_pr)
    # Cauchy-Schwarz bound on the unconstrained stationary point, independent of Eq. 12.
    hi = (float(g_er.norm() * g_pr.norm()) + eps) / a2 + 1 if a2 > 0 else 10.0
    best = float(dual_expanded(lam, g_er, g_pr, eps))
    scale = tol(g_er @ g_er, hi * float(g_er.norm() * g_pr.norm()), hi**2 * a2, hi * eps)
    grid = torch.linspace(0, hi, 2001, dtype=F64)
    assert best <= float(dual_expanded(grid, g_er, g_pr, eps).min()) + scale
    lam_gs = golden_section_min(lambda x: float(dual_expanded(x, g_er, g_pr, eps)), 0.0, hi)
    assert best <= float(dual_expanded(lam_gs, g_er, g_pr, eps)) + scale
    gen = torch.Generator().manual_seed(seed)
    rand = torch.rand(64, generator=gen, dtype=F64) * 10 * hi  # also beyond the bracket
    assert best <= float(dual_expanded(rand, g_er, g_pr, eps).min()) + 100 * scale


@settings(max_examples=200, deadline=None)
@given(gradient_pairs())
def test_primal_and_dual_optima_are_equal(case):
    """Strong duality: Eq. 9's objective at d* equals Eq. 10's objective at λ*."""
    g_er, g_pr, eps = case
    d, lam = d_star(g_er, g_pr, eps)
    p, q = float(primal(d, g_er)), float(dual_objective(lam, g_er, g_pr, eps))
    assert abs(p - q) <= tol(g_er @ g_er, d @ d, lam * eps)


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.integers(0, 2**32 - 1))
def test_any_feasible_direction_scores_below_any_dual_value(case, seed):
    """Weak duality: Eq. 9 at any feasible d ≤ Eq. 10 at any λ ≥ 0, so λ* and d* certify each other."""
    g_er, g_pr, eps = case
    gen = torch.Generator().manual_seed(seed)
    D = 5 * torch.randn(64, g_er.numel(), generator=gen, dtype=F64)
    D = D[D @ g_pr >= -eps]  # keep the feasible rows only
    lams = [lambda_star(g_er, g_pr, eps)] + (torch.rand(7, generator=gen, dtype=F64) * 20).tolist()
    duals = torch.stack([dual_objective(x, g_er, g_pr, eps) for x in lams])
    if D.shape[0]:
        assert float(primal(D, g_er).max()) <= float(duals.min()) + tol(duals.abs().max(), D.abs().max() ** 2)


# --- Eqs. 14-15 and Lemma C.3: the implicit estimate of the dual gradient


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 8), floats(1e-3, 1), floats(0, 1))
def test_implicit_estimate_error_is_within_lemma_c3_bound(data, n, alpha, eps):
    """|g̃_t - g| ≤ (Gα/2)‖d_{t-1}‖² with g = ∇L_pr(θ_{t-1})·d_{t-1} + ε and θ_t = θ_{t-1} - α d_{t-1}.

    Lemma C.3 names the true gradient g_t, but its proof (Eq. 41) compares g̃_t with the dual gradient
    at θ_{t-1} along d_{t-1}, the step that g̃_t observed; that is the statement tested here.
    """
    H, b, G = data.draw(quadratic(n))
    vec = st.lists(floats(-3, 3), min_size=n, max_size=n)
    theta_prev = torch.tensor(data.draw(vec), dtype=F64)
    d_prev = torch.tensor(data.draw(vec), dtype=F64)
    theta = theta_prev - alpha * d_prev  # Eq. 34's update
    g = float((H @ theta_prev + b) @ d_prev) + eps  # Eq. 33 at θ_{t-1}, along d_{t-1}
    L_before, L_after = quad(H, b, theta_prev), quad(H, b, theta)
    estimate = g_tilde(L_before, L_after, alpha, eps)
    bound = G * alpha / 2 * float(d_prev @ d_prev)  # Eq. 35
    assert abs(estimate - g) <= bound + tol(L_before, L_after) / alpha


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 8), floats(1e-3, 1), floats(0, 1), floats(0.1, 3))
def test_lemma_c3_bound_is_attained_along_the_top_curvature_direction(data, n, alpha, eps, length):
    """For a quadratic, |g̃ - g| = (Gα/2)‖d‖² exactly when d is an eigenvector of the largest |eigenvalue|."""
    H, b, G = data.draw(quadratic(n))
    evals, evecs = torch.linalg.eigh(H)
    d_prev = length * evecs[:, evals.abs().argmax()]
    theta_prev = torch.tensor(data.draw(st.lists(floats(-3, 3), min_size=n, max_size=n)), dtype=F64)
    theta = theta_prev - alpha * d_prev
    g = float((H @ theta_prev + b) @ d_prev) + eps
    estimate = g_tilde(quad(H, b, theta_prev), quad(H, b, theta), alpha, eps)
    bound = G * alpha / 2 * length**2
    assert abs(abs(estimate - g) - bound) <= tol(quad(H, b, theta_prev), quad(H, b, theta), bound) / alpha


# --- Eq. 16 (Appendix B.3): bounded preservation degradation of the exact mode


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 8), st.integers(1, 25), floats(1e-3, 0.2), floats(0, 1))
def test_exact_mode_keeps_preservation_loss_rise_within_eq16_bound(data, n, steps, alpha, eps):
    """t steps of θ ← θ - α d*(θ) on quadratics: L_pr(θ_t) - L_pr(θ_0) ≤ tεα + Σ_s (Gα²/2)‖d_s‖²."""
    H_pr, b_pr, G = data.draw(quadratic(n))
    H_er, b_er, _ = data.draw(quadratic(n))
    theta = torch.tensor(data.draw(st.lists(floats(-3, 3), min_size=n, max_size=n)), dtype=F64)
    L0 = quad(H_pr, b_pr, theta)
    second_order = 0.0
    for _ in range(steps):
        d, _ = d_star(H_er @ theta + b_er, H_pr @ theta + b_pr, eps)
        step_term = G * alpha**2 / 2 * float(d @ d)
        before, theta = quad(H_pr, b_pr, theta), theta - alpha * d
        after = quad(H_pr, b_pr, theta)
        assert after - before <= alpha * eps + step_term + tol(before, after)  # Eq. 29
        second_order += step_term
    Lt = quad(H_pr, b_pr, theta)
    assert Lt - L0 <= steps * eps * alpha + second_order + tol(L0, Lt) * steps  # Eq. 30 / Eq. 16


# --- Eq. 13: the λ update


@settings(max_examples=200, deadline=None)
@given(floats(0, 100), floats(-100, 100), floats(-100, 100), floats(1e-4, 1), floats(0, 1), floats(1e-3, 1))
def test_lambda_rises_iff_preservation_loss_rose_by_more_than_alpha_eps(lam, before, after, alpha, eps, beta):
    """L_pr rose by > αε over the step: λ strictly rises; otherwise it strictly falls or sits at 0."""
    excess = (after - before) - alpha * eps  # rise beyond the per-step budget of Eq. 9's constraint
    assume(abs(excess) > 1e-6)
    new = update_lambda(lam, g_tilde(before, after, alpha, eps), beta)
    assert new >= 0
    if excess > 0:
        assert new > lam
    else:
        assert new < lam or new == 0.0
    expected = max(0.0, lam + beta * excess / alpha)  # Eq. 13 with g̃ = -excess / α
    assert abs(new - expected) <= 1e-9 * (1 + abs(expected) + beta * abs(excess) / alpha)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(floats(-10, 10), floats(-10, 10)), min_size=1, max_size=300),
       floats(1e-4, 1), floats(0, 1), floats(1e-3, 10))
def test_lambda_never_goes_negative_over_long_runs(losses, alpha, eps, beta):
    """Over any sequence of observed (L_pr before, L_pr after) pairs, λ from λ₀ = 0 stays ≥ 0."""
    lam = 0.0  # Algorithm 1: λ₀ = 0
    for before, after in losses:
        lam = update_lambda(lam, g_tilde(before, after, alpha, eps), beta)
        assert lam >= 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(floats(0, 10), min_size=1, max_size=100), floats(1e-4, 1), floats(0, 1), floats(1e-3, 10))
def test_lambda_stays_at_zero_while_preservation_loss_keeps_falling(drops, alpha, eps, beta):
    """If L_pr never rises, λ stays exactly 0: the unprojected Algorithm 1 step would go negative here."""
    lam, L = 0.0, 0.0
    for drop in drops:
        lam = update_lambda(lam, g_tilde(L, L - drop, alpha, eps), beta)
        L -= drop
        assert lam == 0.0


@settings(max_examples=200, deadline=None)
@given(gradient_pairs())
def test_eq13_with_the_exact_dual_gradient_converges_to_lambda_star(case):
    """Projected gradient descent on Eq. 10 (Eq. 13 with the exact gradient Eq. 23) reaches Eq. 12's λ*."""
    g_er, g_pr, eps = case
    a2 = float(g_pr @ g_pr)
    assume(a2 > 0)
    beta = 0.5 / a2  # contraction factor 1 - β‖∇L_pr‖² = 0.5 per step on this quadratic dual
    ga = float(g_er @ g_pr)
    lam = 0.0
    for _ in range(60):
        lam = update_lambda(lam, ga + lam * a2 + eps, beta)  # Eq. 23: ∇L_pr·(∇L_er + λ∇L_pr) + ε
    target = float(lambda_star(g_er, g_pr, eps))
    assert abs(lam - target) <= 1e-9 * (1 + target + (float(g_er.norm() * g_pr.norm()) + eps) / a2)


# --- the per-parameter helper used by the exact mode


@st.composite
def per_param_gradients(draw):
    """Gradient lists for 1..5 parameters of random shapes (0-d included) and dtypes, conflicting or not."""
    shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
    params = draw(st.lists(st.tuples(shape, st.sampled_from([F64, torch.float32])), min_size=1, max_size=5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    grads_er = [torch.randn(s, generator=gen, dtype=F64).to(dt) for s, dt in params]
    sign = draw(st.sampled_from([-1.0, 1.0]))  # half conflicting, half aligned
    grads_pr = [sign * g + 0.3 * torch.randn(g.shape, generator=gen, dtype=F64).to(g.dtype) for g in grads_er]
    return grads_er, grads_pr, draw(floats(0, 2))


@settings(max_examples=200, deadline=None)
@given(per_param_gradients())
def test_per_parameter_helper_matches_the_flat_computation_and_keeps_shapes(case):
    """d_star_per_param equals d_star on the concatenated flat gradients, split back into each shape."""
    grads_er, grads_pr, eps = case
    ds, lam = d_star_per_param(grads_er, grads_pr, eps)
    d_flat, lam_flat = d_star(torch.cat([g.flatten() for g in grads_er]),
                              torch.cat([g.flatten() for g in grads_pr]), eps)
    assert torch.equal(lam, lam_flat)
    assert [(d.shape, d.dtype) for d in ds] == [(g.shape, g.dtype) for g in grads_er]
    pieces = torch.split(d_flat, [g.numel() for g in grads_er])
    for d, piece, g_er, g_pr in zip(ds, pieces, grads_er, grads_pr):
        assert torch.equal(d.flatten(), piece.to(d.dtype))
        # One shared λ* for all parameters: d_i = ∇_i L_er + λ*∇_i L_pr.
        torch.testing.assert_close(d, (g_er + lam * g_pr).to(d.dtype))
