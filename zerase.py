"""
Z-Erase: Concept Erasure for Single-Stream Diffusion Transformers (arXiv 2603.25074), the method alone.

In the paper's order:
  1. the stream-disentangled token-gated LoRA (§4.1, Eq. 4);
  2. the erasure and preservation objectives (Eqs. 5-8);
  3. keyword localisation with word shuffling (§4.1);
  4. the Lagrangian-guided adaptive erasure modulation (§4.2, Eqs. 9-15, Appendix B);
  5. multi-LoRA merging (Appendix F, Eq. 63).
Pure functions and small modules: tensors in, tensors out, no files and no command line. train.py runs
Algorithm 1 with them; lora_file.py writes and reads the LoRA; sample.py and evaluate.py apply it. The
derivations behind the one-line docstrings are in the notes at the end of this file, [1] to [7].

Sign convention (Appendix B.3, Eq. 28): every update is a descent step θ_{t+1} = θ_t − α·d_t, and d is
what gets subtracted. Unconstrained, d = ∇L_er.
"""

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import model as M

# ---------------------------------------------------------------------------------------------------------
# 1. Stream-disentangled token-gated LoRA (§4.1, Eq. 4):  H' = H W + S_T H ΔW
#
# S_T = diag(0_{n_I}, I_{n_T}) selects the caption rows of the unified sequence (caption pad slots included;
# image rows, image pad rows and batch padding excluded); ΔW = scale·B·A is low rank. Fused and Triton-free:
# the low-rank branch runs on the gathered caption rows only and is added back with index_add, so its
# FLOPs and saved activations scale with the caption, not the sequence [1].


class GatedLoRALinear(M.Linear):
    """A frozen projection (same weight tensor, same checkpoint key) plus a gated low-rank branch (Eq. 4)."""

    @classmethod
    def wrap(cls, lin: nn.Linear, rank: int, lora_alpha: float, gated: bool = True,
             rng: torch.Generator | None = None) -> "GatedLoRALinear":
        with torch.device("meta"):
            self = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.weight, self.bias = lin.weight, lin.bias  # shared, not copied
        self.rank, self.scale, self.gated, self.enabled = rank, lora_alpha / rank, gated, True
        dev = lin.weight.device
        A = torch.empty(rank, lin.in_features)  # fp32 factors, whatever the base dtype
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=rng)  # as peft; B = 0 so ΔW = 0 at start
        self.lora_A = nn.Parameter(A.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(lin.out_features, rank, device=dev))
        return self

    def forward(self, x: Tensor, text_rows: Tensor | None = None) -> Tensor:
        A, B = self.lora_A, self.lora_B
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)  # H W on every row: the frozen model
        if not self.gated:  # the naive baseline (--no-gate): ΔW on image and text tokens alike
            y = F.linear(x, self.weight, self.bias)
            return y + (self.scale * (x.to(A.dtype) @ A.T) @ B.T).to(y.dtype)
        if text_rows is None:
            raise RuntimeError("a gated LoRA linear needs the caption rows (Layout.text_rows)")
        return _GatedLoRA.apply(x, self.weight, self.bias, A, B, text_rows, self.scale)


class _GatedLoRA(torch.autograd.Function):
    """Eq. 4 as one autograd node: y = H W (+ b) on every row, then S_T H ΔW added on the caption rows in
    place. Its derivatives are written out (backward and forward mode), so no full-size intermediate is
    made (autograd would zero-fill a whole input gradient for the gather and copy y for the in-place add):
    the LoRA's extra cost scales with the caption rows, not with the sequence [1]."""

    @staticmethod
    def forward(x, weight, bias, A, B, rows, scale):
        y = F.linear(x, weight, bias)  # (..., D_out), frozen
        h = x.reshape(-1, x.shape[-1]).index_select(0, rows)  # (n_text, D_in): S_T H, gathered
        delta = scale * (h.to(A.dtype) @ A.T) @ B.T  # (n_text, D_out): S_T H ΔW
        y.view(-1, y.shape[-1]).index_add_(0, rows, delta.to(y.dtype))
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, A, B, rows, scale = inputs
        h = x.detach().reshape(-1, x.shape[-1]).index_select(0, rows)  # the caption rows only
        ctx.save_for_backward(h, weight, A, B, rows)
        ctx.save_for_forward(h, weight, A, B, rows)
        ctx.scale, ctx.out_shape = scale, output.shape

    @staticmethod
    def backward(ctx, g):
        h, weight, A, B, rows = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("the frozen projection of a gated LoRA linear must not require grad")
        s = ctx.scale
        g_txt = g.reshape(-1, g.shape[-1]).index_select(0, rows).to(A.dtype)  # (n_text, D_out)
        u = h.to(A.dtype) @ A.T  # (n_text, r)
        g_u = s * g_txt @ B  # (n_text, r)
        grad_A, grad_B = g_u.T @ h.to(A.dtype), s * g_txt.T @ u  # (r, D_in), (D_out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (..., D_in): the frozen path, then the caption rows' share in place
            grad_x.view(-1, grad_x.shape[-1]).index_add_(0, rows, (g_u @ A).to(grad_x.dtype))
        return grad_x, None, None, grad_A, grad_B, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, A_t, B_t, rows_t, scale_t):
        h, weight, A, B, rows = ctx.saved_tensors
        h32, zero = h.to(A.dtype), torch.zeros((), dtype=A.dtype, device=A.device)
        # the product rule on y = H W + s·S_T H Aᵀ Bᵀ, W frozen
        d_t = (x_t.reshape(-1, x_t.shape[-1]).index_select(0, rows).to(A.dtype) @ A.T) @ B.T \
            if x_t is not None else zero
        d_t = d_t + ((h32 @ A_t.T) @ B.T if A_t is not None else zero)
        d_t = d_t + ((h32 @ A.T) @ B_t.T if B_t is not None else zero)
        if x_t is not None:
            y_t = x_t @ weight.T  # the frozen path's tangent
        else:
            y_t = torch.zeros(ctx.out_shape, dtype=h.dtype, device=h.device)
        y_t.view(-1, y_t.shape[-1]).index_add_(0, rows, (ctx.scale * d_t).to(y_t.dtype).expand(len(rows), -1))
        return y_t


@dataclass(frozen=True)
class LoRASpec:
    """Where the LoRA goes: projections of which unified layers, its rank and scale lora_alpha / rank."""
    layers: tuple[int, ...]
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v")
    rank: int = 4
    lora_alpha: float = 4.0
    gated: bool = True


def add_lora(dit: nn.Module, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Wrap the target projections in gated LoRA linears (weights shared), freeze the rest; returns Δθ."""
    dit.requires_grad_(False)
    rng = torch.Generator().manual_seed(seed)
    params = []
    for i in spec.layers:
        attn = dit.layers[i].attention
        for name in spec.targets:
            lin = GatedLoRALinear.wrap(getattr(attn, name), spec.rank, spec.lora_alpha, spec.gated, rng)
            setattr(attn, name, lin)
            params += [lin.lora_A, lin.lora_B]
    return params


def lora_modules(dit: nn.Module) -> dict[str, GatedLoRALinear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, GatedLoRALinear)}


@contextmanager
def lora_disabled(dit: nn.Module):
    """Inside this block the model is exactly the frozen base model θ, bit for bit (the references of
    Eqs. 5 and 8 come from the same modules: no second copy of the model)."""
    mods = lora_modules(dit).values()
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def lora_state(dit: nn.Module) -> dict[str, Tensor]:
    """The LoRA factors, keyed '<module>.lora_A' / '.lora_B' (module paths are the checkpoint's)."""
    out = {}
    for n, m in lora_modules(dit).items():
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def set_lora_state(dit: nn.Module, factors: dict[str, Tensor], scale: float) -> None:
    """Load LoRA factors (possibly merged, of another rank) into an already-wrapped model, frozen."""
    for n, m in lora_modules(dit).items():
        A, B = factors[f"{n}.lora_A"], factors[f"{n}.lora_B"]
        m.lora_A = nn.Parameter(A.to(m.weight.device, torch.float32), requires_grad=False)
        m.lora_B = nn.Parameter(B.to(m.weight.device, torch.float32), requires_grad=False)
        m.rank, m.scale = A.shape[0], scale


# ---------------------------------------------------------------------------------------------------------
# 2. Erasure and preservation objectives (§4.1, Eqs. 5-8)
#
# v is the DiT's raw output (Z-Image: v ≈ x0 − noise at time t = 1 − σ). Eq. 5 is linear in v, so the
# negative-guidance target means the same whichever sign the sampler gives v afterwards.


def erase_target(v_null: Tensor, v_c: Tensor, eta: float) -> Tensor:
    """Eq. 5 target from the FROZEN model: v_θ(x_t, ∅) − η (v_θ(x_t, c_er) − v_θ(x_t, ∅))."""
    return v_null - eta * (v_c - v_null)


def erase_loss(v_lora_c: Tensor, v_target: Tensor) -> Tensor:
    """Eq. 5: ‖v_{θ+Δθ}(x_t, c_er, t) − target‖², averaged over elements."""
    return F.mse_loss(v_lora_c.float(), v_target.float())


def _block_mass(q: Tensor, k: Tensor, cols: Tensor) -> Tensor:
    """Σ over heads and the queries of q (H, b, Dh) of the softmax attention mass on the key rows `cols`
    of k (H, S, Dh): exp(s_ij − logsumexp_j s_ij) summed over j in cols, in fp32."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (H, b, S)
    return (s[..., cols] - s.logsumexp(-1, keepdim=True)).exp().sum()


def _concept_mass(q: Tensor, k: Tensor, cols: Tensor, block: int = 1024) -> Tensor:
    """Mean over heads and image queries q (H, n_img, Dh) of the attention mass on `cols`, one block of
    queries at a time inside torch.utils.checkpoint: at most (H, block, S) scores exist at once, in the
    forward and in backward, never the layer's whole (H, n_img, S) map [2]."""
    H, n = q.shape[:2]
    total = sum(checkpoint(_block_mass, q[:, i:i + block], k, cols, use_reentrant=False)
                for i in range(0, n, block))
    return total / (H * n)


class AttentionProbe:
    """Eq. 6: L_attn = Σ_{idx ∈ concept tokens} A_attn[:, :, idx], the attention image queries put on the
    concept's caption tokens, averaged over probed layers, heads, image queries and items [2]."""

    def __init__(self, layout: "M.Layout", concept_tokens: list[list[int]]):
        # unified rows of the concept tokens, per item (image rows come first: row = n_img_padded + token)
        self.rows = [torch.tensor([layout.caption_row(i, j) for j in toks], dtype=torch.long)
                     for i, toks in enumerate(concept_tokens)]
        self.layout, self.terms = layout, []

    def __call__(self, q: Tensor, k: Tensor) -> None:  # q, k (B, H, S, Dh)
        lay = self.layout
        for i, cols in enumerate(self.rows):
            if len(cols):
                n, S = lay.n_img[i], lay.n_img_padded[i] + lay.n_cap_padded[i]
                self.terms.append(_concept_mass(q[i, :, :n], k[i, :, :S], cols.to(q.device)))

    def loss(self) -> Tensor:
        return torch.stack(self.terms).mean()


@contextmanager
def attention_probe(dit: nn.Module, layers: tuple[int, ...], probe: AttentionProbe):
    """Install the probe on the given unified layers. Keep it installed until backward has run: with gradient
    checkpointing, backward recomputes the layers and must make the same probe calls the forward made."""
    for i in layers:
        dit.layers[i].attention.probe = probe
    try:
        yield probe
    finally:
        for i in layers:
            dit.layers[i].attention.probe = None


def preservation_loss(v_lora: Tensor, v_ref: Tensor) -> Tensor:
    """One term of Eq. 8: ‖v_{θ+Δθ}(x_t, c, t) − v_θ(x_t, c, t)‖² (c = ∅ or c_pr), averaged over elements."""
    return F.mse_loss(v_lora.float(), v_ref.float())


# ---------------------------------------------------------------------------------------------------------
# 3. Keyword localisation (§4.1: "randomly shuffle the word order ... keeping the index range dynamic")


def find_phrases(prompt: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of every case-insensitive whole-word occurrence of any phrase in the prompt."""
    spans = []
    for ph in phrases:
        whole_word = rf"(?<!\w){re.escape(ph)}(?!\w)"
        spans += [m.span() for m in re.finditer(whole_word, prompt, flags=re.IGNORECASE)]
    return sorted(set(spans))


def shuffle_words(prompt: str, phrases: list[str], rng: random.Random) -> str:
    """Shuffle the prompt's words, keeping each occurrence of a concept phrase as one unit."""
    units, pos = [], 0
    for a, b in find_phrases(prompt, phrases):
        if a < pos:  # inside the previous occurrence ("van Gogh" in "Vincent van Gogh"): one unit, not two
            units[-1], pos = units[-1] + prompt[pos:max(pos, b)], max(pos, b)
            continue
        units += prompt[pos:a].split() + [prompt[a:b]]
        pos = b
    units += prompt[pos:].split()
    rng.shuffle(units)
    return " ".join(units)


def concept_token_indices(spans: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[int]:
    """Token indices (in the templated caption) whose text overlaps a concept phrase; `spans` are each
    token's (start, end) in the prompt, as model.Tokenizer.encode gives them ((0, 0) for template tokens)."""
    return [j for j, (a, b) in enumerate(spans) if b > a and any(a < e and s < b for s, e in char_spans)]


# ---------------------------------------------------------------------------------------------------------
# 4. Lagrangian-guided adaptive erasure modulation (§4.2, Appendix B)
#
# Eq. 9:  max_d ∇L_er·d − ½‖d‖²  s.t.  ∇L_pr·d ≥ −ε, i.e. one step may raise L_pr by at most αε to first
# order [3]. Gradients here are flat 1-D tensors over all trainable parameters. A scalar derived from
# gradient tensors (λ*, the dual) is a 0-d tensor on their device (no host sync); one derived from losses
# and hyper-parameters (g̃, the running λ) is a python float.


def dual_objective(lam: float | Tensor, g_er: Tensor, g_pr: Tensor, eps: float) -> Tensor:
    """Eq. 10: L_t(λ) = ½‖∇L_er + λ∇L_pr‖² + λε, the Lagrange dual of Eq. 9, minimised over λ ≥ 0 [4]."""
    d = g_er + lam * g_pr  # Eq. 20
    return 0.5 * (d @ d) + lam * eps  # Eq. 10 / Eq. 22


def lambda_star(g_er: Tensor, g_pr: Tensor, eps: float) -> Tensor:
    """Eq. 12 projected onto λ ≥ 0: the exact minimiser of the dual Eq. 10 (0-d tensor) [5]."""
    if eps < 0:
        raise ValueError(f"the tolerance ε must be >= 0, got {eps}")  # with ∇L_pr = 0, Eq. 9 is infeasible
    g_pr_sq = g_pr @ g_pr  # ‖∇L_pr‖²
    has_constraint = g_pr_sq > 0
    safe_den = torch.where(has_constraint, g_pr_sq, torch.ones_like(g_pr_sq))  # only to avoid 0/0
    lam = (-(g_er @ g_pr) - eps) / safe_den  # Eq. 12
    lam = torch.where(has_constraint, lam, torch.zeros_like(lam))  # ∇L_pr = 0: nothing to enforce
    return lam.clamp_min(0.0)  # dual feasibility λ ≥ 0 (the λ* ≤ 0 branch of Eq. 11 / Eq. 25)


def d_star(g_er: Tensor, g_pr: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eq. 11 (gradient surgery): the solution d* of Eq. 9 and its multiplier λ*; use as θ ← θ − α·d*."""
    lam = lambda_star(g_er, g_pr, eps)
    return g_er + lam * g_pr, lam  # Eq. 11: λ* = 0 gives ∇L_er


def d_star_per_param(grads_er: list[Tensor], grads_pr: list[Tensor],
                     eps: float) -> tuple[list[Tensor], Tensor]:
    """d_star on per-parameter gradient lists: one surgery over the whole flat gradient, split back [6]."""
    flat_er = torch.cat([g.reshape(-1) for g in grads_er])  # (P,) with P = total parameter count
    flat_pr = torch.cat([g.reshape(-1) for g in grads_pr])  # (P,)
    d, lam = d_star(flat_er, flat_pr, eps)
    pieces = torch.split(d, [g.numel() for g in grads_er])
    return [p.reshape(g.shape).to(g.dtype) for p, g in zip(pieces, grads_er)], lam


def g_tilde(L_pr_before: float, L_pr_after: float, lr: float, eps: float) -> float:
    """Eq. 15: g̃ = (L_pr(θ_before) − L_pr(θ_after))/α + ε, the implicit estimate of ∂L_t/∂λ (Eq. 14) [7]."""
    return (L_pr_before - L_pr_after) / lr + eps  # Eq. 15


def update_lambda(lam: float, g_tilde: float, beta: float) -> float:
    """Eq. 13 with Eq. 15's g̃, projected onto λ ≥ 0: λ ← max(0, λ − β·g̃) [7]."""
    return max(0.0, lam - beta * g_tilde)  # Eq. 13 / Eq. 15, then projection onto λ ≥ 0


# ---------------------------------------------------------------------------------------------------------
# 5. Multi-concept merging (Appendix F)


def merge_loras(factors: list[dict[str, Tensor]], scales: list[float], w: list[float]) -> dict[str, Tensor]:
    """Eq. 63: Δθ_mul = Σ_i w_i Δθ_i exactly, as one LoRA of rank Σ r_i and scale 1; with ΔW_i = s_i B_i A_i,
    A = [A_1; ...; A_N] and B = [w_1 s_1 B_1, ..., w_N s_N B_N] give B A = Σ_i w_i s_i B_i A_i."""
    keys = [k[:-len(".lora_A")] for k in factors[0] if k.endswith(".lora_A")]
    out = {}
    for k in keys:
        out[f"{k}.lora_A"] = torch.cat([f[f"{k}.lora_A"] for f in factors], dim=0)  # (Σr, D_in)
        out[f"{k}.lora_B"] = torch.cat([wi * si * f[f"{k}.lora_B"] for f, si, wi in zip(factors, scales, w)],
                                       dim=1)  # (D_out, Σr)
    return out


# ---------------------------------------------------------------------------------------------------------
# Notes: the derivations behind the docstrings above
#
# [1] The gate, and what follows from it (tests/test_gate.py checks each): image rows of the output are the
#     frozen linear's, bit for bit, whatever A and B are; the gradients of A and B come only from caption
#     rows; with the branch disabled the layer is exactly the frozen linear, so "LoRA off" IS the frozen
#     model θ. A token-gated ΔW cannot be folded into W (it would then act on image tokens too).
#
# [2] Each layer's attention map is built block by block inside torch.utils.checkpoint, so only q and k are
#     kept for backward and at most one block of one layer's map exists at a time (at 1024², a layer's whole
#     map is 30 heads × 4,096 × 4,224 fp32 scores, 2 GB; a block of 1,024 queries, 0.5 GB).
#
# [3] The first-order change of L_pr in one step is L_pr(θ − α·d) − L_pr(θ) ≈ −α ∇L_pr·d, so the constraint
#     ∇L_pr·d ≥ −ε caps the rise at αε: ε is a per-step budget in units of the learning rate, not a
#     threshold on L_pr itself, and ε ≥ 0 lets mildly conflicting gradients through untouched (Fig. 4,
#     left). Since ∇L_er·d − ½‖d‖² = −½‖d − ∇L_er‖² + const, Eq. 9 is the Euclidean projection of ∇L_er onto
#     the half-space {d : ∇L_pr·d ≥ −ε}: hence "gradient surgery" (Eq. 11), and ‖d*‖ ≤ ‖∇L_er‖ always.
#
# [4] L_t(λ) is max_d of the Lagrangian (Eq. 18); its maximiser is d = ∇L_er + λ∇L_pr (Eq. 20). It is a
#     convex quadratic in λ with curvature ‖∇L_pr‖² ≥ 0.
#
# [5] Eq. 12 is the stationary point of the dual (Eq. 23 set to zero). The paper states it without the
#     projection and applies "λ* > 0" as a case split in Eq. 11; clamping is the same thing, since the
#     minimiser of a convex 1-D quadratic on [0, ∞) is the unconstrained one clamped at 0. A conflict
#     exists exactly when ∇L_er·∇L_pr < −ε; then ∇L_pr·d* = −ε (active constraint). Degenerate ∇L_pr = 0:
#     the constraint 0 ≥ −ε holds for every d, the dual ½‖∇L_er‖² + λε is minimised at λ = 0, returned
#     without dividing by zero. With ε < 0 that case would be infeasible, so ε ≥ 0 is required.
#
# [6] Eq. 9 couples all trainable parameters through the single dot product ∇L_pr·d: projecting each
#     parameter tensor on its own would solve a different (per-tensor constrained) problem. Pass
#     materialize_grads=True to torch.autograd.grad so that unused parameters give zeros, not None;
#     torch.cat promotes mixed dtypes to the widest, and each piece is cast back.
#
# [7] Since θ_after = θ_before − α·d, a first-order Taylor step gives L_pr(θ_before) − L_pr(θ_after) ≈
#     α ∇L_pr(θ_before)·d (Eq. 14), so g̃ estimates ∂L_t/∂λ = ∇L_pr·d + ε without a second backward; in the
#     implicit mode d = ∇L_total = ∇L_er + λ∇L_pr at the current λ, which is what the gradient step Eq. 13
#     needs. In Algorithm 1's indices before = θ_{t−1}, after = θ_t: g̃_t describes the step just taken, and
#     Lemma C.3 bounds |g̃_t − (∇L_pr(θ_{t−1})·d_{t−1} + ε)| ≤ (Gα/2)‖d_{t−1}‖² for a G-smooth L_pr. g̃ < 0
#     exactly when L_pr rose by more than αε over the step (constraint violated), and then λ rises. At the
#     first iteration no step has been taken, so λ stays λ₀ = 0. Both values must come from the same batch
#     (same x_t, t, noise, prompts): across batches the difference would be sampling noise of size O(1)
#     divided by a small α. The projection onto λ ≥ 0 is not written in Algorithm 1, but the dual lives on
#     λ ≥ 0: a negative λ would make λ·L_pr a reward for raising L_pr.
#     Where the code departs from this derivation: train.py steps with AdamW (the paper's optimiser), not
#     θ ← θ − α·d, so the step actually taken is Adam's rescaling of d. g̃ measures the change of L_pr that
#     the step actually caused, so the implicit λ still follows the constraint; the exact mode's guarantee
#     ∇L_pr·d* ≥ −ε holds for the direction d*, and holds for the step only with `--optim sgd`.
