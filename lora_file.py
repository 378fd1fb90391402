"""
zerase LoRA files: only the LoRA factors and metadata, deliberately not an ordinary LoRA.

Keys are "zerase_gated.<module path>.A" / ".B" (no "lora_A"/"lora_down" names) and the metadata says format
"zerase-gated-lora": tools that look for ordinary LoRA keys find none, so a token-gated LoRA is never
silently applied to image tokens (the collapse the paper is about, §3). Metadata: format and version,
concept, gate, layers, targets, rank, scale, the base model's fingerprint and config, training settings.

    save_lora(path, dit, spec, base_fingerprint(dit), settings)    # train.py
    apply_loras(dit, [path, ...], weights=None)                    # sample.py, evaluate.py (Eq. 63)
"""

import dataclasses
import hashlib
import json

import torch.nn as nn
from torch import Tensor

import checkpoint as C
import zerase as Z

FORMAT, FORMAT_VERSION = "zerase-gated-lora", 1
KEY_PREFIX = "zerase_gated."


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used with this model; the message says why and what to do."""



def base_fingerprint(dit: nn.Module) -> str:
    """Identity of the base model: its config plus a hash of a few small tensors that any fine-tune changes,
    as the checkpoint stores them (so fp32 and bf16 loads of one checkpoint agree), in fp32."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(dit.cfg), sort_keys=True).encode())
    stored = dit.stored_values or {name: dit.get_parameter(name) for name in C.FINGERPRINT_TENSORS}
    for name in C.FINGERPRINT_TENSORS:
        h.update(stored[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_lora(path, dit: nn.Module, spec: Z.LoRASpec, base: str, settings: dict) -> None:
    tensors = {}
    for n, m in Z.lora_modules(dit).items():
        tensors[f"{KEY_PREFIX}{n}.A"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{n}.B"] = m.lora_B.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "gate": "text" if spec.gated else "none",
            "gate_rows": "caption segment of the unified sequence, caption pad slots included (Eq. 4)",
            "layers": json.dumps(list(spec.layers)), "targets": json.dumps(list(spec.targets)),
            "rank": str(spec.rank), "scale": repr(spec.lora_alpha / spec.rank), "base_model": base,
            "base_config": json.dumps(dataclasses.asdict(dit.cfg)), "concept": settings.get("concept", ""),
            "settings": json.dumps(settings, sort_keys=True)}
    C.write_safetensors(path, tensors, meta)


def read_lora(path) -> tuple[dict[str, Tensor], dict]:
    """The factors ({'<module>.lora_A': A, ...}) and metadata of a zerase LoRA file, validated."""
    from safetensors import SafetensorError, safe_open
    path = str(path)
    try:
        with safe_open(path, "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as e:
        raise LoRAFileError(f"{path} is not a readable safetensors file ({e}); pass a LoRA written by "
                            f"train.py.")
    if meta.get("format") != FORMAT or not all(k.startswith(KEY_PREFIX) for k in keys):
        raise LoRAFileError(f"{path} is not a zerase token-gated LoRA (format {meta.get('format')!r}); only "
                            f"files written by train.py can be applied.")
    version = meta.get("format_version", "")
    if version.isdigit() and int(version) > FORMAT_VERSION:
        raise LoRAFileError(f"{path} has format version {version}; upgrade zerase to read it.")
    try:
        meta = {**meta, "format_version": int(version), "layers": tuple(json.loads(meta["layers"])),
                "targets": tuple(json.loads(meta["targets"])), "rank": int(meta["rank"]),
                "scale": float(meta["scale"]), "gated": meta["gate"] == "text",
                "base_model": meta["base_model"]}
    except (KeyError, ValueError, TypeError) as e:  # missing field; json.JSONDecodeError is a ValueError
        raise LoRAFileError(f"{path} has missing or invalid zerase metadata ({e!r}); the file is damaged, "
                            f"write it again with train.py.") from None
    factors = {}
    for k, v in tensors.items():
        mod, which = k[len(KEY_PREFIX):].rsplit(".", 1)
        factors[f"{mod}.lora_{which}"] = v
    mods = {k.rsplit(".", 1)[0] for k in factors}
    if not mods or set(factors) != {f"{m}.lora_{w}" for m in mods for w in "AB"}:
        raise LoRAFileError(f"{path} does not hold one A and one B factor per module; the file is damaged, "
                            f"write it again with train.py.")
    return factors, meta


def apply_loras(dit: nn.Module, paths: list, weights: list[float] | None = None) -> dict:
    """Wrap the model with the LoRAs of `paths`, averaged per Eq. 63 (w_i = 1/N) unless weights are given.
    All files must be for this base model and target the same projections with the same gate."""
    read = [read_lora(p) for p in paths]
    base = base_fingerprint(dit)
    for p, (factors, meta) in zip(paths, read):
        if meta["base_model"] != base:
            raise LoRAFileError(f"{p} was trained for another base model ({meta['base_model']}, this one is "
                                f"{base}); train a LoRA for this model.")
        if (meta["layers"], meta["targets"], meta["gated"]) != (read[0][1]["layers"], read[0][1]["targets"],
                                                                read[0][1]["gated"]):
            raise LoRAFileError(f"{p} targets other layers/projections or gate than {paths[0]}; merge only "
                                f"LoRAs trained with the same --layers/--targets.")
    w = weights if weights is not None else [1.0 / len(read)] * len(read)  # Eq. 63: w_i = 1/N
    spec = Z.LoRASpec(layers=read[0][1]["layers"], targets=read[0][1]["targets"], rank=1, lora_alpha=1.0,
                    gated=read[0][1]["gated"])
    if max(spec.layers) >= len(dit.layers) or not set(spec.targets) <= {"to_q", "to_k", "to_v"}:
        raise LoRAFileError(f"{paths[0]} targets layers {spec.layers} / {spec.targets}, which this model "
                            f"does not have; use a LoRA trained on this model.")
    Z.add_lora(dit, spec)
    merged = Z.merge_loras([f for f, _ in read], [m["scale"] for _, m in read], w)
    mods = Z.lora_modules(dit)
    for k, v in merged.items():
        mod, which = k.rsplit(".", 1)
        m = mods.get(mod)
        if m is None or (v.shape[1] != m.in_features if which == "lora_A" else v.shape[0] != m.out_features):
            raise LoRAFileError(f"{paths[0]} does not fit this model ({mod}: shapes or modules differ); "
                                f"use a LoRA trained on this model.")
    if missing := sorted(set(mods) - {k.rsplit(".", 1)[0] for k in merged}):
        raise LoRAFileError(f"{paths[0]} has no factors for {missing[0]} although its metadata lists that "
                            f"projection; the file is damaged, write it again with train.py.")
    Z.set_lora_state(dit, merged, scale=1.0)
    return {"weights": w, "metas": [m for _, m in read]}

