"""
Erase a concept from Z-Image with Z-Erase: train a token-gated LoRA (arXiv 2603.25074, Algorithm 1).

    python train.py --concept "Van Gogh"                       # embedded tiny model, paper defaults
    python train.py --concept "Van Gogh" --mode exact          # exact gradient surgery (Eqs. 11-12)
    python train.py --concept church --category entity --model weights/Z-Image-Turbo --device cuda

One training step (Algorithm 1, implicit mode):
  1. draw x_t from a pool of partial Turbo trajectories of the FROZEN model under the concept prompt, and
     x_pr from trajectories under the preservation prompts (each with the prompt c_pr that made it);
  2. frozen references (LoRA disabled, which is exactly θ): v_θ(x_t, c_er) per step (c_er is a fresh
     word-shuffled variant); v_θ(x_t, ∅), v_θ(x_pr, ∅) and v_θ(x_pr, c_pr) once per pool, before the LoRA
     exists;
  3. with the LoRA: L_er = L_erase (Eq. 5) + L_attn (Eq. 6) on a word-shuffled concept prompt, L_pr (Eq. 8)
     on (x_pr, ∅) and (x_pr, c_pr);
  4. update the LoRA with L_total = L_er + λ L_pr (AdamW, lr α);
  5. g̃ = (L_pr before - L_pr after)/α + ε (Eq. 15), L_pr measured on the SAME batch before and after the
     update; λ ← max(0, λ - β g̃) for the next step. By default that batch is --pr-batch preservation
     samples the update did not fit (--gtilde-batch fresh): measured on the training batch itself
     (Algorithm 1 read literally) the update's own λ∇L_pr term lowers that batch's L_pr, g̃ reads as
     "constraint satisfied" while L_pr rises on every other sample, and λ decays to ~0 (README). The fresh
     batch is renewed every other step, so one step's "after" is the next step's "before" (same batch,
     same parameters) and costs no forward pass.
Prompts are encoded once and the text encoder is freed; the VAE is never loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from contextlib import ExitStack
from pathlib import Path

import torch

import model as M
import zerase as Z
from sample import DEFAULT_MODEL, denoise, initial_noise, turbo_sigmas

EPS_BY_CATEGORY = {"style": 1e-3, "nudity": 1e-3, "violence": 1e-3, "entity": 1e-2, "abstraction": 1e-2,
                   "celebrity": 1e-2}  # Table 6
TEMPLATE_BY_CATEGORY = {"style": "An art in the style of {}", "entity": "A photo of {}",
                        "abstraction": "A close scene of {}", "celebrity": "A photo of {}",
                        "nudity": "A photo of {}", "violence": "A photo of {}"}  # Table 7
GENERIC_PRESERVE = ["a photo of a dog", "a portrait of a woman", "a landscape with mountains and a lake",
                    "a city street at night", "a bowl of fruit on a table", "a red car", "a cat on a sofa",
                    "an oil painting of a ship"]  # used when the model stores no preservation prompts


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
    p.add_argument("--lr", type=float, default=1e-3, help="α, AdamW learning rate")
    p.add_argument("--beta", type=float, default=0.1, help="β, step size of the λ update (Eq. 15)")
    p.add_argument("--eta", type=float, default=2.0, help="η, negative guidance of the erase target (Eq. 5)")
    p.add_argument("--eps", type=float, help="ε, preservation tolerance; default by category (Table 6)")
    p.add_argument("--mode", choices=["implicit", "exact"], default="implicit",
                   help="implicit: Algorithm 1 (one backward); exact: gradient surgery, Eqs. 11-12 (two)")
    p.add_argument("--fixed-lambda", type=float, help="baseline: static scalarisation L_er + X·L_pr")
    p.add_argument("--no-gate", action="store_true", help="baseline: naive LoRA on image and text tokens")
    p.add_argument("--losses", default="erase,attn,pr", help="subset of erase,attn,pr (Table 5 ablation)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, help="LoRA alpha (scale = alpha/rank); default = rank")
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
# Prompts: concept prompts (word-shuffled, concept tokens located again after each shuffle), preservation

def concept_prompts(zi: M.ZImage, concept: str, aliases: list[str], category: str, n: int, seed: int):
    """n erase prompts c_er and, for each, the indices of the concept's tokens in its templated caption."""
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


def preservation_prompts(zi: M.ZImage, args, names: list[str]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------------
# One step

def preservation_inputs(batch: dict):
    """The K preservation samples, each twice: (x_pr, ∅) then (x_pr, c_pr); x (2K, C, h, w), t (2K,), 2K captions."""
    K = len(batch["x_pr"])
    return (torch.cat([batch["x_pr"], batch["x_pr"]]), torch.cat([batch["t_pr"], batch["t_pr"]]),
            [batch["cnull"]] * K + batch["cpr"])


def pr_loss(v: torch.Tensor, batch: dict) -> torch.Tensor:
    """Eq. 8 from the LoRA model's velocities on preservation_inputs(batch), its expectation over C_pr
    estimated on the K samples; the frozen references come with the pool."""
    K = len(batch["x_pr"])
    return Z.preservation_loss(v[:K], batch["ref_pr_null"]) + Z.preservation_loss(v[K:], batch["ref_pr"])


def forward_losses(dit, spec: Z.LoRASpec, batch: dict, refs, eta, losses, probed: ExitStack):
    """L_erase, L_attn, L_pr with the LoRA on: one batched DiT call for (x_t, c_er) and the K preservation
    samples, each twice: (x_pr, ∅) and (x_pr, c_pr). The attention probe is entered on `probed` and stays
    installed until the caller closes it after backward: with gradient checkpointing, backward recomputes
    the layers and must see the same probe calls as the forward did."""
    x_pr, t_pr, caps_pr = preservation_inputs(batch)
    x = torch.cat([batch["x_t"], x_pr])  # (1 + 2K, C, h, w)
    t = torch.cat([batch["t"], t_pr])
    caps = [batch["cer"]] + caps_pr
    lay = dit.layout([tuple(x.shape[-2:])] * len(caps), [len(c) for c in caps])
    probe = Z.AttentionProbe(lay, [batch["cer_tokens"]] + [[]] * len(caps_pr))
    probed.enter_context(Z.attention_probe(dit, spec.layers if "attn" in losses else (), probe))
    v = dit(x, t, caps)
    zero = v.new_zeros(()).float()
    L_erase = Z.erase_loss(v[0], Z.erase_target(refs["null"], refs["cer"], eta)) if "erase" in losses else zero
    L_attn = probe.loss() if "attn" in losses else zero  # Eq. 6
    L_pr = pr_loss(v[1:], batch)  # Eq. 8
    return L_erase, L_attn, L_pr  # Eq. 5 is L_erase


@torch.no_grad()
def references(dit, batch: dict) -> dict:
    """Frozen-model predictions (LoRA disabled = θ exactly) for the erase target (Eq. 5): v_θ(x_t, c_er),
    computed per step since c_er is a fresh word-shuffled variant, and v_θ(x_t, ∅), which comes with the
    pool (frozen_velocities, batch["ref_null"]), as do v_θ(x_pr, ∅) and v_θ(x_pr, c_pr) for Eq. 8."""
    with Z.lora_disabled(dit):
        v = dit(batch["x_t"], batch["t"], [batch["cer"]])
    return {"null": batch["ref_null"][0], "cer": v[0]}


@torch.no_grad()
def frozen_velocities(dit, x: torch.Tensor, sigma: torch.Tensor, conds: list[torch.Tensor], chunk: int = 16):
    """v_θ(x_i, c_i, t_i = 1 - σ_i) of the frozen model for every state of a pool, in chunks. Called before
    the LoRA exists: states and prompts that do not change during training get their references once."""
    return torch.cat([dit(x[i:i + chunk], 1 - sigma[i:i + chunk].to(x.device), conds[i:i + chunk])
                      for i in range(0, len(x), chunk)])


@torch.no_grad()
def preservation_value(dit, batch: dict) -> float:
    """L_pr (Eq. 8) of the current LoRA on a batch of preservation samples, without gradients: the
    measurements g̃ needs (Eq. 15), before and after an update on the same batch."""
    return pr_loss(dit(*preservation_inputs(batch)), batch).item()


def trajectory_pool(zi: M.ZImage, conds: list[torch.Tensor], cnull: torch.Tensor, seed: int, height: int,
                    width: int, steps: int, guidance: float):
    """Partial trajectories of the frozen model: for len(conds) seeded noises, trajectory i sampled under
    conds[i] as sample.py samples (the model's stored steps and guidance; Turbo: 8 steps, no CFG), and
    every state x_{σ_k} it visits (k = 0..steps-1). Returns states (steps*n, C, h, w), their σ (steps*n,)
    and the prompt index of each state (its trajectory i)."""
    n = len(conds)
    sig = turbo_sigmas(steps, zi.scheduler.shift)
    x = initial_noise(n, zi.transformer.cfg.in_channels, height, width, zi.vae_scale_factor, seed).to(zi.device)
    xs, sigmas = [], []
    for k in range(steps):
        xs.append(x.clone())
        sigmas.append(torch.full((n,), sig[k].item()))
        x = denoise(zi.transformer, x, conds, sig[k:k + 2], [cnull] * n, guidance)  # one frozen Euler step
    return torch.cat(xs), torch.cat(sigmas), torch.arange(n).repeat(steps)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = M.parse_device(args.device)
        dtype = M.parse_dtype(args.dtype) if args.dtype else None
        losses = set(args.losses.split(","))
        if not losses or not losses <= {"erase", "attn", "pr"}:
            raise ValueError(f"--losses must be a subset of erase,attn,pr (got {args.losses!r}).")
        if min(args.steps, args.rank, args.pool, args.variants, args.pr_batch, args.checkpoint_every) < 1 \
                or args.lr <= 0:
            raise ValueError("--steps, --lr, --rank, --pool, --variants, --pr-batch, --checkpoint-every must be "
                             "> 0.")
        if min(args.eps if args.eps is not None else 0, args.fixed_lambda or 0) < 0:
            raise ValueError("--eps and --fixed-lambda must be >= 0 (a negative λ rewards raising L_pr).")
        zi = M.load_zimage(args.model, device, dtype, vae=False)
        stored_cats = zi.defaults.get("categories", {})
        args.category = args.category or stored_cats.get(args.concept)
        if args.category is None:
            raise ValueError(f"no --category given for {args.concept!r} and the model does not know it; pass "
                             f"--category with one of {', '.join(sorted(EPS_BY_CATEGORY))}.")
        eps = args.eps if args.eps is not None else EPS_BY_CATEGORY[args.category]
        targets = tuple(args.targets.split(","))
        n_layers = zi.transformer.cfg.n_layers
        layers = tuple(range(n_layers)) if args.layers == "all" else tuple(int(i) for i in args.layers.split(","))
        if not set(targets) <= {"to_q", "to_k", "to_v"} or not all(0 <= i < n_layers for i in layers):
            raise ValueError(f"--targets must be among to_q,to_k,to_v and --layers within 0..{n_layers - 1}.")
        aliases = args.alias or zi.defaults.get("aliases", {}).get(args.concept, [])
        cer_prompts, cer_tokens = concept_prompts(zi, args.concept, aliases, args.category, args.variants, args.seed)
        cpr_prompts = preservation_prompts(zi, args, [args.concept] + aliases)
    except (M.CheckpointError, ValueError) as e:
        M.die(str(e))
    out = Path(args.out or f"loras/{args.concept.lower().replace(' ', '-')}.safetensors")
    ckpt, log_path = out.with_suffix(".ckpt.safetensors"), out.with_suffix(".jsonl")
    spec = Z.LoRASpec(layers=layers, targets=targets, rank=args.rank, alpha=args.alpha or float(args.rank),
                      gated=not args.no_gate)
    height = width = args.resolution or zi.defaults.get("height", 1024)
    steps_turbo = zi.defaults.get("steps", 8)

    # Encode every prompt once, then free the text encoder (DESIGN §6.7).
    feats = zi.encode_prompts(cer_prompts + cpr_prompts + [""])
    cer_feats, cpr_feats, cnull = feats[:len(cer_prompts)], feats[len(cer_prompts):-1], feats[-1]
    zi.free_text_encoder()
    dit = zi.transformer
    dit.gradient_checkpointing = args.gradient_checkpointing
    # x_t for the erase loss: trajectories under the concept prompt (ESD-style); x_pr for the preservation
    # loss: trajectories under the preservation prompts, so L_pr holds the model where those prompts go.
    guidance = zi.defaults.get("guidance", 0.0)
    pool_x, pool_sigma, _ = trajectory_pool(zi, [cer_feats[0]] * args.pool, cnull, args.seed, height, width,
                                            steps_turbo, guidance)
    # One trajectory per preservation prompt at least (a pool smaller than the prompt list would silently
    # never preserve the prompts at its end).
    pr_conds = [cpr_feats[i % len(cpr_feats)] for i in range(max(args.pool, len(cpr_feats)))]
    pr_x, pr_sigma, pr_idx = trajectory_pool(zi, pr_conds, cnull, args.seed + 1, height, width, steps_turbo,
                                             guidance)

    ref_null = frozen_velocities(dit, pool_x, pool_sigma, [cnull] * len(pool_x))  # v_θ(x_t, ∅)
    ref_pr_null = frozen_velocities(dit, pr_x, pr_sigma, [cnull] * len(pr_x))  # v_θ(x_pr, ∅)
    ref_pr = frozen_velocities(dit, pr_x, pr_sigma, [pr_conds[i] for i in pr_idx])  # v_θ(x_pr, c_pr)

    params = Z.add_lora(dit, spec, seed=args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr)
    lam = args.fixed_lambda if args.fixed_lambda is not None else 0.0  # Algorithm 1: λ_0 = 0, or the fixed λ
    step = 0
    if args.resume and ckpt.exists():
        meta = M.load_training_state(ckpt, {"lora": dit}, {"opt": opt}, only=lambda k: "lora_" in k)
        lam, step = meta["lambda"], meta["step"]
        print(f"resumed from {ckpt} at step {step}")
    out.parent.mkdir(parents=True, exist_ok=True)
    old = log_path.read_text().splitlines() if args.resume and log_path.exists() else []
    log = open(log_path, "w")
    log.writelines(line + "\n" for line in old[:step])  # resume: drop records of steps past the checkpoint
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, desc=f"erasing {args.concept!r}")
    def pr_batch(jp: list[int]) -> dict:
        """Preservation samples jp of the pool with their prompts and frozen references."""
        return {"x_pr": pr_x[jp], "t_pr": 1 - pr_sigma[jp].to(device), "cnull": cnull,
                "cpr": [pr_conds[pr_idx[i]] for i in jp], "ref_pr_null": ref_pr_null[jp], "ref_pr": ref_pr[jp]}

    implicit = args.mode == "implicit" and "pr" in losses and args.fixed_lambda is None
    fresh = implicit and args.gtilde_batch == "fresh"
    carried = None  # L_pr after an even step on its measurement batch = the next step's "before"; else None
    t_start = time.time()
    while step < args.steps:
        g = random.Random(args.seed * 1_000_003 + step)  # everything a step draws is a function of the step
        j, v = g.randrange(len(pool_x)), g.randrange(len(cer_feats))
        batch = {"x_t": pool_x[j:j + 1], "t": 1 - pool_sigma[j:j + 1].to(device),  # the DiT's time t = 1 - σ
                 "ref_null": ref_null[j:j + 1], "cer": cer_feats[v], "cer_tokens": cer_tokens[v],
                 **pr_batch([g.randrange(len(pr_x)) for _ in range(args.pr_batch)])}
        # The batch g̃ is measured on (before and after the update): the training batch itself (Algorithm 1
        # as written), or, with --gtilde-batch fresh, K other preservation samples that the update did not
        # see, so that g̃ estimates the change of the expected L_pr rather than of the batch just fitted.
        # Fresh batches are drawn per pair of steps (2p, 2p+1): step 2p's "after" is step 2p+1's "before".
        measure = batch
        if fresh:
            gm = random.Random(f"{args.seed}/measure/{step // 2}")
            measure = pr_batch([gm.randrange(len(pr_x)) for _ in range(args.pr_batch)])
            L_pr_before_m = carried if carried is not None else preservation_value(dit, measure)
        refs = references(dit, batch)
        probed = ExitStack()  # the attention probe, installed by forward_losses, removed after backward
        L_erase, L_attn, L_pr = forward_losses(dit, spec, batch, refs, args.eta, losses, probed)
        L_er = L_erase + L_attn  # Eq. 7
        use_pr = "pr" in losses
        if not all(math.isfinite(x.item()) for x in (L_erase, L_attn, L_pr)):
            bar.close()
            last = f"the last good checkpoint is {ckpt} (--resume)" if ckpt.exists() else "no checkpoint yet"
            M.die(f"the loss became NaN/inf at step {step + 1}; {last}; lower --lr / --eta.", code=3)
        opt.zero_grad(set_to_none=True)
        if args.mode == "exact" and use_pr and args.fixed_lambda is None:
            g_er = torch.autograd.grad(L_er, params, retain_graph=True, materialize_grads=True)  # ∇L_er
            g_pr = torch.autograd.grad(L_pr, params, materialize_grads=True)  # backward 2: ∇L_pr
            d, lam_star = Z.d_star_per_param(g_er, g_pr, eps)  # Eqs. 11-12
            for p, di in zip(params, d):
                p.grad = di
            lam = float(lam_star)
        else:
            weight = args.fixed_lambda if args.fixed_lambda is not None else lam
            (L_er + weight * L_pr if use_pr else L_er).backward()  # Algorithm 1: L_total = L_er + λ L_pr
        probed.close()
        opt.step()

        rec = {"step": step + 1, "L_erase": L_erase.item(), "L_attn": L_attn.item(), "L_pr": L_pr.item(),
               "lambda": lam}
        if implicit:
            L_pr_before = L_pr_before_m if fresh else L_pr.item()
            L_pr_after = preservation_value(dit, measure)
            carried = L_pr_after if fresh and step % 2 == 0 else None
            gt = Z.g_tilde(L_pr_before, L_pr_after, args.lr, eps)  # Eq. 15, same batch before/after
            lam = Z.update_lambda(lam, gt, args.beta)  # λ ← max(0, λ - β g̃)
            rec.update(L_pr_after=L_pr_after, g_tilde=gt)
            if fresh:
                rec.update(L_pr_before_measured=L_pr_before)
        step += 1
        log.write(json.dumps(rec) + "\n")
        bar.set_postfix(L_er=f"{L_er.item():.4f}", L_attn=f"{L_attn.item():.3f}", L_pr=f"{L_pr.item():.2e}",
                        lam=f"{lam:.3f}")
        bar.update()
        if step % args.checkpoint_every == 0 or step == args.steps:
            log.flush()
            M.save_training_state(ckpt, {"lora": dit}, {"opt": opt}, {"step": step, "lambda": lam},
                                  only=lambda k: "lora_" in k)
    bar.close()
    log.close()
    meta = {"concept": args.concept, "category": args.category, "aliases": aliases, "eps": eps, "eta": args.eta,
            "lr": args.lr, "beta": args.beta, "steps": args.steps, "mode": args.mode, "losses": sorted(losses),
            "fixed_lambda": args.fixed_lambda, "seed": args.seed, "pool": args.pool, "pr_batch": args.pr_batch,
            "gtilde_batch": args.gtilde_batch, "dtype": str(zi.dtype).removeprefix("torch."),
            "gradient_checkpointing": args.gradient_checkpointing,
            "train_seconds": round(time.time() - t_start, 1)}
    Z.save_lora(out, dit, spec, base=Z.base_fingerprint(dit), settings=meta)
    print(f"wrote {out} ({sum(p.numel() for p in params):,} parameters; log {log_path})")
    return out


if __name__ == "__main__":
    main()
