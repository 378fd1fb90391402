"""
Erase a list of concepts, one process per device, on PyTorch's own launcher (torch.distributed.run).

    torchrun --nproc-per-node 4 erase_many.py --concepts "Van Gogh,Monet,star,red" --out loras/
    torchrun --nproc-per-node 2 erase_many.py --concepts "Van Gogh,star" --out loras/ \\
        --merge loras/merged.safetensors -- --steps 500 --mode exact
    python erase_many.py --concepts "Van Gogh,star" --out loras/          # no launcher: world size 1

Rank r of N takes concepts r, r + N, ... and trains each one with train.main on its own copy of the model
(--device cuda:<local rank> where CUDA is available, else the CPU with cpu_count // local processes torch
threads). Every flag after `--` goes to train.py unchanged; erase_many sets --concept, --model, --out,
--device and --resume itself. Each concept gets <out>/<concept, lower case, spaces to hyphens>.safetensors,
train.py's own default name, with its log <name>.jsonl and training checkpoint <name>.ckpt.safetensors.

Every input is checked before any process trains (the concept list, --out, --merge, the flags after `--`,
and train.py's own checks of each concept to train against the model's configs); on bad input rank 0 ends
with one `error:` line, exit status 2 (torchrun itself then exits 1 and lists the failed workers).

Resuming is per concept: a concept whose LoRA file exists is skipped; one with a training checkpoint and no
LoRA file continues from it (train.py --resume); the others start afresh. A concept that fails does not
stop the others on its rank; the rank reports it at the end and exits non-zero.

--merge FILE: once every rank is done (a torch.distributed barrier: gloo on the CPU, nccl on GPUs), rank 0
writes one LoRA file, the Eq. 63 average of all the concepts' LoRAs (w_i = 1/N) as zerase.merge_loras
builds it: one LoRA of rank Σ r_i and scale 1 whose B factors carry w_i s_i. Applying it
(lora_file.apply_loras, sample.py --lora) gives exactly the model that applying the N files averaged gives.
Its metadata is the components' shared fields (format, gate, layers, targets, base model), rank Σ r_i, scale
1, concept "A, B, ...", a "concepts" list, and in "settings" the weights and, per component, its file name,
SHA-256, concept, rank, scale and training settings.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

import checkpoint as C
import lora_file
import train
import zerase as Z
from cli import OutputError, die
from sample import DEFAULT_MODEL

RESERVED = "--concept, --model, --out, --device and --resume"  # set per concept by erase_many itself
UNSET = "\0unset"  # placeholder values that tell whether a flag after `--` set a reserved option


@dataclass
class World:
    """This process's place among the launcher's processes (torchrun's environment; alone: 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1


def world_from_env() -> World:
    """The rank, world size, local rank and local world size torchrun sets; world size 1 without it."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    return World(int(env.get("RANK", 0)), size, int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", size)))


@dataclass
class Plan:
    """What every rank agrees on before anything trains: the concepts, their files, the training flags."""
    concepts: list[str]
    files: list[Path]  # one LoRA file per concept, in the order of --concepts
    model: str
    train_flags: list[str]
    merge: Path | None
    timeout: timedelta


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """erase_many's own flags (before `--`) and the train.py flags (after it)."""
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="torchrun --nproc-per-node N erase_many.py --concepts A,B,... "
                                      "--out DIR [--merge FILE] [-- train.py flags]")
    p.add_argument("--concepts", required=True, help="comma-separated concepts, as written in prompts")
    p.add_argument("--out", required=True, help="folder for the LoRA files, logs and training checkpoints")
    p.add_argument("--merge", help="also write the Eq. 63 average of all the LoRAs (w_i = 1/N) to this file")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Z-Image checkpoint folder, as train.py's")
    p.add_argument("--timeout-hours", type=float, default=72.0, help="how long ranks that finish first wait "
                   "at the barrier for the others (the process group's timeout)")
    return p.parse_args(own), flags


def lora_name(concept: str) -> str:
    """train.py's default file name for a concept: lower case, spaces to hyphens, .safetensors."""
    return f"{concept.lower().replace(' ', '-')}.safetensors"


def check_concepts(text: str) -> list[str]:
    """The --concepts list, stripped; raises ValueError on an empty list or name, a name that is not a plain
    file name, or two concepts that would share a LoRA file."""
    concepts = [c.strip() for c in text.split(",")]
    if not any(concepts):
        raise ValueError("--concepts is empty; pass the concepts to erase, e.g. "
                         "--concepts \"Van Gogh,star\".")
    if "" in concepts:
        raise ValueError(f"--concepts {text!r} has an empty name (two commas in a row, or a comma at an "
                         f"end); remove it.")
    if bad := [c for c in concepts if "/" in c or "\\" in c or c.startswith(".")]:
        raise ValueError(f"concept {bad[0]!r} cannot name a file in --out (a slash or a leading dot); write "
                         f"it as it appears in prompts.")
    seen = {}
    for c in concepts:
        if (name := lora_name(c)) in seen:
            raise ValueError(f"--concepts names {seen[name]!r} and {c!r}, which are the same concept (both "
                             f"would write {name}); list each concept once.")
        seen[name] = c
    return concepts


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and write (then delete) a probe file in it; raises ValueError if it fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".erase_many.probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {folder} is not a writable folder ({e.strerror or e}); pass a folder this "
                         f"user can write into.") from None


def check_train_flags(flags: list[str]) -> None:
    """Parse the flags after `--` as train.py does; raises ValueError for an invalid flag or one that
    erase_many sets per concept."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = train.parse_args(["--concept", UNSET, "--model", UNSET, "--device", UNSET, *flags])
    except SystemExit as e:
        if e.code:  # argparse's own message, without its usage lines
            msg = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            raise ValueError(f"the train.py flags after `--` are invalid: {msg}; see python train.py -h.") \
                from None
        raise  # -- --help: train.py's help was printed
    if (args.concept, args.model, args.device) != (UNSET,) * 3 or args.out is not None or args.resume \
            or args.list_concepts:
        raise ValueError(f"erase_many sets {RESERVED} for each concept; remove them (and --list-concepts) "
                         f"after `--` (--model and --out go before it).")


def train_argv(p: Plan, concept: str, file: Path, device: str) -> list[str]:
    """train.py's command line for one concept: the flags after `--`, then the ones erase_many sets."""
    resume = ["--resume"] if checkpoint_of(file).exists() else []  # an interrupted run continues
    return [*p.train_flags, "--concept", concept, "--model", p.model, "--out", str(file), "--device", device,
            *resume]


def checkpoint_of(file: Path) -> Path:
    """train.py's training checkpoint next to a LoRA file."""
    return file.with_suffix(".ckpt.safetensors")


def check_runs(p: Plan, device: str) -> None:
    """train.check (every flag against the model's configs, no weights loaded) for each concept still to
    train, as it will be trained; raises ValueError naming the concept."""
    cfgs = C.read_configs(p.model)  # CheckpointError (a ValueError) if --model is not a Z-Image folder
    for concept, file in zip(p.concepts, p.files):
        if file.exists():
            continue  # skipped
        try:
            train.check(train.parse_args(train_argv(p, concept, file, device)), cfgs)
        except (ValueError, OutputError) as e:
            again = f" (erase_many resumes from {checkpoint_of(file)}: delete it to start afresh)" \
                if checkpoint_of(file).exists() else ""
            raise ValueError(f"concept {concept!r}: {e}{again}") from None


def device_for(w: World) -> str:
    """cuda:<local rank> where CUDA is available, else cpu; raises ValueError if a node runs more processes
    than it has GPUs."""
    if not torch.cuda.is_available():
        return "cpu"
    if w.local_size > torch.cuda.device_count():
        raise ValueError(f"{w.local_size} processes per node but {torch.cuda.device_count()} GPU(s); use "
                         f"--nproc-per-node {torch.cuda.device_count()} (one process per device).")
    return f"cuda:{w.local_rank}"


def plan(argv: list[str], w: World) -> tuple[Plan, str]:
    """Check every input before anything trains and return the plan and this rank's device; on bad input,
    rank 0 ends with one `error:` line (exit 2) and the other ranks, which found the same, end quietly."""
    opts, flags = parse_args(argv)
    try:
        concepts = check_concepts(opts.concepts)
        check_train_flags(flags)
        out = Path(opts.out)
        check_writable(out, "--out")
        files = [out / lora_name(c) for c in concepts]
        merge = Path(opts.merge) if opts.merge else None
        if merge is not None:
            if merge.resolve() in {f.resolve() for f in files}:
                raise ValueError(f"--merge {merge} is one of the concepts' own LoRA files; name another "
                                 f"file.")
            check_writable(merge.parent, "the folder of --merge")
        if not opts.timeout_hours > 0:
            raise ValueError(f"--timeout-hours must be > 0 (got {opts.timeout_hours}).")
        device = device_for(w)
        p = Plan(concepts, files, opts.model, flags, merge, timedelta(hours=opts.timeout_hours))
        check_runs(p, device)
    except ValueError as e:
        if w.rank != 0:
            time.sleep(10)  # rank 0 prints the line; the launcher stops this rank when rank 0 exits
            raise SystemExit(2)
        die(str(e))
    return p, device


def erase_one(concept: str, file: Path, p: Plan, device: str, w: World) -> int:
    """Train one concept with train.main unless its LoRA file exists (resuming from its training checkpoint
    if there is one); returns 0, or the exit status of a run that failed."""
    tag = f"[rank {w.rank}/{w.size}]"
    if file.exists():
        print(f"{tag} skip {concept!r}: {file} exists", flush=True)
        return 0
    argv = train_argv(p, concept, file, device)
    where = f"cpu, {torch.get_num_threads()} torch threads" if device == "cpu" else device
    print(f"{tag} {'resume' if '--resume' in argv else 'train'} {concept!r} -> {file} ({where})", flush=True)
    try:
        train.main(argv)
        return 0
    except SystemExit as e:  # train.py's one-line error is already on stderr
        return e.code if isinstance(e.code, int) and e.code else 1
    except Exception:  # a bug or an out-of-memory error: report it, go on with this rank's other concepts
        traceback.print_exc()
        return 1
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SHARED = ("format", "format_version", "gate", "gate_rows", "layers", "targets", "base_model", "base_config")


def raw_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's metadata as stored (strings), after lora_file.read_lora has validated it."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def merged_metadata(files: list[Path], read: list[tuple[dict, dict]], w: list[float]) -> dict[str, str]:
    """Metadata of the Eq. 63 average of `files`: their shared fields, rank Σ r_i, scale 1 (the B factors
    carry w_i s_i), the concepts, and per component its file, SHA-256, concept, rank, scale and settings.
    Raises LoRAFileError if the files differ in a shared field (what lora_file.apply_loras refuses too)."""
    raws = [raw_metadata(f) for f in files]
    for f, raw in zip(files, raws):
        if differ := [k for k in SHARED if raw.get(k) != raws[0].get(k)]:
            raise lora_file.LoRAFileError(
                f"{f} differs from {files[0]} in {', '.join(differ)}; merge only LoRAs of one base model "
                f"trained with the same --layers/--targets/gate (delete {f} and rerun to train it again).")
    components = [{"file": f.name, "sha256": sha256(f), "concept": m["concept"], "rank": m["rank"],
                   "scale": m["scale"], "weight": wi, "settings": json.loads(raw.get("settings", "{}"))}
                  for f, (_, m), raw, wi in zip(files, read, raws, w)]
    concepts = [m["concept"] for _, m in read]
    settings = {"merge": "Eq. 63 average: one LoRA of rank sum(r_i), scale 1, B_i pre-multiplied by w_i s_i",
                "weights": w, "components": components}
    rank = sum(c["rank"] for c in components)
    return {**{k: raws[0][k] for k in SHARED if k in raws[0]}, "rank": str(rank), "scale": repr(1.0),
            "concept": ", ".join(concepts), "concepts": json.dumps(concepts),
            "settings": json.dumps(settings, sort_keys=True)}


def write_merged(files: list[Path], dest: Path) -> None:
    """Write the Eq. 63 average (w_i = 1/N) of the LoRA files as one file in the same format: the factors
    zerase.merge_loras builds from them, which is what lora_file.apply_loras(dit, files) applies."""
    read = [lora_file.read_lora(f) for f in files]
    w = [1.0 / len(files)] * len(files)
    meta = merged_metadata(files, read, w)
    merged = Z.merge_loras([factors for factors, _ in read], [m["scale"] for _, m in read], w)
    tensors = {}
    for k, v in merged.items():  # '<module>.lora_A' -> 'zerase_gated.<module>.A', as lora_file.save_lora
        module, which = k.rsplit(".", 1)
        tensors[f"{lora_file.KEY_PREFIX}{module}.{which.removeprefix('lora_')}"] = v.contiguous()
    C.write_safetensors(dest, tensors, meta)  # as lora_file.save_lora writes its files


RERUN = ("fix the errors above and rerun the same command (finished concepts are skipped, interrupted ones "
         "resume)")


def merge_on_rank0(p: Plan, w: World) -> str | None:
    """Rank 0 writes the merged file once every concept's LoRA exists; returns the error to report, if any."""
    if w.rank != 0:
        return None
    if missing := [f for f in p.files if not f.exists()]:
        return f"{p.merge} was not written: {', '.join(f.name for f in missing)} missing; {RERUN}."
    try:
        write_merged(p.files, p.merge)
    except (lora_file.LoRAFileError, OSError) as e:  # OutputError (an OSError) names --merge
        return str(e)
    print(f"wrote {p.merge}: Eq. 63 average of {len(p.files)} LoRAs ({', '.join(p.concepts)})", flush=True)
    return None


def init_group(device: str, timeout: timedelta) -> None:
    """The process group for the barriers: nccl when each rank has a GPU, else gloo."""
    import torch.distributed as dist
    if device.startswith("cuda"):
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=timeout)


def barrier(w: World, device: str) -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if w.size == 1:
        return
    import torch.distributed as dist
    if device.startswith("cuda"):
        dist.barrier(device_ids=[torch.device(device).index])
    else:
        dist.barrier()


def run_rank(p: Plan, device: str, w: World) -> tuple[list[tuple[str, int]], str | None]:
    """This rank's share of the concepts (r, r + N, ...), then the merge if asked: the concepts that failed
    with their exit status, and the merge's error (on rank 0)."""
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // w.local_size))
    else:
        torch.cuda.set_device(device)
    if w.size > 1:
        init_group(device, p.timeout)
    mine = list(zip(p.concepts, p.files))[w.rank::w.size]
    failed = [(c, code) for c, f in mine if (code := erase_one(c, f, p, device, w))]
    merge_error = None
    if p.merge is not None:
        barrier(w, device)  # every rank's LoRAs are written
        merge_error = merge_on_rank0(p, w)
        barrier(w, device)  # no rank exits (and has the launcher stop the others) while rank 0 merges
    if w.size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return failed, merge_error


def main(argv: list[str] | None = None) -> list[Path]:
    """Check the inputs, erase this rank's share of the concepts, merge if asked; returns this rank's LoRA
    files. A failure ends in one `error:` line per rank that saw one (train.py's own lines come before)."""
    w = world_from_env()
    p, device = plan(sys.argv[1:] if argv is None else list(argv), w)
    failed, merge_error = run_rank(p, device, w)
    if failed or merge_error:
        n = len(p.concepts[w.rank::w.size])
        which = ", ".join(f"{c!r}: exit {code}" for c, code in failed)
        parts = [f"rank {w.rank}: {len(failed)} of {n} concepts failed ({which})"] if failed else []
        code = max([c for _, c in failed], default=2)
        die("; ".join(parts + [merge_error or f"{RERUN}."]), code=code)
    return p.files[w.rank::w.size]


if __name__ == "__main__":
    main()
