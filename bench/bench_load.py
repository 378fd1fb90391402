"""
Memory-lean loading benchmark: write a synthetic sharded transformer checkpoint (>= 1 GB, the real
Z-Image layout: config.json + 3 safetensors shards + index), then load it in fresh processes and report
wall time and peak RSS / checkpoint size.

    python bench/bench_load.py                 # ~1.3 GB checkpoint in a temporary directory
    python bench/bench_load.py --dir /tmp/ck   # keep the checkpoint

Compared in the same run: zerase's loader (meta-device init, one tensor read at a time into its final
buffer) against the common naive path (build the module with random init on the CPU, then
safetensors.torch.load_file every shard and load_state_dict), which holds the weights twice.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402

# The real DiT's width and head layout, fewer layers: 6 blocks of ~52M parameters, ~1.26 GB in fp32.
CONFIG = {**M.ZIMAGE_TURBO["transformer"], "dim": 2048, "n_heads": 16, "n_kv_heads": 16, "n_layers": 4,
          "n_refiner_layers": 1}


def write_checkpoint(folder: Path, n_shards: int = 3) -> int:
    """Random fp32 weights in diffusers' sharded layout; returns the total tensor bytes."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    with torch.device("meta"):
        dit = M.ZImageTransformer(M.DiTConfig.from_dict(CONFIG))
        shapes = {k: v.shape for k, v in dit.state_dict().items()}
    total = sum(torch.Size(s).numel() * 4 for s in shapes.values())
    keys, shard, size, weight_map, i = sorted(shapes), {}, 0, {}, 0
    g = torch.Generator().manual_seed(0)
    for j, k in enumerate(keys):
        shard[k] = torch.randn(shapes[k], generator=g) * 0.02
        size += shard[k].numel() * 4
        if size >= total / n_shards or j == len(keys) - 1:
            i += 1
            name = f"diffusion_pytorch_model-{i:05d}-of-{n_shards:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({key: name for key in shard})
            shard, size = {}, 0
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


CHILD = r"""
import resource, sys, time, json
sys.path.insert(0, {root!r})
import torch, model as M, checkpoint as C
from pathlib import Path
folder, how, dtype = Path({folder!r}), {how!r}, getattr(torch, {dtype!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if how == "zerase":
    m = C.load_transformer(folder, dtype)
else:  # naive: random-init module on the CPU + load_file of each shard + load_state_dict
    from safetensors.torch import load_file
    m = M.ZImageTransformer(M.DiTConfig.from_json(folder / "config.json")).to(dtype)
    sd = {{}}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    m.load_state_dict(sd, strict=True)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": dt, "peak": peak, "base": base}}))
"""


def measure(folder: Path, how: str, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT), folder=str(folder), how=how, dtype=dtype)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / "transformer"
        t0 = time.perf_counter()
        size = write_checkpoint(folder)
        took = time.perf_counter() - t0
        print(f"checkpoint: {size / 2**30:.2f} GiB in 3 shards + index, written in {took:.1f} s")
        print(f"{'loader':<8} {'dtype':<9} {'load s':>7} {'peak RSS GiB':>13} {'peak/ckpt':>10} "
              f"{'(peak-base)/ckpt':>17}")
        for how, dtype in [("zerase", "float32"), ("zerase", "bfloat16"), ("naive", "float32")]:
            r = measure(folder, how, dtype)
            peak = r["peak"]
            print(f"{how:<8} {dtype:<9} {r['seconds']:>7.2f} {peak / 2**30:>13.2f} {peak / size:>10.2f} "
                  f"{(peak - r['base']) / size:>17.2f}")
        print("base = RSS of the interpreter with torch imported, before loading")


if __name__ == "__main__":
    main()
