"""Shared fixtures: small random Z-Image checkpoints in the real layout (see tests/checkpoints.py).

Each is built once per test session (< 1 s) under pytest's temporary directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_random_checkpoint


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """Random checkpoint, seed 0, everything stored fp32 (text encoder config in transformers-5 form)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("random_ckpt") / "Z-Image-Turbo", seed=0)


@pytest.fixture(scope="session")
def random_ckpt_bf16_te(tmp_path_factory):
    """Same weights as random_ckpt (seed 0), but the text encoder is stored as the real repo stores it:
    bf16 tensors and a config.json with top-level rope_theta."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("random_ckpt_bf16_te") / "Z-Image-Turbo",
        seed=0,
        te_dtype=torch.bfloat16,
        te_rope_at_top_level=True,
    )


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every model in the tests is tiny: one torch thread is faster than two, and far faster when the
    other core is busy (two threads then spin-wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def probe(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process: a CPU without bf16 instructions can kill torch with SIGILL,
    which must end the probe, not pytest."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def outputs_under_hash_seeds(code: str, seeds=("1", "2", "3")) -> set[str]:
    """What `code` prints in a fresh Python process (repository root on the path) under each string-hash seed
    PYTHONHASHSEED: one element when its output does not depend on the seed."""
    root = Path(__file__).resolve().parents[1]
    return {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h, "PYTHONPATH": str(root)}).stdout
            for h in seeds}


@pytest.fixture(scope="session")
def bf16_cpu():
    """Skip unless this CPU runs bfloat16 matmuls and attention. On CPUs without bf16 instructions torch
    can die with SIGILL, which would end pytest itself, so the probe runs in a subprocess."""
    code = ("import torch; import torch.nn.functional as F; "
            "a = torch.randn(2, 2, 64, 64, dtype=torch.bfloat16); "
            "F.linear(a, a[0, 0]).sum().item(); F.scaled_dot_product_attention(a, a, a).sum().item()")
    r = probe(code)
    if r.returncode != 0:
        pytest.skip(f"this CPU cannot run bfloat16 matmuls (the probe process exited with {r.returncode}); "
                    f"the bf16 paths are tested where it can")


BF16_SLOWDOWN_LIMIT = 10.0  # native bf16 runs a matmul at about fp32's speed or faster; a fallback, ~100x


@pytest.fixture(scope="session")
def bf16_native_cpu(bf16_cpu):
    """Skip unless this CPU's bf16 matmuls run at a usable speed. Without bf16 instructions (e.g. AVX2 only)
    torch falls back to a slow kernel for some layouts: grad @ W, the backward of every linear, ran ~100x
    slower than fp32, and the two real-width bf16 training cases took over 10 minutes each instead of
    seconds. Timed in a subprocess (one thread, as the tests run), the layout backward uses."""
    code = ("import time, torch; torch.set_num_threads(1)\n"
            "def t(dt):\n"
            "    g, w = torch.randn(48, 4096, dtype=dt), torch.randn(4096, 2048, dtype=dt); g @ w\n"
            "    s = time.perf_counter(); g @ w; return time.perf_counter() - s\n"
            "print(t(torch.bfloat16) / t(torch.float32))")
    r = probe(code)
    slowdown = float(r.stdout.strip()) if r.returncode == 0 else float("inf")
    if slowdown > BF16_SLOWDOWN_LIMIT:
        pytest.skip(f"this CPU runs bfloat16 matmuls through a slow fallback ({slowdown:.0f}x fp32's time, "
                    f"over {BF16_SLOWDOWN_LIMIT:g}x): real-width bf16 training would take many minutes; it "
                    f"runs where bf16 is native")
