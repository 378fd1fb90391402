"""
The naive baseline of §3 (Fig. 3 right, Fig. 15): ESD's erase loss (Eq. 5) trained into the shared
to_q / to_k / to_v weights themselves, with no LoRA and no gate. In a single-stream DiT those weights project
text and image tokens alike, so the change reaches every image token; the paper shows the model collapses.

    python finetune.py --concept "Van Gogh" --out out/vg-full.safetensors --lr 1e-4
    python finetune.py --concept "Van Gogh" --layers 0,1,2 --out out/vg-first.safetensors

The flags are train.py's (the same D_er, pools, η, --layers, --targets, optimiser); the loss is L_erase alone
(--losses erase, the default here; erase,attn also works). The output holds the fine-tuned tensors under
their checkpoint keys, in the model's dtype, with the base model's fingerprint; apply it with
`apply_finetune`. θ_0 is kept as a copy of the targeted weights only, and Eq. 5's frozen reference
v_θ0(x_t, c) is computed with that copy swapped in, so the target does not drift with the weights.
No --resume: a run takes minutes on the tiny model.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

import torch
from torch import Tensor, nn

import checkpoint as C
import lora_file
import train
import zerase as Z
from cli import OutputError, die, exclusive
from model import CheckpointError

FORMAT = "zerase-full-finetune"


def targeted(dit: nn.Module, spec: Z.LoRASpec) -> dict[str, nn.Parameter]:
    """The weights a full fine-tune changes: `spec.targets` of the unified layers `spec.layers` (biases
    stay), keyed as in the checkpoint."""
    return {f"layers.{i}.attention.{t}.weight": getattr(dit.layers[i].attention, t).weight
            for i in spec.layers for t in spec.targets}


class FullWeights:
    """`adapt` for train.prepare: makes the targeted weights trainable (everything else frozen) and keeps
    θ_0, a copy of just those weights."""

    def __init__(self):
        self.params: dict[str, nn.Parameter] = {}
        self.theta0: dict[str, Tensor] = {}

    def __call__(self, dit: nn.Module, spec: Z.LoRASpec, seed: int = 0) -> list[nn.Parameter]:
        dit.requires_grad_(False)
        self.params = targeted(dit, spec)
        for w in self.params.values():
            w.requires_grad_(True)
        self.theta0 = {k: w.detach().clone() for k, w in self.params.items()}
        return list(self.params.values())

    @contextmanager
    def original(self):
        """Inside this block the targeted weights are θ_0 (the frozen model), bit for bit."""
        now = {k: w.detach().clone() for k, w in self.params.items()}
        with torch.no_grad():
            for k, w in self.params.items():
                w.copy_(self.theta0[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, w in self.params.items():
                    w.copy_(now[k])


def save_finetune(path, dit: nn.Module, full: FullWeights, base: str, settings: dict) -> None:
    meta = {"format": FORMAT, "base_model": base, "concept": settings.get("concept", ""),
            "settings": json.dumps(settings, sort_keys=True)}
    C.write_safetensors(path, {k: w.detach() for k, w in full.params.items()}, meta)


def apply_finetune(dit: nn.Module, path) -> dict:
    """Load a full fine-tune's weights into `dit` (cast to its dtype); refuses another base model. Returns
    the file's metadata."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a full fine-tune written by finetune.py")
        if meta["base_model"] != (base := lora_file.base_fingerprint(dit)):
            raise CheckpointError(f"{path} was trained on base model {meta['base_model']}, not this one "
                                  f"({base}); apply it to the model it was trained on")
        with torch.no_grad():
            for k in f.keys():
                w = dit.get_parameter(k)
                w.copy_(f.get_tensor(k).to(w.dtype))
    return meta


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--losses" not in argv:
        argv += ["--losses", "erase"]  # ESD alone (Eq. 5): the baseline the paper fine-tunes
    args = train.parse_args(argv)
    if set(args.losses.split(",")) - {"erase", "attn"}:
        raise ValueError("--losses: a full fine-tune trains erase (and attn) only; L_pr's Lagrangian "
                         "(train.py) is a LoRA method")
    if args.resume:
        raise ValueError("--resume: finetune.py keeps no training checkpoint; run it again without --resume")
    return args


def run_finetune(args) -> tuple[train.Run, FullWeights]:
    full = FullWeights()
    run = train.prepare(args, adapt=full)
    run.frozen = full.original  # Eq. 5's v(x_t, c) from θ_0, not from the weights being trained
    base = lora_file.base_fingerprint(run.dit)
    t0 = time.time()
    from tqdm import tqdm
    for step in tqdm(range(args.steps), desc=f"fine-tuning to erase {run.meta['concept']!r}"):
        run.log.write(json.dumps(train.fixed_step(run, step)) + "\n")  # L_er (+ L_attn), no L_pr
    run.log.write(json.dumps({"finished": args.steps, "seconds": round(time.time() - t0, 1)}) + "\n")
    run.log.close()
    save_finetune(run.out, run.dit, full, base, {**run.meta, "full_finetune": True})
    n = sum(p.numel() for p in full.params.values())
    print(f"wrote {run.out} ({n:,} fine-tuned weights in {len(full.params)} tensors; log {run.log.name})")
    return run, full


def main(argv=None):
    try:
        args = parse_args(argv)
        with exclusive(train.check(args).out, "finetune.py"):
            return run_finetune(args)[0].out
    except KeyboardInterrupt:
        die("interrupted; no fine-tune was written", code=130)
    except train.NonFiniteLoss as e:
        die(f"the loss became NaN/inf at step {e.args[0]}; lower --lr or --eta; no fine-tune was written",
            code=3)
    except (CheckpointError, ValueError, OutputError) as e:
        die(str(e))


if __name__ == "__main__":
    main()
