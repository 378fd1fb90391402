"""
Z-Erase: Concept Erasure for Single-Stream Diffusion Transformers (arXiv 2603.25074).

The method as pure functions: tensors in, tensors out, no I/O, no model, no optimizer. This file holds
  - Lagrangian-guided adaptive erasure modulation (§4.2, Appendix B): the constrained update direction
    d* and its multiplier λ* in closed form (the "exact" mode, two backward passes), and the implicit
    λ update driven by the observed change of L_pr (the paper's default, one backward pass);
  - (to follow) the erasure and preservation losses (Eqs. 5-8) and the token-gated LoRA.

Sign convention, stated once. The paper writes every parameter update as a descent step

    θ_{t+1} = θ_t - α·d_t                                   (Appendix B.3, Eq. 28)

and calls d_t the "erasure direction": unconstrained, d = ∇L_er, i.e. plain gradient descent on L_er.
Eq. 9 picks d to maximise the first-order decrease of L_er, ∇L_er·d - ½‖d‖², subject to

    ∇L_pr·d ≥ -ε,

which reads: the first-order change of L_pr in one step, L_pr(θ - α·d) - L_pr(θ) ≈ -α ∇L_pr·d, is at
most αε. So ε is a per-step *budget for the rise* of L_pr (in units of the learning rate), not a
threshold on L_pr itself; ε ≥ 0 lets mildly conflicting gradients through untouched (Fig. 4, left).
Everything below is written in this convention: d is what gets *subtracted* from θ, scaled by α.
"""

import torch
from torch import Tensor

# --- Lagrangian-guided adaptive erasure modulation (§4.2, Appendix B)
#
# Gradients are flat 1-D tensors, g_er = ∇L_er(θ_t) and g_pr = ∇L_pr(θ_t) over all trainable parameters
# (d_star_per_param below does the flattening). Any float dtype works; the computation stays in it.
# Scalars follow one rule: a scalar derived from gradient tensors (λ*, the dual objective) is a 0-d
# tensor on the gradients' device and dtype, so the exact mode never forces a host sync; a scalar
# derived from hyperparameters and logged loss values (α, β, ε, g̃, the running λ of the implicit mode)
# is a python float. Functions taking λ accept either, since a 0-d tensor and a float broadcast alike.
#
# Geometry worth keeping in mind: ∇L_er·d - ½‖d‖² = -½‖d - ∇L_er‖² + const, so Eq. 9 is the Euclidean
# projection of ∇L_er onto the half-space {d : ∇L_pr·d ≥ -ε}. That is why the answer is "gradient
# surgery" (Eq. 11): keep ∇L_er if it is inside, else push it along ∇L_pr onto the boundary.


def dual_objective(lam: float | Tensor, g_er: Tensor, g_pr: Tensor, eps: float) -> Tensor:
    """Eq. 10: L_t(λ) = ½‖∇L_er + λ∇L_pr‖² + λε, the Lagrange dual of Eq. 9, to be minimised over λ ≥ 0.

    It is max_d of the Lagrangian Eq. 18; the maximiser is d = ∇L_er + λ∇L_pr (Eq. 20). Returns a 0-d
    tensor. Convex in λ (a quadratic with curvature ‖∇L_pr‖² ≥ 0).
    """
    d = g_er + lam * g_pr  # Eq. 20
    return 0.5 * (d @ d) + lam * eps  # Eq. 10 / Eq. 22


def lambda_star(g_er: Tensor, g_pr: Tensor, eps: float) -> Tensor:
    """Eq. 12, projected onto λ ≥ 0: the exact minimiser of the dual Eq. 10 over λ ≥ 0 (0-d tensor).

    Eq. 12 is the stationary point of the dual (Eq. 23 set to zero). The paper states it without the
    projection and applies "λ* > 0" as a case split in Eq. 11; we clamp instead, which is the same
    thing: the dual is a convex 1-D quadratic, so its minimiser on [0, ∞) is the unconstrained one
    clamped at 0, and λ* = 0 means "no conflict beyond ε" (d* = ∇L_er). A conflict exists exactly when
    ∇L_er·∇L_pr < -ε.

    Degenerate case ∇L_pr = 0: there is no constraint direction, the constraint 0 ≥ -ε holds for every d,
    the dual is ½‖∇L_er‖² + λε, minimised at λ = 0. We return 0 without dividing by zero.
    """
    if eps < 0:
        # With ε < 0 and ∇L_pr = 0 Eq. 9 is infeasible (0 ≥ -ε fails); ε is a tolerance, so ε ≥ 0.
        raise ValueError(f"the tolerance ε must be >= 0, got {eps}")
    g_pr_sq = g_pr @ g_pr  # ‖∇L_pr‖²
    has_constraint = g_pr_sq > 0
    safe_den = torch.where(has_constraint, g_pr_sq, torch.ones_like(g_pr_sq))  # only to avoid 0/0
    lam = (-(g_er @ g_pr) - eps) / safe_den  # Eq. 12
    lam = torch.where(has_constraint, lam, torch.zeros_like(lam))  # ∇L_pr = 0: nothing to enforce
    return lam.clamp_min(0.0)  # dual feasibility λ ≥ 0 (the λ* ≤ 0 branch of Eq. 11 / Eq. 25)


def d_star(g_er: Tensor, g_pr: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eq. 11 (gradient surgery): the solution d* of Eq. 9 and its multiplier λ* (a 0-d tensor).

    With λ* from lambda_star the two cases of Eq. 11 are one formula, d* = ∇L_er + λ*∇L_pr (Eq. 20 at
    λ*): λ* = 0 gives ∇L_er. When λ* > 0 the constraint is active, ∇L_pr·d* = -ε exactly. Use as
    θ ← θ - α·d*. ‖d*‖ ≤ ‖∇L_er‖ always (projection onto a convex set containing 0).
    """
    lam = lambda_star(g_er, g_pr, eps)
    return g_er + lam * g_pr, lam  # Eq. 11


def d_star_per_param(
    grads_er: list[Tensor], grads_pr: list[Tensor], eps: float
) -> tuple[list[Tensor], Tensor]:
    """d_star on per-parameter gradient lists (what `train.py --mode exact` calls after two backwards).

    Eq. 9 couples all trainable parameters through the single dot product ∇L_pr·d, so the surgery must
    see the whole flat gradient: projecting each parameter tensor on its own would solve a different
    (per-tensor constrained) problem. grads_er[i] and grads_pr[i] are ∇L_er and ∇L_pr for parameter i
    (pass `materialize_grads=True` to torch.autograd.grad so unused parameters give zeros, not None).
    Returns d* split back into the parameters' shapes and dtypes (torch.cat promotes mixed dtypes to the
    widest; each piece is cast back), and λ*.
    """
    flat_er = torch.cat([g.reshape(-1) for g in grads_er])  # (P,) with P = total parameter count
    flat_pr = torch.cat([g.reshape(-1) for g in grads_pr])  # (P,)
    d, lam = d_star(flat_er, flat_pr, eps)
    pieces = torch.split(d, [g.numel() for g in grads_er])
    return [p.reshape(g.shape).to(g.dtype) for p, g in zip(pieces, grads_er)], lam


def g_tilde(L_pr_before: float, L_pr_after: float, alpha: float, eps: float) -> float:
    """Eq. 15 (Eq. 14, Eq. 34): the implicit estimate of the dual gradient ∂L_t/∂λ = ∇L_pr·d + ε.

    Since θ_after = θ_before - α·d, a first-order Taylor step gives
        L_pr(θ_before) - L_pr(θ_after) ≈ α ∇L_pr(θ_before)·d                            (Eq. 14)
    so g̃ = (L_pr(θ_before) - L_pr(θ_after)) / α + ε needs no second backward pass. d is whatever direction
    was applied; in the implicit mode it is ∇L_total = ∇L_er + λ∇L_pr, so g̃ estimates Eq. 14's ∂L_t/∂λ at
    the current λ, which is what the gradient step Eq. 13 needs.

    In Algorithm 1's indices before = θ_{t-1}, after = θ_t, d = d_{t-1}: g̃_t describes the step just
    taken, and Lemma C.3 bounds |g̃_t - (∇L_pr(θ_{t-1})·d_{t-1} + ε)| ≤ (Gα/2)‖d_{t-1}‖² for G-smooth L_pr.
    g̃ < 0 exactly when L_pr rose by more than αε over the step (constraint violated). At the first
    iteration no step has been taken yet, so there is nothing to observe and λ stays λ₀ = 0 (reading
    θ_1 = θ_0 instead gives g̃ = ε ≥ 0, and update_lambda's projection gives the same λ = 0).

    Both losses must be evaluated on the same batch (same x_t, t, noise, prompts): the difference is
    meant to isolate the effect of the parameter change, and across batches it would be dominated by
    sampling noise of size O(1) divided by a small α.
    """
    return (L_pr_before - L_pr_after) / alpha + eps  # Eq. 15


def update_lambda(lam: float, g_tilde: float, beta: float) -> float:
    """Eq. 13 with Eq. 15's g̃, projected onto λ ≥ 0: λ ← max(0, λ - β·g̃).

    A projected gradient-descent step on the dual Eq. 10 (Algorithm 1 starts from λ₀ = 0). Algorithm 1
    writes the step without the projection, but the dual is only defined on λ ≥ 0: a negative λ would
    turn the λ·L_pr term of L_total = L_er + λ·L_pr into a *reward* for raising L_pr, actively
    un-preserving. Without it, a run where L_pr keeps falling (g̃ > 0 every step) would drive λ
    below zero. With it, λ rises when L_pr rose by more than αε (g̃ < 0) and decays towards 0 otherwise.
    """
    return max(0.0, lam - beta * g_tilde)  # Eq. 13 / Eq. 15, then projection onto λ ≥ 0
