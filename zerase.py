"""
Z-Erase: Concept Erasure for Single-Stream Diffusion Transformers (arXiv 2603.25074).

The method, top to bottom (train.py runs it; sample.py and evaluate.py apply its LoRA files):
  - Lagrangian-guided adaptive erasure modulation (§4.2, Appendix B): the constrained update direction
    d* and its multiplier λ* in closed form (the "exact" mode, two backward passes), and the implicit
    λ update driven by the observed change of L_pr (the paper's default, one backward pass) — pure
    functions, tensors in, tensors out;
  - the stream-disentangled token-gated LoRA (§4.1, Eq. 4) and multi-LoRA merging (Appendix F, Eq. 63);
  - the erasure and preservation objectives (Eqs. 5-8) and the keyword localisation they need;
  - the LoRA file format (the only I/O here).

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

import dataclasses
import hashlib
import json
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


# --- Stream-disentangled token-gated LoRA (§4.1, Eq. 4)
#
# H' = H W + S_T H ΔW, with S_T = diag(0_{n_I}, I_{n_T}) selecting the caption rows of the unified sequence
# (caption pad slots included; image rows, image pad rows and batch padding excluded). ΔW = scale·B·A is
# low rank. "Fused, Triton-free": the low-rank branch is computed on the gathered caption rows only and
# added back into the frozen output with index_add, so its FLOPs and saved activations scale with the
# number of text tokens, not with the sequence length. Consequences that the tests check:
#   - image rows of the output are the frozen linear's output, bit for bit, whatever A and B are;
#   - the gradients of A and B come only from caption rows (inputs and output gradients of image rows
#     never enter the branch);
#   - with the branch disabled the layer is exactly the frozen linear, so "LoRA off" IS the frozen model:
#     the frozen references of Eqs. 5 and 8 are computed by the same modules with the LoRA disabled
#     (`lora_disabled`), never by a second copy of the model.
# A token-gated ΔW cannot be folded into W (it would then act on image tokens too); it stays a branch.


class GatedLoRALinear(M.Linear):
    """A frozen projection (same weight tensor, same checkpoint key) plus a gated low-rank branch."""

    @classmethod
    def wrap(cls, lin: nn.Linear, rank: int, alpha: float, gated: bool = True,
             generator: torch.Generator | None = None) -> "GatedLoRALinear":
        with torch.device("meta"):
            self = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.weight, self.bias = lin.weight, lin.bias  # shared, not copied
        self.rank, self.scale, self.gated, self.enabled = rank, alpha / rank, gated, True
        dev = lin.weight.device
        A = torch.empty(rank, lin.in_features)  # fp32 factors, whatever the base dtype
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as peft; B = 0 so ΔW = 0 at start
        self.lora_A = nn.Parameter(A.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(lin.out_features, rank, device=dev))
        return self

    def forward(self, x: Tensor, text_rows: Tensor | None = None) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # H W on every row: frozen
        if not self.enabled:
            return y
        A, B = self.lora_A, self.lora_B
        if not self.gated:  # the naive baseline (--no-gate): ΔW on image and text tokens alike
            return y + (self.scale * (x.to(A.dtype) @ A.T) @ B.T).to(y.dtype)
        if text_rows is None:
            raise RuntimeError("a gated LoRA linear needs the caption rows (Layout.text_rows)")
        h_txt = x.reshape(-1, x.shape[-1]).index_select(0, text_rows)  # (n_text, D_in): S_T H, gathered
        delta = self.scale * (h_txt.to(A.dtype) @ A.T) @ B.T  # (n_text, D_out): S_T H ΔW
        return y.reshape(-1, y.shape[-1]).index_add(0, text_rows, delta.to(y.dtype)).view_as(y)  # Eq. 4


@dataclass(frozen=True)
class LoRASpec:
    """Where the LoRA goes: projections of which unified layers, its rank and scale, gated or not."""
    layers: tuple[int, ...]
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v")
    rank: int = 4
    alpha: float = 4.0
    gated: bool = True


def add_lora(dit: nn.Module, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Replace the target projections of dit.layers[spec.layers] by gated LoRA linears (in place, weights
    shared); freeze everything else; return the LoRA parameters (the only trainable ones)."""
    dit.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params = []
    for i in spec.layers:
        attn = dit.layers[i].attention
        for name in spec.targets:
            lin = GatedLoRALinear.wrap(getattr(attn, name), spec.rank, spec.alpha, spec.gated, g)
            setattr(attn, name, lin)
            params += [lin.lora_A, lin.lora_B]
    return params


def lora_modules(dit: nn.Module) -> dict[str, GatedLoRALinear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, GatedLoRALinear)}


@contextmanager
def lora_disabled(dit: nn.Module):
    """Inside this block the model is exactly the frozen base model θ (the reference of Eqs. 5 and 8)."""
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


def merge_loras(factors: list[dict[str, Tensor]], scales: list[float], w: list[float]) -> dict[str, Tensor]:
    """Eq. 63: Δθ_mul = Σ_i w_i Δθ_i, exactly, as one LoRA of rank Σ r_i (scale 1).

    With ΔW_i = s_i B_i A_i: stack A = [A_1; ...; A_N] and B = [w_1 s_1 B_1, ..., w_N s_N B_N], then
    B A = Σ_i w_i s_i B_i A_i. Every LoRA must target the same modules."""
    keys = [k[:-len(".lora_A")] for k in factors[0] if k.endswith(".lora_A")]
    out = {}
    for k in keys:
        out[f"{k}.lora_A"] = torch.cat([f[f"{k}.lora_A"] for f in factors], dim=0)  # (Σr, D_in)
        out[f"{k}.lora_B"] = torch.cat([wi * si * f[f"{k}.lora_B"] for f, si, wi in zip(factors, scales, w)],
                                       dim=1)  # (D_out, Σr)
    return out


def set_lora_state(dit: nn.Module, factors: dict[str, Tensor], scale: float) -> None:
    """Load LoRA factors (possibly merged, of another rank) into an already-wrapped model."""
    for n, m in lora_modules(dit).items():
        A, B = factors[f"{n}.lora_A"], factors[f"{n}.lora_B"]
        m.lora_A = nn.Parameter(A.to(m.weight.device, torch.float32), requires_grad=False)
        m.lora_B = nn.Parameter(B.to(m.weight.device, torch.float32), requires_grad=False)
        m.rank, m.scale = A.shape[0], scale


# --- Erasure and preservation objectives (§4.1, Eqs. 5-8)
#
# v is the DiT's raw output (Z-Image: v ≈ x0 - ε, t = 1 - σ). Eq. 5 is linear in v, so the negative-guidance
# target means the same thing whichever sign convention the sampler uses afterwards.


def erase_target(v_null: Tensor, v_c: Tensor, eta: float) -> Tensor:
    """Eq. 5 target: v_θ(x_t, ∅) - η (v_θ(x_t, c_er) - v_θ(x_t, ∅)), from the FROZEN model θ."""
    return v_null - eta * (v_c - v_null)


def erase_loss(v_lora_c: Tensor, v_target: Tensor) -> Tensor:
    """Eq. 5: ‖v_{θ+Δθ}(x_t, c_er, t) - target‖², averaged over elements."""
    return F.mse_loss(v_lora_c.float(), v_target.float())


def preservation_loss(v_lora: Tensor, v_ref: Tensor) -> Tensor:
    """One term of Eq. 8: ‖v_{θ+Δθ}(x_t, c, t) - v_θ(x_t, c, t)‖² (c = ∅ or c_pr), averaged over elements."""
    return F.mse_loss(v_lora.float(), v_ref.float())


def _concept_mass(q: Tensor, k: Tensor, cols: Tensor) -> Tensor:
    """Softmax attention mass of image queries q (H, n_img, Dh) on the key rows `cols` of k (H, S, Dh)."""
    p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)  # (H, n, S)
    return p[..., cols].sum(-1).mean()


class AttentionProbe:
    """Eq. 6: L_attn = Σ_{idx ∈ concept tokens} A_attn[:, :, idx], the attention that image queries put on
    the concept's caption tokens, averaged over the probed layers, heads, image queries and items.

    Installed as `attention.probe` of the gated layers for one forward pass. Each layer's map is built
    inside torch.utils.checkpoint, so only q and k are kept for backward and at most one layer's
    attention map exists at any time (never the maps of all layers at once)."""

    def __init__(self, layout: "M.Layout", concept_tokens: list[list[int]]):
        # unified rows of the concept tokens, per item (image rows come first: row = Np_i + token index)
        self.rows = [torch.tensor([layout.caption_row(i, j) for j in toks], dtype=torch.long)
                     for i, toks in enumerate(concept_tokens)]
        self.layout, self.terms = layout, []

    def __call__(self, q: Tensor, k: Tensor) -> None:  # q, k (B, H, S, Dh)
        for i, cols in enumerate(self.rows):
            if len(cols):
                n, S = self.layout.N[i], self.layout.Np[i] + self.layout.Lp[i]
                self.terms.append(checkpoint(_concept_mass, q[i, :, :n], k[i, :, :S], cols.to(q.device),
                                             use_reentrant=False))

    def loss(self) -> Tensor:
        return torch.stack(self.terms).mean()


@contextmanager
def attention_probe(dit: nn.Module, layers: tuple[int, ...], probe: AttentionProbe):
    for i in layers:
        dit.layers[i].attention.probe = probe
    try:
        yield probe
    finally:
        for i in layers:
            dit.layers[i].attention.probe = None


# --- Keyword localisation (§4.1: "randomly shuffle the word order ... keeping the index range dynamic")


def find_phrases(prompt: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of every case-insensitive whole-word occurrence of any phrase in the prompt."""
    spans = []
    for ph in phrases:
        spans += [m.span() for m in re.finditer(rf"(?<!\w){re.escape(ph)}(?!\w)", prompt, flags=re.IGNORECASE)]
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
    """Token indices (in the templated caption) whose text overlaps a concept phrase. `spans` are each
    token's (start, end) in the prompt as model.Tokenizer.encode returns them ((0, 0) for template tokens)."""
    return [j for j, (a, b) in enumerate(spans) if b > a and any(a < e and s < b for s, e in char_spans)]


# --- LoRA files (DESIGN §5): only the LoRA factors + metadata, deliberately not an ordinary LoRA
#
# Keys are "zerase_gated.<module path>.A" / ".B" (no "lora_A"/"lora_down" names), and the metadata says
# format "zerase-gated-lora": tools that look for ordinary LoRA keys find none, so a token-gated LoRA is
# never silently applied to image tokens (the collapse the paper is about).

FORMAT, FORMAT_VERSION = "zerase-gated-lora", 1
KEY_PREFIX = "zerase_gated."


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used with this model; the message says why and what to do."""


def base_fingerprint(dit: nn.Module) -> str:
    """Identity of the base model: its config plus a hash of a few small tensors that any fine-tune changes,
    as the checkpoint stores them (so fp32 and bf16 loads of one checkpoint agree), in fp32."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(dit.cfg), sort_keys=True).encode())
    stored = dit.stored_values or {name: dit.get_parameter(name) for name in M.FINGERPRINT_TENSORS}
    for name in M.FINGERPRINT_TENSORS:
        h.update(stored[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_lora(path, dit: nn.Module, spec: LoRASpec, base: str, settings: dict) -> None:
    from safetensors.torch import save_file
    tensors = {}
    for n, m in lora_modules(dit).items():
        tensors[f"{KEY_PREFIX}{n}.A"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{n}.B"] = m.lora_B.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "gate": "text" if spec.gated else "none",
            "gate_rows": "caption segment of the unified sequence, caption pad slots included (Eq. 4)",
            "layers": json.dumps(list(spec.layers)), "targets": json.dumps(list(spec.targets)),
            "rank": str(spec.rank), "scale": repr(spec.alpha / spec.rank), "base_model": base,
            "base_config": json.dumps(dataclasses.asdict(dit.cfg)), "concept": settings.get("concept", ""),
            "settings": json.dumps(settings)}
    M.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_lora(path) -> tuple[dict[str, Tensor], dict]:
    """The factors ({'<module>.lora_A': A, ...}) and metadata of a zerase LoRA file, validated."""
    from safetensors import SafetensorError, safe_open
    path = str(path)
    try:
        with safe_open(path, "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as e:
        raise LoRAFileError(f"{path} is not a readable safetensors file ({e}); pass a LoRA written by train.py.")
    if meta.get("format") != FORMAT or not all(k.startswith(KEY_PREFIX) for k in keys):
        raise LoRAFileError(f"{path} is not a zerase token-gated LoRA (format {meta.get('format')!r}); only "
                            f"files written by train.py can be applied.")
    version = meta.get("format_version", "")
    if version.isdigit() and int(version) > FORMAT_VERSION:
        raise LoRAFileError(f"{path} has format version {version}; upgrade zerase to read it.")
    try:
        meta = {**meta, "format_version": int(version), "layers": tuple(json.loads(meta["layers"])),
                "targets": tuple(json.loads(meta["targets"])), "rank": int(meta["rank"]),
                "scale": float(meta["scale"]), "gated": meta["gate"] == "text",
                "base_model": meta["base_model"]}
    except (KeyError, ValueError, TypeError) as e:  # missing field; json.JSONDecodeError is a ValueError
        raise LoRAFileError(f"{path} has missing or invalid zerase metadata ({e!r}); the file is damaged, "
                            f"write it again with train.py.") from None
    factors = {}
    for k, v in tensors.items():
        mod, which = k[len(KEY_PREFIX):].rsplit(".", 1)
        factors[f"{mod}.lora_{which}"] = v
    mods = {k.rsplit(".", 1)[0] for k in factors}
    if not mods or set(factors) != {f"{m}.lora_{w}" for m in mods for w in "AB"}:
        raise LoRAFileError(f"{path} does not hold one A and one B factor per module; the file is damaged, "
                            f"write it again with train.py.")
    return factors, meta


def apply_loras(dit: nn.Module, paths: list, weights: list[float] | None = None) -> dict:
    """Wrap the model with the LoRAs of `paths`, averaged per Eq. 63 (w_i = 1/N) unless weights are given.
    All files must be for this base model and target the same projections with the same gate."""
    read = [read_lora(p) for p in paths]
    base = base_fingerprint(dit)
    for p, (factors, meta) in zip(paths, read):
        if meta["base_model"] != base:
            raise LoRAFileError(f"{p} was trained for another base model ({meta['base_model']}, this one is "
                                f"{base}); train a LoRA for this model.")
        if (meta["layers"], meta["targets"], meta["gated"]) != (read[0][1]["layers"], read[0][1]["targets"],
                                                                read[0][1]["gated"]):
            raise LoRAFileError(f"{p} targets other layers/projections or gate than {paths[0]}; merge only "
                                f"LoRAs trained with the same --layers/--targets.")
    w = weights if weights is not None else [1.0 / len(read)] * len(read)  # Eq. 63: w_i = 1/N
    spec = LoRASpec(layers=read[0][1]["layers"], targets=read[0][1]["targets"], rank=1, alpha=1.0,
                    gated=read[0][1]["gated"])
    if max(spec.layers) >= len(dit.layers) or not set(spec.targets) <= {"to_q", "to_k", "to_v"}:
        raise LoRAFileError(f"{paths[0]} targets layers {spec.layers} / {spec.targets}, which this model does not "
                            f"have; use a LoRA trained on this model.")
    add_lora(dit, spec)
    merged = merge_loras([f for f, _ in read], [m["scale"] for _, m in read], w)
    mods = lora_modules(dit)
    for k, v in merged.items():
        mod, which = k.rsplit(".", 1)
        m = mods.get(mod)
        if m is None or (v.shape[1] != m.in_features if which == "lora_A" else v.shape[0] != m.out_features):
            raise LoRAFileError(f"{paths[0]} does not fit this model ({mod}: shapes or modules differ); use a "
                                f"LoRA trained on this model.")
    if missing := sorted(set(mods) - {k.rsplit(".", 1)[0] for k in merged}):
        raise LoRAFileError(f"{paths[0]} has no factors for {missing[0]} although its metadata lists that "
                            f"projection; the file is damaged, write it again with train.py.")
    set_lora_state(dit, merged, scale=1.0)
    return {"weights": w, "metas": [m for _, m in read]}

