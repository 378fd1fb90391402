"""
The token-gated LoRA linear (Eq. 4) against the plain frozen linear at the real Z-Image widths: forward +
backward of one to_q projection on one 1024² item (4,096 image rows + 128 caption rows, D = 3840), rank 4.
Both are timed in the same run, interleaved, and the ratio of the medians is printed.

    python bench/gated_linear.py                       # CPU, float32 (and bfloat16 where the CPU has it)
    python bench/gated_linear.py --device cuda --dtypes bfloat16 --reps 50

The backward of the frozen linear computes the input gradient only (the weight is frozen), as in training,
where the LoRA's upstream layers need it. The gated linear adds the low-rank branch on the caption rows:
its extra FLOPs are 2·n_text·r·(D_in + D_out) per pass, about 0.1% of the frozen matmul here.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zerase as Z  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each (after one warm-up)")
    p.add_argument("--image-rows", type=int, default=4096)
    p.add_argument("--text-rows", type=int, default=128)
    p.add_argument("--dim", type=int, default=3840)
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = args.image_rows + args.text_rows
    text_rows = torch.arange(args.image_rows, rows, device=device)  # image rows first, then the caption
    print(f"{rows} rows ({args.text_rows} caption), D = {args.dim}, rank {args.rank}, {device}, "
          f"{torch.get_num_threads()} threads")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        rng = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(args.dim, args.dim, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(args.dim, args.dim, generator=rng) / args.dim ** 0.5)
        lin = lin.to(device, dtype).requires_grad_(False)
        gated = Z.GatedLoRALinear.wrap(lin, args.rank, float(args.rank), rng=rng)
        with torch.no_grad():
            gated.lora_B.normal_(generator=rng)
        x = torch.randn(1, rows, args.dim, generator=rng).to(device, dtype).requires_grad_(True)
        g = torch.randn(1, rows, args.dim, generator=rng).to(device, dtype)

        def plain():
            F.linear(x, lin.weight).backward(g)

        def lora():
            gated(x, text_rows).backward(g)

        try:
            plain(), lora()  # warm-up
        except RuntimeError as e:
            print(f"{name}: not run on this device ({str(e).splitlines()[0]})")
            continue
        t_plain, t_lora = [], []
        for _ in range(args.reps):  # interleaved, so drifting load affects both alike
            t_plain.append(timed(plain, device))
            t_lora.append(timed(lora, device))
        a, b = statistics.median(t_plain), statistics.median(t_lora)
        print(f"{name:<9} frozen linear {a * 1e3:8.2f} ms   gated LoRA linear {b * 1e3:8.2f} ms   "
              f"ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
