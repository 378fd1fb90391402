"""
Erase a concept from Z-Image with Z-Erase: train a token-gated LoRA (arXiv 2603.25074, Algorithm 1).

    python train.py --concept "Van Gogh"                       # embedded tiny model, paper defaults
    python train.py --concept "Van Gogh" --mode exact          # exact gradient surgery (Eqs. 11-12)
    python train.py --concept church --category entity --model weights/Z-Image-Turbo --device cuda

The file reads as Algorithm 1. `prepare` builds its inputs: the frozen model θ_0, the erasure set D_er and
the preservation set D_pr as pools of frozen-model trajectories with their frozen references, the LoRA
Δθ = 0 and λ_0 = 0. `main` runs the loop; each kind of step is one small function:
  - implicit_step: Algorithm 1 (L_total = L_er + λ L_pr, one backward; λ from g̃, Eqs. 13-15);
  - exact_step:    the closed-form surgery d* (Eqs. 11-12, two backwards);
  - fixed_step:    the static scalarisation baseline L_er + λ·L_pr with a constant λ (and L_er alone).
x_t comes from the frozen model's own trajectories under the concept prompt (ESD-style), x_pr from its
trajectories under the preservation prompts, so L_pr holds the model where those prompts go. Prompts are
encoded once and the text encoder is freed; the VAE is never loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import checkpoint as C
import lora_file
import zerase as Z
from cli import die, parse_device, parse_dtype, stage
import model as M
from model import CheckpointError
from sample import DEFAULT_MODEL, denoise, initial_noise, turbo_sigmas

EPS_BY_CATEGORY = {"style": 1e-3, "nudity": 1e-3, "violence": 1e-3, "entity": 1e-2, "abstraction": 1e-2,
                   "celebrity": 1e-2}  # Table 6
TEMPLATE_BY_CATEGORY = {"style": "An art in the style of {}", "entity": "A photo of {}",
                        "abstraction": "A close scene of {}", "celebrity": "A photo of {}",
                        "nudity": "A photo of {}", "violence": "A photo of {}"}  # Table 7
GENERIC_PRESERVE = ["a photo of a dog", "a portrait of a woman", "a landscape with mountains and a lake",
                    "a city street at night", "a bowl of fruit on a table", "a red car", "a cat on a sofa",
                    "an oil painting of a ship"]  # used when the model stores no preservation prompts


OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # default hyper-parameters otherwise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True, help="the concept to erase, as written in prompts")
    p.add_argument("--category", choices=sorted(EPS_BY_CATEGORY), help="sets ε (Table 6) and the prompt "
                   "template (Table 7); default: from the model's zerase.json")
    p.add_argument("--alias", action="append", default=[], help="another spelling of the concept (repeatable)")
    p.add_argument("--preserve", action="append", help="a preservation prompt c_pr (repeatable); default: the "
                   "model's own list (zerase.json), else a generic list")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", help="LoRA file (default: loras/<concept>.safetensors)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3, help="α, the learning rate")
    p.add_argument("--optim", choices=["adamw", "sgd"], default="adamw", help="adamw (the paper's optimiser) or "
                   "sgd: the plain step θ ← θ − α·d the derivations assume (with --mode exact, each step then keeps "
                   "the first-order rise of L_pr within αε, Eq. 9)")
    p.add_argument("--beta", type=float, default=0.1, help="β, step size of the λ update (Eq. 15)")
    p.add_argument("--eta", type=float, default=2.0, help="η, negative guidance of the erase target (Eq. 5)")
    p.add_argument("--eps", type=float, help="ε, preservation tolerance; default by category (Table 6)")
    p.add_argument("--mode", choices=["implicit", "exact"], default="implicit",
                   help="implicit: Algorithm 1 (one backward); exact: gradient surgery, Eqs. 11-12 (two)")
    p.add_argument("--fixed-lambda", type=float, help="baseline: static scalarisation L_er + X·L_pr")
    p.add_argument("--no-gate", action="store_true", help="baseline: naive LoRA on image and text tokens")
    p.add_argument("--losses", default="erase,attn,pr", help="subset of erase,attn,pr (Table 5 ablation)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale = lora_alpha/rank); default = rank")
    p.add_argument("--alpha", type=float, dest="deprecated_alpha", help=argparse.SUPPRESS)  # old --lora-alpha
    p.add_argument("--targets", default="to_q,to_k,to_v", help="projections of the unified layers to adapt")
    p.add_argument("--layers", default="all", help="unified layers to adapt: all, or e.g. 0,1,2")
    p.add_argument("--resolution", type=int, help="training image size in pixels (default: the model's own, "
                   "else 1024)")
    p.add_argument("--pool", type=int, default=32, help="frozen-model trajectories to draw x_t from")
    p.add_argument("--variants", type=int, default=32, help="word-shuffled concept prompts, encoded once")
    p.add_argument("--gtilde-batch", choices=["train", "fresh"], default="fresh",
                   help="where L_pr is measured before/after each update for g̃ (Eq. 15): --pr-batch fresh "
                   "preservation samples the update did not see (default), or the training batch itself "
                   "(Algorithm 1 read literally; it lets λ decay to ~0, see README)")
    p.add_argument("--gtilde", choices=["auto", "difference", "jvp"], default="auto",
                   help="how the change of L_pr over a step is measured for g̃ (Eq. 15): difference = L_pr after "
                   "minus before (Eq. 15 as written); jvp = the same change as a directional derivative "
                   "∇L_pr·Δθ at the step's midpoint (forward-mode AD), which bf16 rounding cannot drown; "
                   "auto: difference in float32, jvp in bfloat16/float16")
    p.add_argument("--pr-batch", type=int, default=2, help="preservation samples (x_pr, c_pr) per step: the "
                   "Monte-Carlo size of Eq. 8's expectation, and of the L_pr measured for g̃ (Eq. 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.safetensors")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1's inputs: D_er and D_pr as prompts, trajectory pools and frozen references


def concept_prompts(zi: C.ZImage, concept: str, aliases: list[str], category: str, n: int, seed: int):
    """n erase prompts c_er (the Table 7 template, then word-shuffled variants) and, for each, the indices
    of the concept's tokens in its templated caption, located again after every shuffle (§4.1)."""
    names = [concept] + aliases
    rng = random.Random(seed)
    base = [TEMPLATE_BY_CATEGORY[category].format(name) for name in names]
    prompts, tokens = [], []
    for i in range(n):
        p = base[i % len(base)] if i < len(base) else Z.shuffle_words(rng.choice(base), names, rng)
        spans = zi.tokenizer.encode(p)[1]
        idx = Z.concept_token_indices(spans, Z.find_phrases(p, names))
        if not idx:
            raise ValueError(f"the concept {concept!r} cannot be found among the tokens of {p!r}; "
                             f"write --concept exactly as it appears in prompts (or add --alias).")
        prompts.append(p)
        tokens.append(idx)
    return prompts, tokens


def preservation_prompts(zi: C.ZImage, args, names: list[str]) -> list[str]:
    """D_pr: --preserve, else the model's stored list for the category, else GENERIC_PRESERVE; prompts that
    name the concept (or an alias, whole words, any case: the matcher that locates concept tokens) are left
    out, since preserving them would hold the model where the erasure must move it."""
    if args.preserve:
        if named := [p for p in args.preserve if Z.find_phrases(p, names)]:
            raise ValueError(f"--preserve {named[0]!r} names the concept being erased; preservation prompts must "
                             f"not contain {args.concept!r} or its aliases.")
        return args.preserve
    stored = zi.defaults.get("preserve", {}).get(args.category, []) or GENERIC_PRESERVE
    kept = [p for p in stored if not Z.find_phrases(p, names)]
    if not kept:
        raise ValueError(f"every preservation prompt names {args.concept!r}, so none is left to preserve; pass "
                         f"--preserve PROMPT (repeatable) with prompts that do not.")
    return kept


def trajectory_pool(zi: C.ZImage, conds: list[Tensor], c_null: Tensor, seed: int, height: int, width: int,
                    steps: int, guidance: float):
    """Partial trajectories of the frozen model: for len(conds) seeded noises, trajectory i sampled under
    conds[i] as sample.py samples (the model's stored steps and guidance; Turbo: 8 steps, no CFG), and
    every state x_{σ_k} it visits (k = 0..steps-1). Returns states (steps*n, C, h, w), their σ (steps*n,),
    the prompt index of each state (its trajectory i), and the frozen model's outputs the sampler computed
    at each state: v_θ(x, c_i), and v_θ(x, ∅) when it sampled with CFG (else None)."""
    n = len(conds)
    sig = turbo_sigmas(steps, zi.scheduler.shift)
    x = initial_noise(n, zi.transformer.cfg.in_channels, height, width, zi.vae_scale_factor, seed).to(zi.device)
    xs, sigmas, outputs = [], [], []
    for k in range(steps):
        xs.append(x.clone())
        sigmas.append(torch.full((n,), sig[k].item()))
        x = denoise(zi.transformer, x, conds, sig[k:k + 2], [c_null] * n, guidance, record=outputs)  # one step
    v_cond = torch.cat([pos for pos, _ in outputs])
    v_null = torch.cat([neg for _, neg in outputs]) if outputs[0][1] is not None else None
    return torch.cat(xs), torch.cat(sigmas), torch.arange(n).repeat(steps), v_cond, v_null


@torch.no_grad()
def frozen_velocities(dit, x: Tensor, sigma: Tensor, conds: list[Tensor], chunk: int = 16) -> Tensor:
    """v_θ(x_i, c_i, t_i = 1 - σ_i) of the frozen model for every state of a pool, in chunks. Called before
    the LoRA exists: states and prompts that do not change during training get their references once."""
    return torch.cat([dit(x[i:i + chunk], 1 - sigma[i:i + chunk].to(x.device), conds[i:i + chunk])
                      for i in range(0, len(x), chunk)])


@dataclass
class ErasePool:
    """D_er: states x_t of frozen trajectories under the concept prompt, and the erase prompts c_er."""
    x: Tensor  # (n, C, h, w) fp32 states
    t: Tensor  # (n,) the DiT's time t = 1 - σ
    v_null: Tensor  # (n, C, h, w) v_θ(x_t, ∅), frozen (Eq. 5)
    c_er: list[Tensor]  # encoded erase prompts (word-shuffled variants), each (L_variant, cap_feat_dim)
    concept_tokens: list[list[int]]  # per variant: caption indices of the concept's tokens (Eq. 6)


@dataclass
class PreserveBatch:
    """K preservation samples with their prompts and the frozen references of Eq. 8."""
    x: Tensor  # (K, C, h, w)
    t: Tensor  # (K,)
    c_pr: list[Tensor]  # the prompt of each sample's trajectory
    v_null: Tensor  # (K, C, h, w) v_θ(x_pr, ∅)
    v_c: Tensor  # (K, C, h, w) v_θ(x_pr, c_pr)

    def inputs(self, c_null: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Each sample twice, (x_pr, ∅) then (x_pr, c_pr): x (2K, C, h, w), t (2K,), 2K captions."""
        return torch.cat([self.x, self.x]), torch.cat([self.t, self.t]), [c_null] * len(self.x) + self.c_pr


@dataclass
class PreservePool:
    """D_pr: states x_pr of frozen trajectories under the preservation prompts, with their references."""
    x: Tensor
    t: Tensor
    c_pr: list[Tensor]  # per state
    v_null: Tensor
    v_c: Tensor

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: list[int]) -> PreserveBatch:
        return PreserveBatch(self.x[idx], self.t[idx], [self.c_pr[i] for i in idx], self.v_null[idx],
                             self.v_c[idx])


def build_pools(zi: C.ZImage, args, c_er: list[Tensor], c_pr: list[Tensor], c_null: Tensor, size: int):
    """The pools and their frozen references, computed once before the LoRA exists (it would not change
    them: the LoRA is off for references). x_pr: at least one trajectory per preservation prompt. The
    references are the outputs the sampler already computed at those states (v_θ(x, ∅) too when it sampled
    with CFG); only those it did not compute are computed again."""
    dit, steps, guidance = zi.transformer, zi.defaults.get("steps", 8), zi.defaults.get("guidance", 0.0)
    x_t, sigma_t, _, _, v_null = trajectory_pool(zi, [c_er[0]] * args.pool, c_null, args.seed, size, size, steps,
                                                 guidance)
    conds = [c_pr[i % len(c_pr)] for i in range(max(args.pool, len(c_pr)))]  # a prompt per trajectory
    x_pr, sigma_pr, idx, v_pr, v_pr_null = trajectory_pool(zi, conds, c_null, args.seed + 1, size, size, steps,
                                                           guidance)  # v_pr = v_θ(x_pr, c_pr)
    if v_null is None:  # sampled without CFG: the unconditional outputs are still to be computed
        v_null = frozen_velocities(dit, x_t, sigma_t, [c_null] * len(x_t))  # v_θ(x_t, ∅)
        v_pr_null = frozen_velocities(dit, x_pr, sigma_pr, [c_null] * len(x_pr))  # v_θ(x_pr, ∅)
    dt = zi.dtype  # stored in the DiT's dtype, which is what the DiT casts its inputs to anyway
    x_t, v_null, x_pr, v_pr, v_pr_null = (a.to(dt) for a in (x_t, v_null, x_pr, v_pr, v_pr_null))
    return (x_t, 1 - sigma_t.to(zi.device), v_null), PreservePool(x_pr, 1 - sigma_pr.to(zi.device),
                                                                  [conds[i] for i in idx], v_pr_null, v_pr)


@dataclass
class Run:
    """Everything the loop reads and updates."""
    args: argparse.Namespace
    dit: torch.nn.Module
    spec: Z.LoRASpec
    erase: ErasePool
    preserve: PreservePool
    c_null: Tensor  # the empty prompt ∅, encoded
    params: list[torch.nn.Parameter]  # Δθ
    opt: torch.optim.Optimizer
    eps: float
    terms: set[str]  # the loss terms in use: erase, attn, pr (Table 5)
    kind: str  # implicit | exact | fixed
    meta: dict  # settings written into the LoRA file
    out: Path
    ckpt: Path
    lam: float = 0.0  # λ_0 = 0 (Algorithm 1), or the fixed λ
    step: int = 0
    meter: "GTildeMeter | None" = None
    ref_chunk: int = 1  # steps whose frozen references are computed in one call (frozen_reference)
    refs: tuple = (None, None)  # (chunk index, its references)
    timings: dict = None  # seconds per setup stage
    log: object = None


def resolve(args, zi: C.ZImage) -> dict:
    """Settings that need the model: category, ε, layers, aliases; raises ValueError with the fix."""
    args.category = args.category or zi.defaults.get("categories", {}).get(args.concept)
    if args.category is None:
        raise ValueError(f"no --category given for {args.concept!r} and the model does not know it; pass "
                         f"--category with one of {', '.join(sorted(EPS_BY_CATEGORY))}.")
    targets, n_layers = tuple(args.targets.split(",")), zi.transformer.cfg.n_layers
    layers = tuple(range(n_layers)) if args.layers == "all" else tuple(int(i) for i in args.layers.split(","))
    if not set(targets) <= {"to_q", "to_k", "to_v"} or not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"--targets must be among to_q,to_k,to_v and --layers within 0..{n_layers - 1}.")
    lora_alpha = args.lora_alpha or args.deprecated_alpha or float(args.rank)
    return {"eps": args.eps if args.eps is not None else EPS_BY_CATEGORY[args.category],
            "aliases": args.alias or zi.defaults.get("aliases", {}).get(args.concept, []),
            "spec": Z.LoRASpec(layers=layers, targets=targets, rank=args.rank, lora_alpha=lora_alpha,
                               gated=not args.no_gate)}


def check_flags(args) -> set[str]:
    """Flags that need no model; returns the loss terms. Raises ValueError naming the flag."""
    terms = set(args.losses.split(","))
    if not terms or not terms <= {"erase", "attn", "pr"}:
        raise ValueError(f"--losses must be a subset of erase,attn,pr (got {args.losses!r}).")
    if min(args.steps, args.rank, args.pool, args.variants, args.pr_batch, args.checkpoint_every) < 1 \
            or args.lr <= 0:
        raise ValueError("--steps, --lr, --rank, --pool, --variants, --pr-batch, --checkpoint-every must be > 0.")
    if min(args.eps if args.eps is not None else 0, args.fixed_lambda or 0) < 0:
        raise ValueError("--eps and --fixed-lambda must be >= 0 (a negative λ rewards raising L_pr).")
    if args.deprecated_alpha is not None:
        print("warning: --alpha is deprecated; it is the LoRA alpha, now spelled --lora-alpha.", file=sys.stderr)
    return terms


def prepare(args, zi: C.ZImage | None = None) -> Run:
    """Check the flags, load θ_0 (unless given), build D_er and D_pr with their frozen references, add
    Δθ = 0 (Algorithm 1's input), and resume from the training checkpoint if asked. Each stage is reported
    with its time and kept in run.timings."""
    terms, timings = check_flags(args), {}
    if zi is None:
        with stage("loading the model", timings, "load"):
            zi = C.load_zimage(args.model, parse_device(args.device),
                               parse_dtype(args.dtype) if args.dtype else None, vae=False)
    s = resolve(args, zi)
    cer_prompts, cer_tokens = concept_prompts(zi, args.concept, s["aliases"], args.category, args.variants,
                                              args.seed)
    cpr_prompts = preservation_prompts(zi, args, [args.concept] + s["aliases"])
    out = Path(args.out or f"loras/{args.concept.lower().replace(' ', '-')}.safetensors")
    with stage(f"encoding {len(cer_prompts) + len(cpr_prompts) + 1} prompts", timings, "encode"):
        feats = zi.encode_prompts(cer_prompts + cpr_prompts + [""])  # every prompt once, then the encoder goes
    c_er, c_pr, c_null = feats[:len(cer_prompts)], feats[len(cer_prompts):-1], feats[-1]
    zi.free_text_encoder()
    dit = zi.transformer
    dit.gradient_checkpointing = args.gradient_checkpointing
    size = args.resolution or zi.defaults.get("height", 1024)
    with stage(f"trajectory pools and frozen references at {size}x{size}", timings, "pools"):
        (x, t, v_null), preserve = build_pools(zi, args, c_er, c_pr, c_null, size)
    params = Z.add_lora(dit, s["spec"], seed=args.seed)
    kind = "fixed" if args.fixed_lambda is not None or "pr" not in terms else args.mode
    run = Run(args, dit, s["spec"], ErasePool(x, t, v_null, c_er, cer_tokens), preserve, c_null, params,
              OPTIMIZERS[args.optim](params, lr=args.lr), s["eps"], terms, kind, settings(args, zi, s, terms), out,
              out.with_suffix(".ckpt.safetensors"), lam=args.fixed_lambda or 0.0, timings=timings)
    # as many steps' references per call as fit in about 4,096 tokens (16 on the tiny model, 1 at 1024²)
    tokens = dit.layout([tuple(x.shape[-2:])], [max(len(c) for c in c_er)]).seq_len
    run.ref_chunk = max(1, min(16, 4096 // tokens, args.steps))
    if kind == "implicit":
        jvp = args.gtilde == "jvp" or (args.gtilde == "auto" and zi.dtype != torch.float32)
        run.meter = GTildeMeter(fresh=args.gtilde_batch == "fresh", jvp=jvp)
    if args.resume and run.ckpt.exists():
        state = C.load_training_state(run.ckpt, {"lora": dit}, {"opt": run.opt}, only=lambda k: "lora_" in k)
        run.lam, run.step = state["lambda"], state["step"]
        print(f"resumed from {run.ckpt} at step {run.step}")
    run.log = open_log(out.with_suffix(".jsonl"), run.step if args.resume else 0)
    return run


def settings(args, zi: C.ZImage, s: dict, terms: set[str]) -> dict:
    """The run's settings as the LoRA file records them."""
    return {"concept": args.concept, "category": args.category, "aliases": s["aliases"], "eps": s["eps"],
            "eta": args.eta, "lr": args.lr, "beta": args.beta, "steps": args.steps, "mode": args.mode,
            "losses": sorted(terms), "optim": args.optim, "fixed_lambda": args.fixed_lambda, "seed": args.seed, "pool": args.pool,
            "pr_batch": args.pr_batch, "gtilde_batch": args.gtilde_batch, "gtilde": args.gtilde,
            "dtype": str(zi.dtype).removeprefix("torch."), "gradient_checkpointing": args.gradient_checkpointing}


# ---------------------------------------------------------------------------------------------------------
# One step


@dataclass
class EraseSample:
    """One draw from D_er: a state x_t with its time, the erase prompt c_er, and the frozen references
    v_θ(x_t, ∅) and v_θ(x_t, c_er) of Eq. 5's target."""
    x: Tensor  # (1, C, h, w)
    t: Tensor  # (1,)
    v_null: Tensor  # (C, h, w)
    c_er: Tensor
    concept_tokens: list[int]
    v_c: Tensor | None = None  # (C, h, w), from frozen_reference


def _draw_erase(run: Run, rng: random.Random) -> EraseSample:
    e = run.erase
    j, variant = rng.randrange(len(e.x)), rng.randrange(len(e.c_er))
    return EraseSample(e.x[j:j + 1], e.t[j:j + 1], e.v_null[j], e.c_er[variant], e.concept_tokens[variant])


def _step_rng(run: Run, step: int) -> random.Random:
    return random.Random(run.args.seed * 1_000_003 + step)


def draw(run: Run, step: int) -> tuple[EraseSample, PreserveBatch]:
    """Algorithm 1: sample c_er ~ D_er (with x_t) and K samples c_pr ~ D_pr. Everything a step draws is a
    function of (seed, step), so a resumed run draws what the uninterrupted one did."""
    rng = _step_rng(run, step)
    er = _draw_erase(run, rng)
    er.v_c = frozen_reference(run, step)
    return er, run.preserve.batch([rng.randrange(len(run.preserve)) for _ in range(run.args.pr_batch)])


@torch.no_grad()
def frozen_reference(run: Run, step: int) -> Tensor:
    """v_θ(x_t, c_er) of the step's draw: the frozen model (LoRA off), for Eq. 5's target. It does not depend
    on Δθ, so the references of run.ref_chunk consecutive steps are computed in one batched call; chunks
    start at multiples of ref_chunk, so a resumed run batches exactly as the uninterrupted one did."""
    chunk = step // run.ref_chunk
    if run.refs[0] != chunk:
        first = chunk * run.ref_chunk
        ers = [_draw_erase(run, _step_rng(run, s)) for s in range(first, first + run.ref_chunk)]
        with Z.lora_disabled(run.dit):  # LoRA off: exactly θ
            run.refs = (chunk, run.dit(torch.cat([e.x for e in ers]), torch.cat([e.t for e in ers]),
                                       [e.c_er for e in ers]))
    return run.refs[1][step % run.ref_chunk]


def pr_loss(v: Tensor, pr: PreserveBatch) -> Tensor:
    """Eq. 8 from the LoRA model's velocities on pr.inputs(): the (x_pr, ∅) and (x_pr, c_pr) terms, the
    expectation over D_pr estimated on the K samples; the frozen references come with the pool."""
    K = len(pr.x)
    return Z.preservation_loss(v[:K], pr.v_null) + Z.preservation_loss(v[K:], pr.v_c)


def losses(run: Run, er: EraseSample, pr: PreserveBatch, probed: ExitStack) -> tuple[Tensor, Tensor, Tensor]:
    """L_erase (Eq. 5), L_attn (Eq. 6), L_pr (Eq. 8) with the LoRA on, from one batched DiT call on
    (x_t, c_er) and the K preservation samples, each twice. The attention probe is entered on `probed`;
    the caller closes it after backward (gradient checkpointing recomputes the probed layers there)."""
    dit = run.dit
    x_pr, t_pr, caps_pr = pr.inputs(run.c_null)
    x, t, caps = torch.cat([er.x, x_pr]), torch.cat([er.t, t_pr]), [er.c_er] + caps_pr  # (1 + 2K, C, h, w)
    lay = dit.layout([tuple(x.shape[-2:])] * len(caps), [len(c) for c in caps])
    probe = Z.AttentionProbe(lay, [er.concept_tokens] + [[]] * len(caps_pr))
    probed.enter_context(Z.attention_probe(dit, run.spec.layers if "attn" in run.terms else (), probe))
    v = dit(x, t, caps)
    zero = v.new_zeros(()).float()
    L_erase = Z.erase_loss(v[0], Z.erase_target(er.v_null, er.v_c, run.args.eta)) if "erase" in run.terms else zero
    L_attn = probe.loss() if "attn" in run.terms else zero  # Eq. 6
    return L_erase, L_attn, pr_loss(v[1:], pr)


@torch.no_grad()
def pr_value(run: Run, pr: PreserveBatch) -> float:
    """L_pr (Eq. 8) of the current LoRA on a preservation batch, without gradients."""
    return pr_loss(run.dit(*pr.inputs(run.c_null)), pr).item()


class NonFiniteLoss(Exception):
    pass


def record(step: int, L_erase: Tensor, L_attn: Tensor, L_pr: Tensor, lam: float) -> dict:
    """The step's log record (raises NonFiniteLoss before anything is updated if a loss is NaN/inf)."""
    rec = {"step": step + 1, "L_erase": L_erase.item(), "L_attn": L_attn.item(), "L_pr": L_pr.item(),
           "lambda": lam}
    if not all(math.isfinite(rec[k]) for k in ("L_erase", "L_attn", "L_pr")):
        raise NonFiniteLoss(step + 1)
    return rec


class GTildeMeter:
    """How much one update changed L_pr on a batch: what g̃ compares with αε (Eq. 15).

    Where: fresh=False measures on the training batch itself (Algorithm 1 read literally; the "before" is
    the loss the step was trained on). fresh=True measures on K preservation samples the update did not
    fit, so that g̃ follows the expected L_pr rather than the batch just fitted (measured in the README: on
    the training batch λ decays to ~0 while L_pr rises elsewhere). A fresh batch serves a pair of steps
    (2p, 2p+1): step 2p's "after" is measured at the parameters step 2p+1 starts from, so it is also step
    2p+1's "before".
    How: jvp=False takes L_pr(after) − L_pr(before), Eq. 15 as written. In bfloat16 each L_pr carries
    rounding noise far larger than one step's change (README: bf16), so jvp=True measures the same change
    as the directional derivative ∇L_pr(θ_mid)·Δθ at the step's midpoint θ_mid = (θ_before + θ_after)/2,
    by forward-mode AD: equal to the difference up to O(‖Δθ‖³), with no cancellation of two noisy values.
    """

    def __init__(self, fresh: bool, jvp: bool = False):
        self.fresh, self.jvp, self.carried, self.theta_before = fresh, jvp, None, None

    def batch(self, run: Run, step: int, train_batch: PreserveBatch) -> PreserveBatch:
        if not self.fresh:
            return train_batch
        rng = random.Random(f"{run.args.seed}/measure/{step // 2}")
        return run.preserve.batch([rng.randrange(len(run.preserve)) for _ in range(run.args.pr_batch)])

    def before(self, run: Run, batch: PreserveBatch) -> float | None:
        """L_pr(θ_before) of a fresh batch (None for the training batch: its value comes from the step)."""
        if self.jvp:
            self.theta_before = [p.detach().clone() for p in run.params]
            return None
        if not self.fresh:
            return None
        return self.carried if self.carried is not None else pr_value(run, batch)

    def after(self, run: Run, step: int, batch: PreserveBatch) -> float:
        """L_pr(θ_after) on the same batch; kept as the next step's "before" when that step shares the batch.
        With jvp=True: the change ∇L_pr(θ_mid)·Δθ instead."""
        if self.jvp:
            return pr_change(run, batch, self.theta_before)
        value = pr_value(run, batch)
        self.carried = value if self.fresh and step % 2 == 0 else None
        return value


def pr_change(run: Run, batch: PreserveBatch, theta_before: list[Tensor]) -> float:
    """∇L_pr(θ_mid)·Δθ on a batch, Δθ = θ_after − θ_before over the LoRA parameters (torch.func.jvp)."""
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {id(p): n for n, p in run.dit.named_parameters()}
    mid = {names[id(p)]: (p.detach() + b) / 2 for p, b in zip(run.params, theta_before)}
    delta = {names[id(p)]: p.detach() - b for p, b in zip(run.params, theta_before)}
    x, t, caps = batch.inputs(run.c_null)
    L_pr = lambda lora: pr_loss(functional_call(run.dit, lora, (x, t, caps)), batch)  # noqa: E731
    # the fused attention kernels have no forward AD; the plain one, a block of queries at a time, bounds
    # the scores that exist at once (at 1024², 4 items' whole maps would be 4 × 30 × 4,224² values)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), M.attention_in_blocks(run.dit, 1024):
        return jvp(L_pr, (mid,), (delta,))[1].item()


def implicit_step(run: Run, step: int) -> dict:
    """Algorithm 1, one iteration: L_total = L_er + λ L_pr, one backward, then g̃ (Eq. 15) and λ (Eq. 13)."""
    er, pr = draw(run, step)
    measured = run.meter.batch(run, step, pr)
    L_before = run.meter.before(run, measured)  # L_pr(θ_{t-1}) on the measurement batch
    probed = ExitStack()
    L_erase, L_attn, L_pr = losses(run, er, pr, probed)
    rec = record(step, L_erase, L_attn, L_pr, run.lam)
    run.opt.zero_grad(set_to_none=True)
    (L_erase + L_attn + run.lam * L_pr).backward()  # L_total = L_er + λ L_pr (Eq. 7, Algorithm 1)
    probed.close()
    run.opt.step()  # AdamW by default, as the paper trains; α in Eq. 15 is its learning rate (zerase.py, [7])
    if run.meter.jvp:  # the change L_pr(θ_t) − L_pr(θ_{t-1}), measured as a derivative
        change = run.meter.after(run, step, measured)
        g = Z.g_tilde(0.0, change, run.args.lr, run.eps)  # Eq. 15
        rec.update(L_pr_change=change, g_tilde=g)
    else:
        L_before = rec["L_pr"] if L_before is None else L_before
        L_after = run.meter.after(run, step, measured)  # L_pr(θ_t), same batch
        g = Z.g_tilde(L_before, L_after, run.args.lr, run.eps)  # Eq. 15
        rec.update(L_pr_after=L_after, g_tilde=g)
        if run.meter.fresh:
            rec.update(L_pr_before_measured=L_before)
    run.lam = Z.update_lambda(run.lam, g, run.args.beta)  # Eq. 13: λ ← max(0, λ − β g̃), for the next step
    return rec


def exact_step(run: Run, step: int) -> dict:
    """The exact modulation: ∇L_er and ∇L_pr by two backwards, d* and λ* in closed form (Eqs. 11-12)."""
    er, pr = draw(run, step)
    probed = ExitStack()
    L_erase, L_attn, L_pr = losses(run, er, pr, probed)
    record(step, L_erase, L_attn, L_pr, run.lam)  # the finiteness check, before any gradient
    run.opt.zero_grad(set_to_none=True)
    g_er = torch.autograd.grad(L_erase + L_attn, run.params, retain_graph=True, materialize_grads=True)  # ∇L_er
    g_pr = torch.autograd.grad(L_pr, run.params, materialize_grads=True)  # ∇L_pr, the second backward
    d, lam_star = Z.d_star_per_param(g_er, g_pr, run.eps)  # Eqs. 11-12
    for p, d_p in zip(run.params, d):
        p.grad = d_p  # θ ← θ − α·d* with --optim sgd; AdamW steps along its rescaling of d* (zerase.py, [7])
    probed.close()
    run.opt.step()
    run.lam = float(lam_star)
    return record(step, L_erase, L_attn, L_pr, run.lam)


def fixed_step(run: Run, step: int) -> dict:
    """The static-weighting baseline: L_er + λ L_pr with a constant λ (--fixed-lambda), or L_er alone."""
    er, pr = draw(run, step)
    probed = ExitStack()
    L_erase, L_attn, L_pr = losses(run, er, pr, probed)
    rec = record(step, L_erase, L_attn, L_pr, run.lam)
    run.opt.zero_grad(set_to_none=True)
    L_er = L_erase + L_attn
    (L_er + run.lam * L_pr if "pr" in run.terms else L_er).backward()
    probed.close()
    run.opt.step()
    return rec


STEPS = {"implicit": implicit_step, "exact": exact_step, "fixed": fixed_step}


# ---------------------------------------------------------------------------------------------------------
# Around the loop: the per-step log, training checkpoints, the finished LoRA file


def open_log(path: Path, keep: int):
    """<out>.jsonl, one record per step; on resume the records of the first `keep` steps are kept and those
    past the checkpoint are dropped."""
    old = path.read_text().splitlines() if keep and path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w")
    log.writelines(line + "\n" for line in old[:keep])
    return log


def save_state(run: Run) -> None:
    run.log.flush()
    C.save_training_state(run.ckpt, {"lora": run.dit}, {"opt": run.opt}, {"step": run.step, "lambda": run.lam},
                          only=lambda k: "lora_" in k)


def main(argv=None):
    args = parse_args(argv)
    try:
        run = prepare(args)
    except (CheckpointError, ValueError) as e:
        die(str(e))
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=run.step, desc=f"erasing {args.concept!r}")
    t_start = time.time()
    with run.log:  # closed (flushed) however the loop ends; resume drops records past the checkpoint
        while run.step < args.steps:
            try:
                rec = STEPS[run.kind](run, run.step)
            except NonFiniteLoss as e:
                bar.close()
                last = f"the last good checkpoint is {run.ckpt} (--resume)" if run.ckpt.exists() else \
                    "no checkpoint yet"
                die(f"the loss became NaN/inf at step {e.args[0]}; {last}; lower --lr / --eta.", code=3)
            run.step += 1
            run.log.write(json.dumps(rec) + "\n")
            bar.set_postfix(L_er=f"{rec['L_erase'] + rec['L_attn']:.4f}", L_attn=f"{rec['L_attn']:.3f}",
                            L_pr=f"{rec['L_pr']:.2e}", lam=f"{run.lam:.3f}")
            bar.update()
            if run.step % args.checkpoint_every == 0 or run.step == args.steps:
                save_state(run)
    bar.close()
    meta = {**run.meta, "train_seconds": round(time.time() - t_start, 1)}
    lora_file.save_lora(run.out, run.dit, run.spec, base=lora_file.base_fingerprint(run.dit), settings=meta)
    print(f"wrote {run.out} ({sum(p.numel() for p in run.params):,} parameters; log {run.log.name})")
    return run.out


if __name__ == "__main__":
    main()
