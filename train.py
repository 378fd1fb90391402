"""
Erase a concept from Z-Image with Z-Erase: train a token-gated LoRA (arXiv 2603.25074, Algorithm 1).

    python train.py --concept "Van Gogh"                       # embedded tiny model, defaults
    python train.py --concept "Van Gogh" --anchor null         # Eq. 5 around v(x_t, ∅), as in the paper
    python train.py --concept "Van Gogh" --mode exact          # exact gradient surgery (Eqs. 11-12)
    python train.py --concept star --erase-steps 5             # Eq. 5 on the sampler's first 5 of 8 steps
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
import difflib
import json
import math
import random
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

import checkpoint as C
import lora_file
import zerase as Z
from cli import (HelpFormatter, OutputError, check_output, die, exclusive, number, parse_device, parse_dtype,
                 stage, text)
import model as M
from model import CheckpointError
from sample import DEFAULT_MODEL, denoise, initial_noise, turbo_sigmas

EPS_BY_CATEGORY = {"style": 1e-3, "nudity": 1e-3, "violence": 1e-3, "entity": 1e-2, "abstraction": 1e-2,
                   "celebrity": 1e-2}  # Table 6
BETA = 0.1  # the paper's dual step size (Algorithm 1's β), for a checkpoint that stores none
ETA = 2.0  # the paper's negative guidance of Eq. 5 (§5.1), for a category the checkpoint stores none for
TEMPLATE_BY_CATEGORY = {"style": "An art in the style of {}", "entity": "A photo of {}",
                        "abstraction": "A close scene of {}", "celebrity": "A photo of {}",
                        "nudity": "A photo of {}", "violence": "A photo of {}"}  # Table 7
# --anchor auto: measured per category on the 28 concepts of the tiny model (bench/results/sweep-*.json,
# README). Styles: content is better on every measure; colours (abstraction): better content kept, neutral
# prompts and FD, worse on the other colours (Acc_ir); entities: at the paper's ε, β and η no better, but at
# the tiny model's (ε 3e-3, β 100, η 1) the other entities lose 2.4 points on average instead of 4.3 with ∅.
# Categories never measured keep the paper's ∅.
ANCHOR_BY_CATEGORY = {"style": "content", "entity": "content", "abstraction": "content"}
GENERIC_PRESERVE = ["a photo of a dog", "a portrait of a woman", "a landscape with mountains and a lake",
                    "a city street at night", "a bowl of fruit on a table", "a red car", "a cat on a sofa",
                    "an oil painting of a ship"]  # used when the model stores no preservation prompts


DEFAULT_RESOLUTION = 512  # for checkpoints that store none (the real model): README, "Real Z-Image-Turbo"
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # default hyper-parameters otherwise
# each pool's refiner outputs are kept when they fit in this many bytes (the tiny model's preservation pool
# takes 44 MB; the real model's at 512² several GB, so it refines every batch as it comes): refine_states
REFINED_BUDGET = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for add in (add_task_flags, add_algorithm_flags, add_lora_flags, add_sample_flags, add_run_flags):
        add(p)  # in this order in --help
    return p.parse_args(argv)


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """What to erase, what to preserve, from which model, into which file."""
    p.add_argument("--concept", help="the concept to erase, as prompts write it (any case); required")
    p.add_argument("--list-concepts", action="store_true",
                   help="print the concepts the model knows and exit")
    p.add_argument("--category", choices=sorted(EPS_BY_CATEGORY), help="sets ε (Table 6) and the prompt "
                   "template (Table 7); default: from the model's zerase.json")
    p.add_argument("--force", action="store_true", help="train a concept the model does not list, and "
                   "overwrite an existing --out")
    p.add_argument("--alias", action="append", default=[],
                   help="another spelling of the concept (repeatable)")
    p.add_argument("--preserve", action="append", help="a preservation prompt c_pr (repeatable); default: "
                   "the model's own list (zerase.json), else a generic list")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Z-Image checkpoint directory (HF layout)")
    p.add_argument("--out", help="LoRA file, .safetensors (default: loras/<concept>.safetensors)")


def add_algorithm_flags(p: argparse.ArgumentParser) -> None:
    """Algorithm 1's hyper-parameters, the exact mode and the baselines."""
    p.add_argument("--steps", type=int, default=1000, help="training steps M (Algorithm 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="α, the learning rate")
    p.add_argument("--optim", choices=["adamw", "sgd"], default="adamw", help="adamw (the paper's optimiser) "
                   "or sgd: the plain step θ ← θ − α·d the derivations assume (with --mode exact, each step "
                   "then keeps the first-order rise of L_pr within αε, Eq. 9)")
    p.add_argument("--beta", type=float, help="β, step size of the λ update (Eq. 13); default: the model's "
                   "stored value if it has one (the tiny model: 100), else the paper's 0.1")
    p.add_argument("--eta", type=float, help="η, negative guidance of the erase target (Eq. 5); default by "
                   "category: the model's stored value if it has one (the tiny model: 1 for style, entity "
                   "and abstraction), else the paper's 2")
    p.add_argument("--eps", type=float, help="ε, preservation tolerance per step, in units of α; default by "
                   "category: the model's stored value if it has one (the tiny model: entity 3e-3), else "
                   "Table 6's")
    p.add_argument("--mode", choices=["implicit", "exact"], default="implicit",
                   help="implicit: Algorithm 1 (one backward); exact: gradient surgery, Eqs. 11-12 (two)")
    p.add_argument("--fixed-lambda", type=float, help="baseline: static scalarisation L_er + X·L_pr")
    p.add_argument("--no-gate", action="store_true", help="baseline: naive LoRA on image and text tokens")
    p.add_argument("--losses", default="erase,attn,pr", help="subset of erase,attn,pr (Table 5 ablation)")


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    """Δθ: the LoRA's rank, scale and the projections it adapts."""
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale = lora_alpha/rank); default = rank")
    # --alpha: the old spelling of --lora-alpha, kept working but hidden from --help
    p.add_argument("--alpha", type=float, dest="deprecated_alpha", help=argparse.SUPPRESS)
    p.add_argument("--targets", default="to_q,to_k,to_v", help="projections of the unified layers to adapt")
    p.add_argument("--layers", default="all", help="unified layers to adapt: all, or e.g. 0,1,2")


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    """D_er and D_pr: the trajectory pools, the prompts, and the samples g̃ is measured on."""
    p.add_argument("--resolution", type=int, help="training image size in pixels (default: the model's "
                   f"own, else {DEFAULT_RESOLUTION}, as the official release trains; see README)")
    p.add_argument("--pool", type=int, default=32, help="frozen-model trajectories to draw x_t from")
    p.add_argument("--variants", type=int, default=32, help="word-shuffled concept prompts, encoded once")
    p.add_argument("--gtilde-batch", choices=["train", "fresh"], default="fresh",
                   help="where L_pr is measured before/after each update for g̃ (Eq. 15): --pr-batch fresh "
                   "preservation samples the update did not see, or the training batch itself "
                   "(Algorithm 1 read literally; it lets λ decay to ~0, see README)")
    p.add_argument("--gtilde", choices=["auto", "difference", "jvp"], default="auto",
                   help="how the change of L_pr over a step is measured for g̃ (Eq. 15): difference = L_pr "
                   "after minus before (Eq. 15 as written); jvp = the same change as a directional "
                   "derivative ∇L_pr·Δθ at the step's midpoint (forward-mode AD), which bf16 rounding cannot "
                   "drown; auto: difference in float32, jvp in bfloat16/float16")
    p.add_argument("--check-gtilde", type=int, default=0, metavar="N",
                   help="every N steps also log g_exact, the exact ∂L_t/∂λ = ∇L_pr(θ_{t-1})·d_{t-1} + ε "
                   "(Appendix C, Eq. 33; one more backward on g̃'s batch), and step_sq = ‖Δθ‖², so that "
                   "Lemma C.3's gap |g̃ − g| ≤ Gα‖d‖²/2 can be measured; the training is unchanged (0: off; "
                   "implicit mode only)")
    p.add_argument("--anchor", choices=["auto", "null", "content"], default="auto",
                   help="what Eq. 5's target is built around: null = v(x_t, ∅) on trajectories of the bare "
                   "Table 7 prompt (ESD, the paper); content = each erase prompt pairs the concept with "
                   "content from the preservation prompts that name no concept of its category (\"a red "
                   "star, An art in the style of Monet\"), x_t comes from its trajectories, and the target "
                   "is built around v(x_t, content), so the content is kept while the concept is removed; "
                   "auto = content for the categories where it measured better on the tiny model (" +
                   ", ".join(c for c, a in ANCHOR_BY_CATEGORY.items() if a == "content") + "; README, "
                   "\"The whole world, erased one concept at a time\"), null for every other category")
    p.add_argument("--erase-steps", type=int, metavar="K", help="Eq. 5's target and Eq. 6 act on the states "
                   "of the sampler's first K steps; on the later states of a trajectory the LoRA is trained to "
                   "leave the frozen model's v_θ(x_t, c_er) as it is, so that what the last steps render (the "
                   "texture of a style) survives the erasure of a shape; default by category: the model's stored "
                   "value if it has one (the tiny model stores none: 5 of its 8 steps keeps more of most "
                   "shapes' prompts but leaves circle and square unerased; README), else every step (the "
                   "paper)")
    p.add_argument("--pr-batch", type=int, default=2, help="preservation samples (x_pr, c_pr) per step: "
                   "the Monte-Carlo size of Eq. 8's expectation, and of the L_pr measured for g̃ (Eq. 15)")
    p.add_argument("--pr-neutral", type=int, default=0, metavar="N", help="also preserve N prompts that "
                   "name no concept of the category (drawn as --anchor content draws its contents), beside "
                   "the stored other concepts of the category")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Seeding, resuming, checkpoints and the device."""
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the pools' noise, the LoRA init and every draw")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.safetensors (same flags)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between training checkpoints")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep <out>.ckpt.safetensors after a "
                   "finished run (it is removed by default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward "
                   "(memory for the real model at 1024²)")


# ---------------------------------------------------------------------------------------------------------
# Algorithm 1's inputs: D_er and D_pr as prompts, trajectory pools and frozen references


def concept_prompts(tokenizer: M.Tokenizer, concept: str, aliases: list[str], category: str, n: int,
                    seed: int):
    """n erase prompts c_er (the Table 7 template, then word-shuffled variants) and, for each, the indices
    of the concept's tokens in its templated caption, located again after every shuffle (§4.1)."""
    names = [concept] + aliases
    rng = random.Random(seed)
    base = [TEMPLATE_BY_CATEGORY[category].format(name) for name in names]
    prompts, tokens = [], []
    for i in range(n):
        p = base[i % len(base)] if i < len(base) else Z.shuffle_words(rng.choice(base), names, rng)
        spans = tokenizer.encode(p)[1]
        idx = Z.concept_token_indices(spans, Z.find_phrases(p, names))
        if not idx:
            raise ValueError(f"the concept {concept!r} cannot be found among the tokens of {p!r}; "
                             f"write --concept exactly as it appears in prompts (or add --alias).")
        prompts.append(p)
        tokens.append(idx)
    return prompts, tokens


def content_prompts(defaults: dict, preserve: list[str] | None, category: str, names: list[str], n: int,
                    seed: int | str) -> list[str]:
    """--anchor content: n prompts of content to pair with the concept, drawn from the preservation prompts
    (all categories the model stores, else --preserve, else GENERIC_PRESERVE) that name neither the concept
    nor any other concept of its category: "a red star" for a style, "Monet, red" for an entity."""
    same = [c for c, k in defaults.get("categories", {}).items() if k == category] + names
    pool = preserve or [q for lst in defaults.get("preserve", {}).values() for q in lst] or GENERIC_PRESERVE
    kept = sorted({q for q in pool if not Z.find_phrases(q, same)})
    if not kept:
        raise ValueError("--anchor content needs preservation prompts that name no concept of the category "
                         f"{category!r}; pass some with --preserve.")
    return random.Random(seed).sample(kept, min(n, len(kept)))


def paired_prompts(tokenizer: M.Tokenizer, concept: str, aliases: list[str], category: str,
                   contents: list[str]):
    """--anchor content: erase prompt i = "<content i>, <Table 7 template of a name>" (names in turn) and its
    concept tokens; the anchor of prompt i is content i itself."""
    names = [concept] + aliases
    prompts = [f"{c}, {TEMPLATE_BY_CATEGORY[category].format(names[i % len(names)])}"
               for i, c in enumerate(contents)]
    tokens = [Z.concept_token_indices(tokenizer.encode(q)[1], Z.find_phrases(q, names)) for q in prompts]
    return prompts, tokens


def preservation_prompts(defaults: dict, preserve: list[str] | None, category: str, concept: str,
                         names: list[str]) -> list[str]:
    """D_pr: --preserve, else the model's stored list for the category, else GENERIC_PRESERVE; prompts that
    name the concept (or an alias, whole words, any case: the matcher that locates concept tokens) are left
    out, since preserving them would hold the model where the erasure must move it."""
    if preserve:
        if named := [p for p in preserve if Z.find_phrases(p, names)]:
            raise ValueError(f"--preserve {named[0]!r} names the concept being erased; preservation prompts "
                             f"must not contain {concept!r} or its aliases.")
        return preserve
    stored = defaults.get("preserve", {}).get(category, []) or GENERIC_PRESERVE
    kept = [p for p in stored if not Z.find_phrases(p, names)]
    if not kept:
        raise ValueError(f"every preservation prompt names {concept!r}, so none is left to preserve; pass "
                         f"--preserve PROMPT (repeatable) with prompts that do not.")
    return kept


def trajectory_pool(zi: C.ZImage, conds: list[Tensor], c_null: Tensor, seed: int, height: int, width: int,
                    steps: int, guidance: float):
    """Partial trajectories of the frozen model: for len(conds) seeded noises, trajectory i sampled under
    conds[i] as sample.py samples (the model's stored steps and guidance; Turbo: 8 steps, no CFG), and
    every state x_{σ_k} it visits (k = 0..steps-1). Returns states (steps*n, C, h, w), their σ (steps*n,),
    the prompt index of each state (its trajectory i), and the frozen model's outputs the sampler computed
    at each state: v_θ(x, c_i), and v_θ(x, ∅) when it sampled with CFG (else None)."""
    n, dit = len(conds), zi.transformer
    sig = turbo_sigmas(steps, zi.scheduler.shift)
    x = initial_noise(n, dit.cfg.in_channels, height, width, zi.vae_scale_factor, seed).to(zi.device)
    xs, sigmas, outputs = [], [], []
    for k in range(steps):
        xs.append(x.clone())
        sigmas.append(torch.full((n,), sig[k].item()))
        x = denoise(dit, x, conds, sig[k:k + 2], [c_null] * n, guidance, record=outputs)  # one step
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
    x: Tensor  # (n, C, h, w) states
    t: Tensor  # (n,) the DiT's time t = 1 - σ
    v_anchor: Tensor  # (n, C, h, w) frozen v_θ(x_t, ∅) of Eq. 5; --anchor content: v_θ(x_t, content)
    c_er: list[Tensor]  # encoded erase prompts (word-shuffled variants), each (L_variant, cap_feat_dim)
    concept_tokens: list[list[int]] | None = None  # per variant: caption indices of the concept's tokens
    prompt_of: list[int] | None = None  # --anchor content: the erase prompt of each state's trajectory
    v_c: Tensor | None = None  # (n, C, h, w) with prompt_of: frozen v_θ(x_t, c_er) of each state's own prompt
    refined: M.Refined | None = None  # with prompt_of: each state's (x_t, c_er) after the refiners
    k: Tensor | None = None  # (n,) the sampler step of each state's trajectory it was visited at (0 = noise)


@dataclass
class PreserveBatch:
    """K preservation samples with their prompts and the frozen references of Eq. 8."""
    x: Tensor  # (K, C, h, w)
    t: Tensor  # (K,)
    c_pr: list[Tensor]  # the prompt of each sample's trajectory
    v_null: Tensor  # (K, C, h, w) v_θ(x_pr, ∅)
    v_c: Tensor  # (K, C, h, w) v_θ(x_pr, c_pr)
    refined: M.Refined | None = None  # the 2K items of inputs() after the refiners, when the pool keeps them

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
    refined: M.Refined | None = None  # every state as (x_pr, ∅), then every state as (x_pr, c_pr)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: list[int]) -> PreserveBatch:
        refined = self.refined.take(idx + [len(self) + i for i in idx]) if self.refined else None
        return PreserveBatch(self.x[idx], self.t[idx], [self.c_pr[i] for i in idx], self.v_null[idx],
                             self.v_c[idx], refined)


@torch.no_grad()
def refine_states(dit, x: Tensor, t: Tensor, conds: list[Tensor], chunk: int = 16) -> M.Refined | None:
    """The refiners' outputs for inputs (x_i, t_i, conds_i) that every step would compute again from the same
    states and prompts, computed once, for a model whose refiners and timestep embedding do not train
    (refiners_train); a step then runs only the unified layers on them. None when they would not fit in
    REFINED_BUDGET bytes."""
    cfg = dit.cfg
    seq = dit.layout([tuple(x.shape[-2:])], [max(len(c) for c in conds)]).seq_len
    per_token = cfg.dim * dit.x_pad_token.element_size() + cfg.head_dim // 2 * 8  # tokens + complex64 RoPE
    if len(x) * seq * per_token > REFINED_BUDGET:
        return None
    return M.Refined.cat([dit.refine(x[i:i + chunk], t[i:i + chunk], conds[i:i + chunk])
                          for i in range(0, len(x), chunk)])


def refine_pool(dit, pool: PreservePool, c_null: Tensor) -> M.Refined | None:
    """The preservation pool's inputs after the refiners: every state as (x_pr, ∅), then as (x_pr, c_pr)."""
    return refine_states(dit, torch.cat([pool.x, pool.x]), torch.cat([pool.t, pool.t]),
                         [c_null] * len(pool) + pool.c_pr)


def refine_erase_pool(dit, pool: ErasePool) -> M.Refined | None:
    """The erase pool's inputs (x_t, c_er) after the refiners, when each state has its own erase prompt
    (--anchor content); else a step pairs a state with any variant and there is no fixed input to keep."""
    if pool.prompt_of is None:
        return None
    return refine_states(dit, pool.x, pool.t, [pool.c_er[i] for i in pool.prompt_of])


def refiners_train(dit) -> bool:
    """Whether anything trainable sits before the unified layers (then no refiner output may be kept)."""
    return any(p.requires_grad for name, p in dit.named_parameters()
               if not name.startswith(("layers.", "all_final_layer.")))


def pr_streams(dit, pr: PreserveBatch, c_null: Tensor) -> M.Refined:
    """The preservation batch's 2K inputs after the refiners: kept by the pool, else computed now."""
    return pr.refined if pr.refined is not None else dit.refine(*pr.inputs(c_null))


def build_pools(zi: C.ZImage, args, c_er: list[Tensor], c_pr: list[Tensor], c_null: Tensor, size: int,
                c_anchor: list[Tensor] = ()):
    """The pools and their frozen references, computed once before the LoRA exists (it would not change
    them: the LoRA is off for references). x_pr: at least one trajectory per preservation prompt. The
    references are the outputs the sampler already computed at those states (v_θ(x, ∅) too when it sampled
    with CFG); only those it did not compute are computed again."""
    dit, steps, guidance = zi.transformer, zi.defaults.get("steps", 8), zi.defaults.get("guidance", 0.0)

    def pool(conds: list[Tensor], seed: int):
        return trajectory_pool(zi, conds, c_null, seed, size, size, steps, guidance)

    er_conds = [c_er[i % len(c_er)] for i in range(max(args.pool, len(c_er)))] if c_anchor else \
        [c_er[0]] * args.pool  # --anchor content: a trajectory per erase prompt; else all under the first
    k_of = torch.arange(steps).repeat_interleave(len(er_conds))  # trajectory_pool's order: step-major
    x_t, sigma_t, er_idx, v_er, v_null = pool(er_conds, args.seed)  # v_er = v_θ(x_t, its trajectory's c_er)
    conds = [c_pr[i % len(c_pr)] for i in range(max(args.pool, len(c_pr)))]  # a prompt per trajectory
    x_pr, sigma_pr, idx, v_pr, v_pr_null = pool(conds, args.seed + 1)  # v_pr = v_θ(x_pr, c_pr)
    if v_pr_null is None:  # sampled without CFG: the unconditional outputs are still to be computed
        v_null = None if c_anchor else frozen_velocities(dit, x_t, sigma_t, [c_null] * len(x_t))  # (x_t, ∅)
        v_pr_null = frozen_velocities(dit, x_pr, sigma_pr, [c_null] * len(x_pr))  # v_θ(x_pr, ∅)
    prompt_of = [int(i) % len(c_er) for i in er_idx] if c_anchor else None
    v_anchor = frozen_velocities(dit, x_t, sigma_t, [c_anchor[i] for i in prompt_of]) if c_anchor else v_null
    dt = zi.dtype  # stored in the DiT's dtype, which is what the DiT casts its inputs to anyway
    x_t, v_anchor, v_er, x_pr, v_pr, v_pr_null = (a.to(dt) for a in (x_t, v_anchor, v_er, x_pr, v_pr,
                                                                   v_pr_null))
    # --anchor content: a state's erase prompt is its trajectory's, so Eq. 5's v_θ(x_t, c_er) is the output
    # the sampler computed there; else a step pairs a state with any variant and frozen_reference computes it
    return (ErasePool(x_t, 1 - sigma_t.to(zi.device), v_anchor, c_er, prompt_of=prompt_of,
                      v_c=v_er if c_anchor else None, k=k_of),
            PreservePool(x_pr, 1 - sigma_pr.to(zi.device), [conds[i] for i in idx], v_pr_null, v_pr))


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
    eta: float  # Eq. 5's negative guidance
    beta: float  # the λ update's step size (Eq. 13)
    erase_steps: int | None  # the sampler steps Eq. 5's target acts on (None: all)
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
    frozen: object = None  # a context manager factory inside which dit is θ_0 (default: Z.lora_disabled)


# ---------------------------------------------------------------------------------------------------------
# The command line, checked before anything slow: flags, the model's own configs (no weights), outputs


@dataclass
class Plan:
    """A run's resolved settings, all checked: what prepare builds and what the LoRA file records."""
    concept: str  # as the model spells it
    category: str
    eps: float
    eta: float  # Eq. 5's negative guidance
    beta: float
    erase_steps: int | None  # --erase-steps, resolved (None: every step, the paper)
    aliases: list[str]
    spec: Z.LoRASpec
    terms: set[str]  # the loss terms in use: erase, attn, pr (Table 5)
    size: int  # training resolution in pixels
    dtype: torch.dtype
    cer_prompts: list[str]
    cer_tokens: list[list[int]]
    cpr_prompts: list[str]
    out: Path
    settings: dict
    anchors: list[str]  # --anchor content: the content of each erase prompt (else empty: the anchor is ∅)
    note: str = ""  # what the user should know about the resolved settings (prepare prints it)


def check_flags(args) -> set[str]:
    """Flags that need no model; returns the loss terms. Raises ValueError naming the flag and the fix."""
    terms = set(args.losses.split(","))
    if not terms or not terms <= {"erase", "attn", "pr"}:
        raise ValueError(f"--losses must be a subset of erase,attn,pr (got {args.losses!r}).")
    for flag in ("steps", "rank", "pool", "variants", "pr_batch", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)}).")
    if args.erase_steps is not None and args.erase_steps < 1:
        raise ValueError(f"--erase-steps must be at least 1 (got {args.erase_steps}); leave it out to erase on "
                         "every sampler step.")
    if args.pr_neutral < 0:
        raise ValueError(f"--pr-neutral must be 0 (none) or a number of prompts (got {args.pr_neutral}).")
    if args.check_gtilde < 0:
        raise ValueError(f"--check-gtilde must be 0 (off) or a number of steps (got {args.check_gtilde}).")
    if args.check_gtilde and (args.mode != "implicit" or args.fixed_lambda is not None or "pr" not in terms):
        raise ValueError("--check-gtilde measures the implicit mode's g̃ (Eq. 15); drop it, or train with "
                         "--mode implicit, L_pr in --losses and no --fixed-lambda.")
    number("--lr", args.lr, low=0, strict=True)
    for flag in ("beta", "eta", "eps", "fixed_lambda", "lora_alpha", "deprecated_alpha"):
        if (value := getattr(args, flag)) is not None:
            name = "--alpha" if flag == "deprecated_alpha" else f"--{flag.replace('_', '-')}"
            number(name, value, low=0, strict=flag.endswith("alpha"))
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be a positive number of pixels (got {args.resolution}).")
    for flag in ("concept", "category", "out", "model"):
        if getattr(args, flag) is not None:
            text(f"--{flag}", getattr(args, flag))
    for flag, values in (("--alias", args.alias), ("--preserve", args.preserve or [])):
        for v in values:
            if not text(flag, v).strip():
                raise ValueError(f"{flag} is blank; give it a spelling/prompt, or leave the flag out.")
    if args.deprecated_alpha is not None:
        print("warning: --alpha is deprecated; it is the LoRA alpha, now spelled --lora-alpha.",
              file=sys.stderr)
    return terms


def find_concept(args, cfgs: C.Configs) -> str:
    """--concept as the model spells it (any case). On a model that lists its concepts, an unknown one is
    refused (with the nearest names) unless --force."""
    concept = (args.concept or "").strip()
    if not concept:
        raise ValueError("--concept is missing or blank; name the concept to erase as prompts write it, e.g. "
                         "--concept \"Van Gogh\" (--list-concepts shows the model's).")
    known = cfgs.defaults.get("categories", {})
    if not known or args.force:
        return next((c for c in known if c.lower() == concept.lower()), concept)
    if match := next((c for c in known if c.lower() == concept.lower()), None):
        return match
    near = difflib.get_close_matches(concept.lower(), [c.lower() for c in known], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in known if c.lower() in near)}? " if near else ""
    raise ValueError(f"--concept {concept!r}: the model does not know it; {hint}--list-concepts shows the "
                     f"{len(known)} it knows; to train it anyway pass --force with --category (a concept the "
                     f"model cannot draw leaves nothing to erase).")


def list_concepts(model) -> str:
    known = C.read_configs(model).defaults.get("categories", {})
    if not known:
        return (f"{model} stores no concept list (a real checkpoint does not); any concept can be erased "
                f"with --concept NAME --category {{{','.join(sorted(EPS_BY_CATEGORY))}}}.")
    by = {}
    for c, k in known.items():
        by.setdefault(k, []).append(c)
    return "\n".join(f"{k} ({len(cs)}): {', '.join(cs)}" for k, cs in by.items())


def default_eps(defaults: dict, category: str) -> float:
    """ε without --eps: the one the model stores for the category (zerase.json "eps": the tiny model's,
    measured on its world), else Table 6's."""
    return stored_number(defaults.get("eps", {}).get(category, EPS_BY_CATEGORY[category]), "ε", category,
                         "--eps")


def default_eta(defaults: dict, category: str) -> float:
    """η without --eta: the one the model stores for the category (zerase.json "eta": the tiny model's,
    measured on its world), else the paper's 2."""
    return stored_number(defaults.get("eta", {}).get(category, ETA), "η", category, "--eta")


def default_beta(defaults: dict) -> float:
    """β without --beta: the one the model stores (zerase.json "beta": the tiny model's, measured on its
    world, where L_pr's changes are small and λ climbs too slowly at 0.1), else the paper's."""
    return stored_number(defaults.get("beta", BETA), "β", "the λ update", "--beta")


def resolve_erase_steps(flag: int | None, defaults: dict, category: str) -> int | None:
    """--erase-steps (checked ≥ 1 by check_flags), else the model's stored value for the category (zerase.json
    "erase_steps"), else None: Eq. 5 on every state, as the paper trains. A value of the model's sampler
    steps or more is every step, so it resolves to None as well."""
    value = flag
    if flag is None:
        value = defaults.get("erase_steps", {}).get(category)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"the model's zerase.json stores erase_steps = {value!r} for {category}, not a "
                             f"whole number ≥ 1; fix that entry or pass --erase-steps.")
    return value if value is not None and value < defaults.get("steps", 8) else None


def stored_number(value, symbol: str, what: str, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"the model's zerase.json stores {symbol} = {value!r} for {what}, not a number ≥ 0; "
                         f"fix that entry or pass {flag}.")
    return float(value)


def check_model_flags(args, cfgs: C.Configs, concept: str) -> dict:
    """Flags checked against the model's configs: category, ε, η, β, layers, targets, resolution."""
    category = args.category or cfgs.defaults.get("categories", {}).get(concept)
    if category is None:
        raise ValueError(f"no --category given for {concept!r} and the model does not know it; pass "
                         f"--category with one of {', '.join(sorted(EPS_BY_CATEGORY))}.")
    targets, n_layers = tuple(args.targets.split(",")), cfgs.transformer.n_layers
    if not set(targets) <= {"to_q", "to_k", "to_v"}:
        raise ValueError(f"--targets {args.targets!r}: each must be to_q, to_k or to_v, comma-separated.")
    layers = parse_layers(args.layers, n_layers)
    size, m = args.resolution or cfgs.defaults.get("height", DEFAULT_RESOLUTION), 2 * cfgs.vae.scale_factor
    if size % m:
        raise ValueError(f"--resolution {size} must be a multiple of {m} for this model (one DiT patch is "
                         f"{m} pixels); e.g. {max(m, size // m * m)}.")
    lora_alpha = args.lora_alpha or args.deprecated_alpha or float(args.rank)
    eps = args.eps if args.eps is not None else default_eps(cfgs.defaults, category)
    eta = args.eta if args.eta is not None else default_eta(cfgs.defaults, category)
    beta = args.beta if args.beta is not None else default_beta(cfgs.defaults)
    erase_steps = resolve_erase_steps(args.erase_steps, cfgs.defaults, category)
    return {"category": category, "eps": eps, "eta": eta, "beta": beta, "erase_steps": erase_steps,
            "aliases": args.alias or cfgs.defaults.get("aliases", {}).get(concept, []), "size": size,
            "spec": Z.LoRASpec(layers=layers, targets=targets, rank=args.rank, lora_alpha=lora_alpha,
                               gated=not args.no_gate)}


def parse_layers(layers: str, n_layers: int) -> tuple[int, ...]:
    """--layers: "all", or distinct unified-layer numbers in 0..n_layers-1."""
    try:
        chosen = tuple(range(n_layers)) if layers == "all" else tuple(int(i) for i in layers.split(","))
    except ValueError:
        raise ValueError(f"--layers {layers!r} must be all or comma-separated layer numbers, e.g. "
                         f"0,1,2.") from None
    if not chosen or not all(0 <= i < n_layers for i in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"--layers {layers!r}: this model's unified layers are 0..{n_layers - 1}, "
                         f"each once.")
    return chosen


def check_prompt_lengths(cfgs: C.Configs, prompts: list[str], source: str) -> None:
    """Refuse (naming where the prompt came from) a prompt the text encoder would silently cut."""
    for p in prompts:
        if (n := cfgs.tokenizer.n_tokens(p)) > M.MAX_TEXT_TOKENS:
            raise ValueError(f"{source}: the prompt {p[:40]!r}... has {n} tokens with the chat template; the "
                             f"text encoder reads at most {M.MAX_TEXT_TOKENS}: shorten it.")


def resolve_anchor(args, cfgs: C.Configs, category: str, names: list[str]) -> tuple[str, list[str], str]:
    """--anchor, resolved: (null, [], note) or (content, the content of each erase prompt, ""). auto takes the
    category's anchor (ANCHOR_BY_CATEGORY); where no preservation prompt is free of the category's concepts
    (e.g. --preserve prompts that all name a colour, for a colour) it falls back to the paper's ∅ with a
    note that prepare prints, while an explicit --anchor content is refused."""
    anchor = ANCHOR_BY_CATEGORY.get(category, "null") if args.anchor == "auto" else args.anchor
    if anchor == "null":
        return "null", [], ""
    try:
        return "content", content_prompts(cfgs.defaults, args.preserve, category, names, args.pool,
                                          args.seed), ""
    except ValueError:
        if args.anchor == "content":
            raise
    return "null", [], (f"--anchor auto: no preservation prompt is free of every {category} concept, so the "
                        "target is built around ∅ (the paper's); pass such prompts with --preserve for the "
                        "content anchor")


def check(args, cfgs: C.Configs | None = None) -> Plan:
    """Everything about a run that can be checked before the weights load, checked; returns the Plan."""
    terms = check_flags(args)
    cfgs = cfgs or C.read_configs(args.model)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    device = parse_device(args.device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    concept = find_concept(args, cfgs)
    s = check_model_flags(args, cfgs, concept)
    cpr_prompts = preservation_prompts(cfgs.defaults, args.preserve, s["category"], concept,
                                       [concept] + s["aliases"])
    if args.pr_neutral:  # D_pr's unrelated content too (§4.1): prompts naming no concept of the category
        cpr_prompts += content_prompts(cfgs.defaults, args.preserve, s["category"], [concept] + s["aliases"],
                                       args.pr_neutral, f"{args.seed}/neutral")
    anchor, anchors, note = resolve_anchor(args, cfgs, s["category"], [concept] + s["aliases"])
    if anchor == "content":
        cer_prompts, cer_tokens = paired_prompts(cfgs.tokenizer, concept, s["aliases"], s["category"],
                                                 anchors)
    else:
        cer_prompts, cer_tokens = concept_prompts(cfgs.tokenizer, concept, s["aliases"], s["category"],
                                                  args.variants, args.seed)
    # the content first: with --anchor content an erase prompt holds a preservation prompt
    check_prompt_lengths(cfgs, cpr_prompts + anchors, "--preserve" if args.preserve else "zerase.json")
    check_prompt_lengths(cfgs, cer_prompts, "--concept/--alias")  # an erase prompt is a template of them
    out = check_output(args.out or f"loras/{concept.lower().replace(' ', '-')}.safetensors", "--out",
                       (".safetensors",), extra_names=(f"{concept}.ckpt.safetensors.lock",))
    settings = {"concept": concept, "category": s["category"], "aliases": s["aliases"], "eps": s["eps"],
                "eta": s["eta"], "erase_steps": s["erase_steps"], "lr": args.lr, "beta": s["beta"],
                "steps": args.steps, "mode": args.mode,
                "losses": sorted(terms), "optim": args.optim, "fixed_lambda": args.fixed_lambda,
                "seed": args.seed, "pool": args.pool, "pr_batch": args.pr_batch,
                "gtilde_batch": args.gtilde_batch, "gtilde": args.gtilde,
                "dtype": str(dtype).removeprefix("torch."), "resolution": s["size"],
                "gradient_checkpointing": args.gradient_checkpointing, "variants": args.variants,
                "rank": args.rank, "layers": list(s["spec"].layers), "targets": list(s["spec"].targets),
                "gate": s["spec"].gated, "preserve": cpr_prompts, "anchor": anchor}
    check_resume(args, cfgs, out, settings)
    return Plan(concept, s["category"], s["eps"], s["eta"], s["beta"], s["erase_steps"], s["aliases"],
                s["spec"], terms, s["size"], dtype, cer_prompts, cer_tokens, cpr_prompts, out, settings, anchors, note)


RESUMABLE = {"steps"}  # settings a resumed run may change (train longer)


def check_resume(args, cfgs: C.Configs, out: Path, settings: dict) -> None:
    """--resume needs a checkpoint of this very run (same settings, same base model); without --resume an
    existing LoRA is not overwritten unless --force."""
    ckpt = out.with_suffix(".ckpt.safetensors")
    if not args.resume:
        if out.exists() and not args.force:
            raise ValueError(f"{out} exists; pass --force to overwrite it, or --out another file.")
        return
    if not ckpt.exists():
        done = f"{out} is finished and " if out.exists() else ""
        raise ValueError(f"--resume: {done}there is no checkpoint {ckpt} to resume from; run without "
                         f"--resume to start fresh.")
    saved = C.read_training_meta(ckpt)
    differ = sorted(k for k in set(settings) | set(saved.get("settings", {})) if k not in RESUMABLE
                    and saved.get("settings", {}).get(k) != settings.get(k))
    if differ:
        was, now = saved.get("settings", {}), settings
        detail = "; ".join(f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in differ[:4])
        raise ValueError(f"--resume: {ckpt} was trained with other settings ({detail}); resume with the "
                         f"same flags, or start fresh without --resume.")
    if saved.get("base_model") != base_of(cfgs):
        raise ValueError(f"--resume: {ckpt} was trained on another base model than {cfgs.path}; resume with "
                         f"the model it was trained on.")
    if saved["step"] > args.steps or (saved["step"] == args.steps and out.exists()):
        raise ValueError(f"--resume: {ckpt} is at step {saved['step']}, not before --steps {args.steps}; "
                         f"pass a larger --steps to train on.")


def base_of(cfgs: C.Configs) -> str:
    """The base-model fingerprint of a checkpoint directory, from its stored tensors (no model built)."""
    stored = C.read_stored(cfgs.path / "transformer", C.FINGERPRINT_TENSORS)
    return lora_file.base_fingerprint(SimpleNamespace(cfg=cfgs.transformer, stored_values=stored))


def prepare(args, zi: C.ZImage | None = None, adapt=Z.add_lora) -> Run:
    """Check every flag, load θ_0 (unless given), build D_er and D_pr with their frozen references, add
    Δθ = 0 (Algorithm 1's input), and resume from the training checkpoint if asked. Each stage is reported
    with its time and kept in run.timings. `adapt(dit, spec, seed)` makes the trainable parameters: the
    gated LoRA, or finetune.py's full weights (which then also sets run.frozen)."""
    cfgs = C.Configs(zi.path, zi.transformer.cfg, zi.vae_cfg, zi.scheduler, zi.tokenizer, zi.defaults) if zi \
        else None
    plan, timings = check(args, cfgs), {}
    if plan.note:
        print(plan.note, file=sys.stderr)
    if zi is None:
        with stage("loading the model", timings, "load"):
            zi = C.load_zimage(args.model, parse_device(args.device), plan.dtype, vae=False)
    prompts = plan.cer_prompts + plan.cpr_prompts + plan.anchors + [""]
    with stage(f"encoding {len(prompts)} prompts", timings, "encode"):
        feats = zi.encode_prompts(prompts)  # each once, then freed
    n, m = len(plan.cer_prompts), len(plan.cer_prompts) + len(plan.cpr_prompts)
    c_er, c_pr, c_anchor, c_null = feats[:n], feats[n:m], feats[m:-1], feats[-1]
    zi.free_text_encoder()
    dit = zi.transformer
    dit.gradient_checkpointing = args.gradient_checkpointing
    with stage(f"trajectory pools and frozen references at {plan.size}x{plan.size}", timings, "pools"):
        erase, preserve = build_pools(zi, args, c_er, c_pr, c_null, plan.size, c_anchor)
    params = adapt(dit, plan.spec, seed=args.seed)
    if not refiners_train(dit):  # else the refiner outputs change every step: nothing to keep
        with stage("refining the pools", timings, "refine"):
            preserve.refined = refine_pool(dit, preserve, c_null)
            erase.refined = refine_erase_pool(dit, erase)
    kind = "fixed" if args.fixed_lambda is not None or "pr" not in plan.terms else args.mode
    erase.concept_tokens = plan.cer_tokens
    run = Run(args, dit, plan.spec, erase, preserve, c_null, params,
              OPTIMIZERS[args.optim](params, lr=args.lr), plan.eps, plan.eta, plan.beta, plan.erase_steps,
              plan.terms, kind, plan.settings, plan.out, plan.out.with_suffix(".ckpt.safetensors"),
              lam=args.fixed_lambda or 0.0, timings=timings)
    # as many steps' references per call as fit in about 4,096 tokens (16 on the tiny model, 1 at 1024²)
    tokens = dit.layout([tuple(erase.x.shape[-2:])], [max(len(c) for c in c_er)]).seq_len
    run.ref_chunk = max(1, min(16, 4096 // tokens, args.steps))
    if kind == "implicit":
        jvp = args.gtilde == "jvp" or (args.gtilde == "auto" and zi.dtype != torch.float32)
        run.meter = GTildeMeter(fresh=args.gtilde_batch == "fresh", jvp=jvp)
    if args.resume:
        state = C.load_training_state(run.ckpt, {"lora": dit}, {"opt": run.opt}, only=lambda k: "lora_" in k)
        run.lam, run.step = state["lambda"], state["step"]
        if run.meter is not None:
            run.meter.carried = state.get("L_pr_before")
        print(f"resumed from {run.ckpt} at step {run.step}", file=sys.stderr)
    run.log = open_log(plan.out.with_suffix(".jsonl"), run.step if args.resume else 0)
    return run


# ---------------------------------------------------------------------------------------------------------
# One step


@dataclass
class EraseSample:
    """One draw from D_er: a state x_t with its time, the erase prompt c_er, and the frozen references
    v_θ(x_t, ∅) (or the content anchor's) and v_θ(x_t, c_er) of Eq. 5's target."""
    x: Tensor  # (1, C, h, w)
    t: Tensor  # (1,)
    v_anchor: Tensor  # (C, h, w)
    c_er: Tensor
    concept_tokens: list[int]
    v_c: Tensor | None = None  # (C, h, w): the pool's, else from frozen_reference
    refined: M.Refined | None = None  # (x_t, c_er) after the refiners, when the pool keeps them
    keep: bool = False  # a state past --erase-steps: the target is v_θ(x_t, c_er) itself, no L_attn


def _draw_erase(run: Run, rng: random.Random) -> EraseSample:
    e = run.erase
    j, variant = rng.randrange(len(e.x)), rng.randrange(len(e.c_er))
    if e.prompt_of is not None:  # --anchor content: the prompt whose trajectory x_t is on, with its anchor
        variant = e.prompt_of[j]
    return EraseSample(e.x[j:j + 1], e.t[j:j + 1], e.v_anchor[j], e.c_er[variant], e.concept_tokens[variant],
                       v_c=e.v_c[j] if e.v_c is not None else None,
                       refined=e.refined.take([j]) if e.refined is not None else None,
                       keep=run.erase_steps is not None and int(e.k[j]) >= run.erase_steps)


def _step_rng(run: Run, step: int) -> random.Random:
    return random.Random(run.args.seed * 1_000_003 + step)


def draw(run: Run, step: int) -> tuple[EraseSample, PreserveBatch]:
    """Algorithm 1: sample c_er ~ D_er (with x_t) and K samples c_pr ~ D_pr. Everything a step draws is a
    function of (seed, step), so a resumed run draws what the uninterrupted one did."""
    rng = _step_rng(run, step)
    er = _draw_erase(run, rng)
    if er.v_c is None:  # the pool has no reference for this (state, prompt) pair
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
        with run.frozen() if run.frozen else Z.lora_disabled(run.dit):  # LoRA off: exactly θ
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
    # 1 + 2K items: (x_t, c_er), then the preservation inputs (refined by the pool when it keeps them)
    er_streams = er.refined if er.refined is not None else dit.refine(er.x, er.t, [er.c_er])
    streams = M.Refined.cat([er_streams, pr_streams(dit, pr, run.c_null)])
    attn = "attn" in run.terms and not er.keep
    probe = Z.AttentionProbe(streams.lay, [er.concept_tokens] + [[]] * 2 * len(pr.x))
    probed.enter_context(Z.attention_probe(dit, run.spec.layers if attn else (), probe))
    v = dit.unified(streams)  # (1 + 2K, C, h, w)
    zero = v.new_zeros(()).float()
    # Eq. 5; past --erase-steps the target is the frozen model's own output there (the LoRA leaves it be)
    target = er.v_c if er.keep else Z.erase_target(er.v_anchor, er.v_c, run.eta)
    L_erase = Z.erase_loss(v[0], target) if "erase" in run.terms else zero
    L_attn = probe.loss() if attn else zero  # Eq. 6
    return L_erase, L_attn, pr_loss(v[1:], pr)


@torch.no_grad()
def pr_values(run: Run, batches: list[PreserveBatch]) -> list[float]:
    """L_pr (Eq. 8) of the current LoRA on each of several preservation batches, from one DiT call."""
    v = run.dit.unified(M.Refined.cat([pr_streams(run.dit, pr, run.c_null) for pr in batches]))
    parts = v.split([2 * len(pr.x) for pr in batches])  # each batch's 2K items, in order
    return [pr_loss(v_pr, pr).item() for v_pr, pr in zip(parts, batches)]


def pr_value(run: Run, pr: PreserveBatch) -> float:
    """L_pr (Eq. 8) of the current LoRA on one preservation batch, without gradients."""
    return pr_values(run, [pr])[0]


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
    2p+1's "before"; step 2p+1's "after" and step 2p+2's "before", on the next pair's batch, are both at the
    parameters step 2p+2 starts from, so one DiT call measures the two. Each value carried to the next step
    is saved with the training checkpoint, so a resumed run uses what the uninterrupted one measured.
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
        if self.fresh and step % 2:  # also the "before" of step + 1, on the next pair's batch: one call
            value, self.carried = pr_values(run, [batch, self.batch(run, step + 1, batch)])
        else:
            value = pr_value(run, batch)
            self.carried = value if self.fresh else None  # the same batch's "before" at step + 1
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


def pr_gradient(run: Run, batch: PreserveBatch) -> tuple[list[Tensor], list[Tensor]]:
    """∇L_pr(θ_{t-1}) on a batch, and θ_{t-1} itself (the LoRA parameters): what --check-gtilde needs."""
    theta = [p.detach().clone() for p in run.params]
    L_pr = pr_loss(run.dit.unified(pr_streams(run.dit, batch, run.c_null)), batch)
    return list(torch.autograd.grad(L_pr, run.params, materialize_grads=True)), theta


def exact_g(run: Run, grads: list[Tensor], theta_before: list[Tensor]) -> dict:
    """Eq. 33's g_t = ∇L_pr(θ_{t-1})·d_{t-1} + ε, d_{t-1} = (θ_{t-1} − θ_t)/α the step actually taken (AdamW's
    too), which g̃ estimates from two losses (Eq. 34); and ‖Δθ‖² = α²‖d‖², the size Lemma C.3's bound on
    |g̃ − g| scales with (Eq. 35)."""
    delta = [p.detach().float() - b.float() for p, b in zip(run.params, theta_before)]
    dot = sum((g.float() * d).sum() for g, d in zip(grads, delta)).item()  # ∇L_pr·Δθ = −α ∇L_pr·d
    # the first-order change in place of L_pr(θ_t) − L_pr(θ_{t-1}): (0 − ∇L_pr·Δθ)/α + ε = ∇L_pr·d + ε
    return {"g_exact": Z.g_tilde(0.0, dot, run.args.lr, run.eps), "step_sq": sum(d.square().sum().item()
                                                                                 for d in delta)}


def implicit_step(run: Run, step: int) -> dict:
    """Algorithm 1, one iteration: L_total = L_er + λ L_pr, one backward, then g̃ (Eq. 15) and λ (Eq. 13)."""
    er, pr = draw(run, step)
    measured = run.meter.batch(run, step, pr)
    every = run.args.check_gtilde
    exact = pr_gradient(run, measured) if every and (step + 1) % every == 0 else None  # logged steps N, 2N, …
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
    if exact is not None:
        rec.update(exact_g(run, *exact))  # Lemma C.3: g̃ against the exact g_t of the same step
    run.lam = Z.update_lambda(run.lam, g, run.beta)  # Eq. 13: λ ← max(0, λ − β g̃), for the next step
    return rec


def exact_step(run: Run, step: int) -> dict:
    """The exact modulation: ∇L_er and ∇L_pr by two backwards, d* and λ* in closed form (Eqs. 11-12)."""
    er, pr = draw(run, step)
    probed = ExitStack()
    L_erase, L_attn, L_pr = losses(run, er, pr, probed)
    record(step, L_erase, L_attn, L_pr, run.lam)  # the finiteness check, before any gradient
    run.opt.zero_grad(set_to_none=True)
    L_er = L_erase + L_attn
    g_er = torch.autograd.grad(L_er, run.params, retain_graph=True, materialize_grads=True)  # ∇L_er
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
    old = step_records(path) if keep and path.exists() else []
    log = open(path, "w")
    log.writelines(line + "\n" for line in old[:keep])
    return log


def step_records(log: Path) -> list[str]:
    """The per-step lines of a log, without the closing summary."""
    return [line for line in log.read_text().splitlines() if '"step"' in line]


def save_state(run: Run) -> None:
    run.log.flush()
    carried = run.meter.carried if run.meter is not None else None  # the next step's measured "before"
    C.save_training_state(run.ckpt, {"lora": run.dit}, {"opt": run.opt},
                          {"step": run.step, "lambda": run.lam, "settings": run.meta, "L_pr_before": carried,
                           "base_model": lora_file.base_fingerprint(run.dit)}, only=lambda k: "lora_" in k)


class Smoothed:
    """Bias-corrected exponential moving averages of the logged losses, for the progress bar and summary
    (single steps jump by orders of magnitude: x_t, t and the prompt change every step)."""

    def __init__(self, decay: float = 0.98):
        self.decay, self.n, self.avg, self.lam = decay, 0, {}, []

    def update(self, rec: dict) -> dict:
        self.n += 1
        for k in ("L_erase", "L_attn", "L_pr"):
            self.avg[k] = self.decay * self.avg.get(k, 0.0) + (1 - self.decay) * rec[k]
        self.lam.append(rec["lambda"])
        return {k: v / (1 - self.decay ** self.n) for k, v in self.avg.items()}


def train_loop(run: Run) -> Smoothed:
    """Algorithm 1's loop: one step per iteration, logged, checkpointed every --checkpoint-every steps."""
    from tqdm import tqdm
    args, smooth = run.args, Smoothed()
    with tqdm(total=args.steps, initial=run.step, desc=f"erasing {run.meta['concept']!r}") as bar:
        while run.step < args.steps:
            rec = STEPS[run.kind](run, run.step)
            run.step += 1
            run.log.write(json.dumps(rec) + "\n")
            s = smooth.update(rec)
            bar.set_postfix(L_erase=f"{s['L_erase']:.4f}", L_attn=f"{s['L_attn']:.3f}",
                            L_pr=f"{s['L_pr']:.2e}", lam=f"{run.lam:.3f}")
            bar.update()
            if run.step % args.checkpoint_every == 0 or run.step == args.steps:
                save_state(run)
    return smooth


def finish(run: Run, smooth: Smoothed, seconds: float) -> None:
    """Write the LoRA (its bytes depend only on the run: timings go to the log), drop the training
    checkpoint unless kept, print a summary."""
    base = lora_file.base_fingerprint(run.dit)
    lora_file.save_lora(run.out, run.dit, run.spec, base=base, settings=run.meta)
    run.log.write(json.dumps({"finished": run.step, "seconds": round(seconds, 1), **run.timings}) + "\n")
    run.log.close()
    if not run.args.keep_checkpoint:
        run.ckpt.unlink(missing_ok=True)
    s = {k: v / (1 - smooth.decay ** smooth.n) for k, v in smooth.avg.items()} if smooth.n else {}
    lam = f"λ from {min(smooth.lam):.3g} to {max(smooth.lam):.3g}, final {run.lam:.3g}" if smooth.lam else ""
    print(f"finished {run.step} steps in {seconds:.0f} s; smoothed L_erase {s.get('L_erase', 0):.4f}, L_attn "
          f"{s.get('L_attn', 0):.4f}, L_pr {s.get('L_pr', 0):.2e}; {lam}", file=sys.stderr)
    print(f"wrote {run.out} ({sum(p.numel() for p in run.params):,} parameters; log {run.log.name})")


def stopped(run: Run, why: str, code: int):
    """End an unfinished run: the log keeps only the checkpointed steps (resume drops the rest anyway)."""
    run.log.close()
    log = Path(run.log.name)
    try:
        saved = C.read_training_meta(run.ckpt)["step"] if run.ckpt.exists() else 0
        lines = step_records(log)[:saved]
        log.write_text("".join(line + "\n" for line in lines)) if lines else log.unlink(missing_ok=True)
    except OSError:
        log.unlink(missing_ok=True)
    last = (f"the last checkpoint is {run.ckpt} (resume with the same command and --resume)"
            if run.ckpt.exists() else "no checkpoint was written yet")
    die(f"{why}; {last}.", code=code)


@contextmanager
def setup_interruptible():
    """Ctrl-C before the first step (setup takes tens of seconds): one line and exit 130, not a traceback;
    nothing has been written yet (the log is opened last, and the loop handles its own interrupts)."""
    try:
        yield
    except KeyboardInterrupt:
        die("interrupted before the first step; nothing was written.", code=130)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.list_concepts:
            print(list_concepts(args.model))
            return None
        out = check(args).out  # every flag, before anything slow (prepare checks again: cheap)
        with exclusive(out, "train.py"):
            with setup_interruptible():
                run = prepare(args)
            t0 = time.time()
            try:
                smooth = train_loop(run)
            except NonFiniteLoss as e:
                stopped(run, f"the loss became NaN/inf at step {e.args[0]}; lower --lr or --eta", code=3)
            except KeyboardInterrupt:
                stopped(run, f"interrupted at step {run.step}", code=130)
            except OSError as e:
                why = f"could not write the log or checkpoint next to {run.out} ({e.strerror or e})"
                stopped(run, why, code=1)
            finish(run, smooth, time.time() - t0)
            return run.out
    except (CheckpointError, ValueError, OutputError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
