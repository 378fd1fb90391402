"""
What erasing from the real Z-Image-Turbo costs: train.py's own setup and training step on the DiT (and the
text-encoder layers it needs) built at the real configuration with random weights, at a chosen depth.

    python bench/real_scale.py                                   # CPU: depth 1 and 2, 128², bf16, ± ckpt
    python bench/real_scale.py --device cuda --depths 2,4 --resolutions 512,1024 --dtypes bfloat16,float32
    python bench/real_scale.py --memory-only                     # the activation model below, no timing

Each configuration runs in its own process (so its peak memory is its own) and calls train.prepare and
train.implicit_step exactly as `train.py` runs them: encoding, trajectory pools and frozen references
(one-off), then a step = frozen references, the forward with the attention probe, backward, the g̃
measurement. Printed per configuration: the one-off stages, seconds per step (median of --steps after one
warm-up) and peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the process). From two
depths: the cost per unified layer and the figures extrapolated to the real 30 layers (the text encoder's
stage likewise to its 35 used layers). Pools are built with 2-state trajectories and --pool 1 plus one
preservation prompt, and scaled to train.py's defaults (8 states, 32 + 32 trajectories): their cost is
linear in both.

Activation memory (--memory-only, or always as the last table): one training forward of train.py at the
full depth and the real widths is run on the meta device (shapes only, no compute), counting the bytes
autograd saves for backward, with and without gradient checkpointing; with weights, pools and one layer's
recomputation this gives the peak that a GPU run needs, wherever this script runs.
"""
import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as C  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import zerase as Z  # noqa: E402

TOKENIZER = ROOT / "weights" / "zimage-tiny" / "tokenizer" / "tokenizer.json"
FULL_LAYERS, FULL_TE_LAYERS = M.ZIMAGE_TURBO["transformer"]["n_layers"], 35  # hidden_states[-2]: 35 of 36
POOL_STEPS, DEFAULT_TRAJECTORIES = 2, 32 + 32  # bench pools vs train.py's defaults (--pool 32, 8 prompts)


def build(depth: int, te_layers: int, device, dtype) -> C.ZImage:
    """A ZImage at the real configuration, `depth` unified layers, random weights, the tiny tokenizer."""
    raw = {k: v for k, v in M.ZIMAGE_TURBO["transformer"].items() if not k.startswith("_")}
    tok = M.Tokenizer(TOKENIZER)
    te_raw = {**M.ZIMAGE_TURBO["text_encoder"], "num_hidden_layers": te_layers + 1,
              "vocab_size": tok.tok.get_vocab_size()}
    with torch.device("meta"):
        dit = M.ZImageTransformer(M.DiTConfig.from_dict({**raw, "n_layers": depth}))
        te = M.Qwen3TextEncoder(M.TextEncoderConfig.from_dict(te_raw))
    rng = torch.Generator(device=device).manual_seed(0)
    for m in (dit, te):
        m.to_empty(device=device)
        with torch.no_grad():
            for p in m.parameters():
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=rng, device=device) / math.sqrt(fan_in) if p.ndim > 1
                        else 1.0 + 0.1 * torch.randn(p.shape, generator=rng, device=device))
        m.to(dtype).eval().requires_grad_(False)
    vae_cfg = M.VAEConfig.from_dict({k: v for k, v in M.ZIMAGE_TURBO["vae"].items() if not k.startswith("_")})
    sched = M.SchedulerConfig.from_dict(M.ZIMAGE_TURBO["scheduler"])
    return C.ZImage(Path("random"), dit, te, tok, None, vae_cfg, sched, {"steps": POOL_STEPS})


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_config(cfg: dict) -> dict:
    """Run in a child process: build, prepare, time the steps. Returns the figures as a dict."""
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    t0 = time.perf_counter()
    zi = build(cfg["depth"], cfg["te_layers"], device, dtype)
    build_s = time.perf_counter() - t0
    argv = ["--concept", "Van Gogh", "--category", "style", "--resolution", str(cfg["resolution"]),
            "--steps", str(cfg["steps"] + 1), "--pool", "1", "--variants", "4", "--preserve", "a red car",
            "--device", cfg["device"], "--dtype", cfg["dtype"], "--out", cfg["out"]]
    run = train.prepare(train.parse_args(argv + (["--gradient-checkpointing"] if cfg["ckpt"] else [])), zi)
    run.log.close()
    train.implicit_step(run, 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(1, cfg["steps"] + 1):
        sync(device)
        t0 = time.perf_counter()
        train.implicit_step(run, step)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {**cfg, "build_s": build_s, **{f"{k}_s": v for k, v in run.timings.items()},
            "step_s": statistics.median(times), "peak_gib": peak_bytes(device) / 2**30}


class _FlashAttention(torch.autograd.Function):
    """Shape stand-in for the fused attention a GPU runs (flash / memory-efficient SDPA): it saves q, k, v,
    the output and a (B, H, S) fp32 log-sum-exp for backward, never the (B, H, S, S) map (which the meta
    device's math fallback would save)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def saved_activation_bytes(resolution: int, depth: int, checkpointing: bool, dtype=torch.bfloat16,
                           K: int = 2, caption: int = 32) -> int:
    """Bytes autograd saves in one training forward of train.losses (1 + 2K items at `resolution`), run on
    the meta device with GPU-style fused attention; parameters (saved by reference) are not counted, and a
    tensor saved by several operations counts once."""
    raw = {k: v for k, v in M.ZIMAGE_TURBO["transformer"].items() if not k.startswith("_")}
    with torch.device("meta"):
        dit = M.ZImageTransformer(M.DiTConfig.from_dict({**raw, "n_layers": depth})).to(dtype)
        dit.requires_grad_(False)
        spec = Z.LoRASpec(layers=tuple(range(depth)))
        Z.add_lora(dit, spec)
    dit.gradient_checkpointing = checkpointing
    h = w = resolution // 8  # latent cells (the VAE's factor 8)
    e = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    cap = e(caption, raw["cap_feat_dim"], dt=dtype)
    er = train.EraseSample(e(1, 16, h, w), e(1), e(16, h, w), cap, list(range(5)), e(16, h, w))
    pr = train.PreserveBatch(e(K, 16, h, w), e(K), [cap] * K, e(K, 16, h, w), e(K, 16, h, w))
    run = SimpleNamespace(dit=dit, c_null=cap[:8], spec=spec, terms={"erase", "attn", "pr"}, eta=train.ETA)
    params, seen, total = {id(p) for p in dit.parameters()}, set(), [0]

    def pack(t):
        key = id(t._base if t._base is not None else t)
        if key not in params and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, attn_mask=None: _FlashAttention.apply(
        q, k, v, attn_mask)
    try:
        from contextlib import ExitStack
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ExitStack() as probed:
            train.losses(run, er, pr, probed)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return total[0]


def memory_table(resolutions: list[int]) -> list[str]:
    """Weights + pools + saved activations + one layer's recomputation, bf16, at the full depth."""
    lines = ["| resolution | DiT bf16 weights | pools (bf16) | saved activations, no ckpt | with ckpt | "
             "+ one layer recomputed | peak estimate with ckpt |", "|---|---|---|---|---|---|---|"]
    gib = 2**30
    weights = 6_154_908_736 * 2
    for r in resolutions:
        full_no = saved_activation_bytes(r, FULL_LAYERS, False)
        ck = saved_activation_bytes(r, FULL_LAYERS, True)
        one = saved_activation_bytes(r, 2, False) - saved_activation_bytes(r, 1, False)  # a layer's internals
        states = DEFAULT_TRAJECTORIES * 8 * 16 * (r // 8) ** 2 * 2  # x and one or two references per state
        pools = states * 5 // 2  # x_t, v(x_t,∅); x_pr, v(x_pr,∅), v(x_pr,c_pr): 5 tensors over 2 pools
        peak = weights + pools + ck + one
        lines.append(f"| {r}² | {weights / gib:.1f} GiB | {pools / gib:.2f} GiB | {full_no / gib:.1f} GiB | "
                     f"{ck / gib:.2f} GiB | {one / gib:.2f} GiB | **{peak / gib:.1f} GiB** |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depths", default="1,2", help="two or more unified-layer counts (the slope needs two)")
    p.add_argument("--te-layers", type=int, default=2, help="text-encoder layers built (of 35 used)")
    p.add_argument("--resolutions", default="128")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after a warm-up)")
    p.add_argument("--memory-resolutions", default="512,1024")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_config(json.loads(args.child))))
        return
    rows = []
    if not args.memory_only:
        for r in map(int, args.resolutions.split(",")):
            for dt in args.dtypes.split(","):
                for ck in args.checkpointing.split(","):
                    for d in map(int, args.depths.split(",")):
                        lora = f"/tmp/real_scale/{d}-{r}-{dt}-{ck}.safetensors"
                        cfg = dict(device=args.device, dtype=dt, resolution=r, ckpt=ck == "on", depth=d,
                                   te_layers=args.te_layers, steps=args.steps, out=lora)
                        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], cwd=ROOT,
                                             capture_output=True, text=True)
                        if out.returncode:
                            print(f"{cfg}: failed\n{out.stderr[-2000:]}", flush=True)
                            continue
                        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                        print(json.dumps(rows[-1]), flush=True)
        print("\n".join(step_table(rows)))
    print("\nActivation memory at the full depth (meta device, bf16, training batch of 1 + 2·2 items):")
    mem = memory_table(list(map(int, args.memory_resolutions.split(","))))
    print("\n".join(mem))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "memory": mem}, indent=2))


def step_table(rows: list[dict]) -> list[str]:
    """Per (resolution, dtype, checkpointing): measured depths, the per-layer slope, the 30-layer figures."""
    lines = ["| res | dtype | ckpt | depths measured | s/step | per layer | **30 layers s/step** | "
             "peak GiB (measured) | per layer | **30 layers peak** | pools per trajectory s | "
             "**pools, defaults** | encode per TE layer s |", "|" + "---|" * 13]
    groups = {}
    for r in rows:
        groups.setdefault((r["resolution"], r["dtype"], r["ckpt"]), []).append(r)
    for (res, dt, ck), g in groups.items():
        g = sorted(g, key=lambda r: r["depth"])
        if len(g) < 2:
            continue
        a, b = g[0], g[-1]
        dd = b["depth"] - a["depth"]
        slope, mslope = (b["step_s"] - a["step_s"]) / dd, (b["peak_gib"] - a["peak_gib"]) / dd
        full = a["step_s"] + slope * (FULL_LAYERS - a["depth"])
        mfull = a["peak_gib"] + mslope * (FULL_LAYERS - a["depth"])
        pool_slope = (b["pools_s"] - a["pools_s"]) / dd
        pools_full = (a["pools_s"] + pool_slope * (FULL_LAYERS - a["depth"])) / 2 * 8 / POOL_STEPS
        lines.append(f"| {res}² | {dt} | {'on' if ck else 'off'} | {a['depth']}, {b['depth']} | "
                     f"{a['step_s']:.2f}, {b['step_s']:.2f} | {slope:.2f} | **{full:.1f}** | "
                     f"{a['peak_gib']:.2f}, {b['peak_gib']:.2f} | {mslope:.2f} | **{mfull:.1f}** | "
                     f"{pools_full:.1f} | **{pools_full * DEFAULT_TRAJECTORIES / 60:.1f} min** | "
                     f"{a['encode_s'] / a['te_layers']:.3f} |")
    return lines


if __name__ == "__main__":
    main()
