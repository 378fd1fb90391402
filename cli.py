"""
Command-line plumbing shared by train.py, sample.py and evaluate.py: one-sentence errors, devices and dtypes
from flags, and writes that never leave a partial file.
"""
import argparse
import difflib
import math
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


class OutputError(OSError):
    """An output file could not be written; the message names the user's path, not a temporary file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """Call write(tmp_path), then rename onto `path`, so an interrupted run never leaves a partial file. The
    file gets the user's umask (some writers create 0600 files), and a failure names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"could not write {path} ({e.strerror or e}); choose a writable place with room "
                          f"for it.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output(path, flag: str, suffixes: tuple[str, ...], extra_names: tuple[str, ...] = ()) -> Path:
    """Check an output path before any work: its suffix, that its folder exists or can be made and is
    writable, and that its name (and the names derived from it, e.g. `.ckpt.safetensors`) fit the file
    system. Raises ValueError naming the flag and the fix."""
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise ValueError(f"{flag} {str(path)!r} must end with {' or '.join(suffixes)}; that is the format "
                         f"written.")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except OSError as e:
        why = f"{folder} is a file" if folder.is_file() else e.strerror
        raise ValueError(f"{flag} {str(path)!r}: its folder cannot be created ({why}); choose another "
                         f"place.") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r}: the folder {str(folder)!r} is not writable; choose another "
                         f"place.")
    longest = max([path.name, f".{path.name}.tmp{os.getpid()}", *extra_names], key=lambda n: len(n.encode()))
    if len(longest.encode()) > limit:
        raise ValueError(f"{flag}: the file name {path.name!r} is too long for this file system ({limit} "
                         f"bytes with the names derived from it); choose a shorter name.")
    _probe(folder, path, flag)
    return path


def _probe(folder: Path, path: Path, flag: str) -> None:
    """Create and remove the temporary file atomic_write will use: os.access answers yes for root, and on
    read-only mounts or special folders (/proc), where only trying tells."""
    probe = folder / f".{path.name}.tmp{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except FileExistsError:
        pass  # this process is writing it right now: the folder is writable
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r}: a file cannot be created in {str(folder)!r} "
                         f"({e.strerror}); choose a writable place.") from None


def number(flag: str, value: float, *, low: float | None = None, strict: bool = False) -> float:
    """A finite number >= low (> low if strict); else ValueError naming the flag."""
    if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{flag} must be a finite number{bound} (got {value!r}).")
    return value


def text(flag: str, value: str) -> str:
    """A prompt or name from the command line: valid UTF-8 (the shell may pass undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{flag} is not valid UTF-8 text; pass it in UTF-8.") from None
    return value


def check_folder(path, flag: str) -> Path:
    """A folder a command will write into: created if missing, and a file can be created in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r} cannot be created ({e.strerror}); choose another place.") \
            from None
    _probe(path, path / "probe", flag)
    return path


def lookup(flag: str, value: str, known, what: str) -> str:
    """`value` as `known` spells it (any case, blanks around it ignored); else a ValueError naming the flag
    with the nearest names (did you mean), or all of them when none is near."""
    value = value.strip()
    if match := next((k for k in known if k.lower() == value.lower()), None):
        return match
    near = difflib.get_close_matches(value.lower(), [k.lower() for k in known], n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(repr(k) for k in known if k.lower() in near)}?" if near else
            f"it is one of {', '.join(known)}.")
    raise ValueError(f"{flag} {value!r}: {what}; {hint}")


@contextmanager
def exclusive(path: Path, what: str):
    """Hold `<path>.lock` while a run writes `path`, so two runs cannot write the same file; a lock left by a
    process that no longer exists is taken over."""
    lock = path.with_name(path.name + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = int(lock.read_text().strip() or 0) if lock.exists() else 0
            if pid and _alive(pid):
                raise ValueError(f"another {what} (process {pid}) is writing {path}; wait for it or choose "
                                 f"another output.") from None
            lock.unlink(missing_ok=True)  # stale: its process has gone
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        # `is` tests: a default of 0 (== False) is shown; store_true flags (False), unset ones (None) and
        # empty repeatable lists are not
        if default is None or default is False or default is argparse.SUPPRESS or default == [] \
                or "%(default)" in text or action.option_strings == ["-h", "--help"]:
            return text
        return text + (" (default: empty)" if default == "" else " (default: %(default)s)")


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype: unknown dtype {name!r}; use one of float32, bfloat16, float16.")
    return table[name]


def parse_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} was asked for but CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r} was asked for but MPS is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: unsupported device {name!r}; use cpu, cuda, cuda:N or mps.")
    return dev


@contextmanager
def stage(what: str, timings: dict | None = None, key: str | None = None):
    """Report a slow setup stage as it starts and ends ("encoding 66 prompts ... 0.4 s") on stderr, and
    keep its time in timings[key]. CUDA work is waited for, so the time is the stage's own."""
    print(f"{what} ...", file=sys.stderr, end="", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:  # Ctrl-C or an error: end the line, so the message that follows starts its own
        print(file=sys.stderr, flush=True)
        raise
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f" {seconds:.1f} s", file=sys.stderr, flush=True)
    if timings is not None:
        timings[key or what] = seconds
