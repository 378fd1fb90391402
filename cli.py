"""
Command-line plumbing shared by train.py, sample.py and evaluate.py: one-sentence errors, devices and dtypes
from flags, and writes that never leave a partial file.
"""
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def die(msg: str, code: int = 2):
    """End a command-line program on a user error: one sentence on stderr, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def atomic_write(path, write) -> None:
    """Call write(tmp_path), then rename onto `path`, so an interrupted run never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16.")
    return table[name]


def parse_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps.")
    return dev


@contextmanager
def stage(what: str, timings: dict | None = None, key: str | None = None):
    """Report a slow setup stage as it starts and ends ("encoding 66 prompts ... 0.4 s") on stderr, and
    keep its time in timings[key]. CUDA work is waited for, so the time is the stage's own."""
    print(f"{what} ...", file=sys.stderr, end="", flush=True)
    t0 = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f" {seconds:.1f} s", file=sys.stderr, flush=True)
    if timings is not None:
        timings[key or what] = seconds
