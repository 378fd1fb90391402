"""
Checkpoints on disk: a Z-Image directory in the Hugging Face layout read into model.py's networks (and
written, for the embedded tiny model and the test fixtures), and resumable training states.

Reading: safetensors only, through our own header reader (no pickle, no mmap), strict key and shape
match, modules built on the meta device and filled tensor by tensor.

    zi = load_zimage("weights/zimage-tiny")                    # -> ZImage: transformer, text encoder, ...
    zi = load_zimage(path, "cuda", torch.bfloat16, vae=False)  # what training loads
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model import (AutoencoderKL, CheckpointError, DiTConfig, Qwen3Layer, Qwen3TextEncoder, SchedulerConfig,
                   TextEncoderConfig, Tokenizer, VAEConfig, ZImageTransformer, _read_json, encode_text)
from cli import atomic_write

# Small DiT tensors that any fine-tune moves: they identify a base model (lora_file.base_fingerprint).
FINGERPRINT_TENSORS = ("x_pad_token", "cap_pad_token", "t_embedder.mlp.0.bias")
MODEL_INDEX = {  # model_index.json of Tongyi-MAI/Z-Image-Turbo, as diffusers' ZImagePipeline reads it
    "_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _st_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}}, data start offset)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path} is not a safetensors file (bad header); re-download it.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header); re-download it.") from None
    header.pop("__metadata__", None)
    for k, v in header.items():
        a, b = v["data_offsets"]
        if v["dtype"] not in _ST_DTYPES or not 0 <= a <= b <= size - 8 - n:
            raise CheckpointError(f"{path}: tensor {k} has an unsupported dtype or lies outside the file.")
    return header, 8 + n


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name of a component folder to the safetensors file holding it."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; a Z-Image checkpoint needs this component folder.")
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        wm = _read_json(index[0]).get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index[0]} has no weight_map; re-download the index file.")
        return {k: folder / v for k, v in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        pickles = [p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(f"{folder} holds pickle weights ({', '.join(pickles)}), which zerase never "
                                  f"loads; convert them to .safetensors (e.g. with save_pretrained(..., "
                                  f"safe_serialization=True)).")
        what = "no" if not files else "several"
        raise CheckpointError(f"{folder} has {what} .safetensors files and no *.safetensors.index.json; "
                              f"it needs one weights file or a sharded index.")
    return {k: files[0] for k in _st_header(files[0])[0]}


def load_weights(module: nn.Module, folder: Path, dtype: torch.dtype, device="cpu",
                 rename=lambda k: k, ignore=lambda k: False) -> nn.Module:
    """Fill a meta-device `module` from the safetensors in `folder`: strict key and shape match, each tensor
    read straight into its own buffer and cast to `dtype` on `device` one at a time (peak memory ~ the
    model plus one tensor). `rename` maps stored keys to ours; `ignore` drops keys we know we don't use."""
    where = {}
    for k, f in _weight_files(folder).items():
        if not ignore(k):
            where[rename(k)] = (k, f)
    want = {k: v.shape for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(where)), sorted(set(where) - set(want))
    if missing or unexpected:
        show = lambda ks: ", ".join(ks[:6]) + (f" (+{len(ks) - 6} more)" if len(ks) > 6 else "")
        raise CheckpointError(f"{folder} does not match the {type(module).__name__} architecture its config "
                              f"describes (missing: {show(missing) or 'none'}; unexpected: "
                              f"{show(unexpected) or 'none'}); use the matching Z-Image checkpoint.")
    sd, headers = {}, {}
    for ours, (k, f) in where.items():
        if f not in headers:
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in the index but missing; re-download the checkpoint.")
            headers[f] = _st_header(f)
        header, start = headers[f]
        if k not in header:
            raise CheckpointError(f"{f} does not contain {k} although the index says so; re-download it.")
        info = header[k]
        if tuple(info["shape"]) != tuple(want[ours]):
            raise CheckpointError(f"{folder}: {k} has shape {tuple(info['shape'])}, the config implies "
                                  f"{tuple(want[ours])}; config.json and the weights do not belong together.")
        t = _read_tensor(f, info, start)
        sd[ours] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _read_tensor(f: Path, info: dict, start: int) -> torch.Tensor:
    """One tensor of a safetensors file, in its stored dtype, from its header entry."""
    a, b = info["data_offsets"]
    buf = torch.empty(b - a, dtype=torch.uint8)
    with open(f, "rb") as fh:
        fh.seek(start + a)
        if fh.readinto(buf.numpy()) != b - a:
            raise CheckpointError(f"{f} is truncated; re-download it.")
    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_stored(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The named tensors of a component folder as stored (stored dtype, CPU), whatever dtype the model was
    loaded in: what identifies a checkpoint (a LoRA's base-model fingerprint) must not depend on the cast."""
    files = _weight_files(folder)
    out = {}
    for k in names:
        header, start = _st_header(files[k])
        out[k] = _read_tensor(files[k], header[k], start)
    return out


def _on_meta(build):
    with torch.device("meta"):
        return build()


def load_transformer(folder: Path, dtype=torch.float32, device="cpu") -> ZImageTransformer:
    cfg = DiTConfig.from_json(folder / "config.json")
    dit = load_weights(_on_meta(lambda: ZImageTransformer(cfg)), folder, dtype, device)
    dit.stored_values = read_stored(folder, FINGERPRINT_TENSORS)
    return dit


def load_text_encoder(folder: Path, dtype=torch.float32, device="cpu") -> Qwen3TextEncoder:
    cfg = TextEncoderConfig.from_json(folder / "config.json")
    last = cfg.num_hidden_layers - 1
    # Keys may carry Qwen3ForCausalLM's "model." prefix. lm_head, the final norm and the last decoder layer
    # are stored but never influence hidden_states[-2]; they are dropped by name, everything else is strict.
    strip = lambda k: k[len("model."):] if k.startswith("model.") else k
    unused = lambda k: (k == "lm_head.weight" or strip(k) == "norm.weight"
                        or strip(k).startswith(f"layers.{last}."))
    return load_weights(_on_meta(lambda: Qwen3TextEncoder(cfg)), folder, dtype, device, strip, unused)


def load_vae(folder: Path, dtype=torch.float32, device="cpu") -> AutoencoderKL:
    cfg = VAEConfig.from_json(folder / "config.json")
    return load_weights(_on_meta(lambda: AutoencoderKL(cfg)), folder, dtype, device)


@dataclass
class ZImage:
    """Everything a Z-Image checkpoint directory holds, loaded."""
    path: Path
    transformer: ZImageTransformer
    text_encoder: Qwen3TextEncoder | None
    tokenizer: Tokenizer
    vae: AutoencoderKL | None
    vae_cfg: VAEConfig  # read even when the VAE weights are not loaded (training needs the latent shape)
    scheduler: SchedulerConfig
    defaults: dict  # sampling defaults stored with the checkpoint (zerase.json), may be empty

    @property
    def device(self) -> torch.device:
        return self.transformer.x_pad_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_pad_token.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_cfg.scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> list of (L_i, cap_feat_dim) features: hidden_states[-2] of the chat-templated prompt,
        real tokens only (as diffusers' ZImagePipeline encodes prompts)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed; encode prompts before calling "
                               "free_text_encoder()")
        return [h.to(self.dtype) for h in encode_text(self.text_encoder, self.tokenizer, prompts)]

    def free_text_encoder(self) -> None:
        self.text_encoder = None


@dataclass
class Configs:
    """What a checkpoint directory says about itself without loading any weight (cheap: config files and
    the tokenizer), so that a command can check its flags against the model before anything slow."""
    path: Path
    transformer: DiTConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    tokenizer: Tokenizer
    defaults: dict


def read_configs(path) -> Configs:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass --model the folder of a Z-Image checkpoint "
                              f"(the one holding model_index.json).")
    index = _read_json(path / "model_index.json")
    if index.get("_class_name") != "ZImagePipeline":
        raise CheckpointError(f"{path}/model_index.json describes {index.get('_class_name')!r}, not a "
                              f"ZImagePipeline; pass a Z-Image checkpoint directory.")
    return Configs(path, DiTConfig.from_json(path / "transformer" / "config.json"),
                   VAEConfig.from_json(path / "vae" / "config.json"),
                   SchedulerConfig.from_json(path / "scheduler" / "scheduler_config.json"),
                   Tokenizer(path / "tokenizer" / "tokenizer.json"),
                   _read_json(path / "zerase.json") if (path / "zerase.json").exists() else {})


def load_zimage(path, device="cpu", dtype: torch.dtype | None = None, text_encoder=True, vae=True) -> ZImage:
    """Load a Z-Image checkpoint directory in the Hugging Face layout.

    dtype: DiT and text-encoder dtype (default fp32 on CPU, bf16 elsewhere); the VAE always runs in fp32.
    text_encoder / vae: set False to skip loading them (training needs neither once prompts are encoded).
    """
    cfg, device = read_configs(path), torch.device(device)
    path = cfg.path
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return ZImage(
        path=path,
        transformer=load_transformer(path / "transformer", dtype, device),
        text_encoder=load_text_encoder(path / "text_encoder", dtype, device) if text_encoder else None,
        tokenizer=cfg.tokenizer,
        vae=load_vae(path / "vae", torch.float32, device) if vae else None,
        vae_cfg=cfg.vae,
        scheduler=cfg.scheduler,
        defaults=cfg.defaults,
    )


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose bytes depend only on its content (tensors in name order, header keys sorted:
    the safetensors package writes metadata in hash order, so equal runs would give different files),
    written atomically."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw little-endian bytes, bf16 included
        end = offset + len(data)
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        blobs.append(data)
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    size = len(head).to_bytes(8, "little")  # the safetensors layout: header size, header, data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(size + head + b"".join(blobs)))


def save_training_state(path, modules: dict, opts: dict, meta: dict, only=lambda k: True) -> None:
    """A resumable training checkpoint: module and optimizer tensors in safetensors, the rest (step, λ,
    optimizer hyper-parameters) as JSON in its metadata. `only` selects which module keys to keep."""
    tensors, groups = {}, {}
    for name, m in modules.items():
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in m.state_dict().items() if only(k)})
    for name, opt in opts.items():
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{name}.{idx}.{k}"] = torch.as_tensor(v).detach().contiguous().clone()
        groups[name] = sd["param_groups"]
    meta = {**meta, "param_groups": groups}
    write_safetensors(path, tensors, {"meta": json.dumps(meta, sort_keys=True)})


def read_training_meta(path) -> dict:
    """The JSON metadata of a training checkpoint (step, λ, settings, base model), without its tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            meta = json.loads(f.read(n)).get("__metadata__", {})
            return json.loads(meta["meta"])
        except (ValueError, KeyError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a training checkpoint of train.py; remove it or pass "
                                  f"another --out.") from None


def load_training_state(path, modules: dict, opts: dict, only=lambda k: True) -> dict:
    """Inverse of save_training_state; returns its JSON metadata."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        with torch.no_grad():
            for k, p in m.state_dict(keep_vars=True).items():
                if only(k):
                    p.copy_(sd[k])
    for name, opt in opts.items():
        state = {}
        for k, v in tensors.items():
            if k.startswith(f"opt.{name}."):
                idx, key = k[len(f"opt.{name}."):].split(".", 1)
                state.setdefault(int(idx), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    return meta


# ---------------------------------------------------------------------------------------------------------
# Writing a Z-Image directory (the loader's inverse): the embedded tiny model and the test fixtures


def _save_sharded(tensors: dict, folder: Path, stem: str, n_shards: int) -> None:
    """Write tensors as n_shards safetensors files plus the HF index (as the real checkpoint is stored)."""
    from safetensors.torch import save_file
    keys = sorted(tensors)
    per = math.ceil(len(keys) / n_shards)
    weight_map = {}
    for s in range(n_shards):
        name = f"{stem}-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _cast(sd: dict, dtype) -> dict:
    """A state dict with its floating-point tensors in dtype (None: unchanged)."""
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}


def _as_causal_lm(text_encoder: Qwen3TextEncoder, seed: int) -> dict:
    """The text encoder's tensors as Qwen3ForCausalLM stores them ("model." prefix), completed with the last
    decoder layer (seeded-random) and the final norm (ones): hidden_states[-2] never uses them, but other
    tools expect a complete Qwen3 checkpoint."""
    cfg = text_encoder.cfg
    torch.manual_seed(seed + 1)
    last = Qwen3Layer(cfg)
    sd = {f"model.{k}": v for k, v in text_encoder.state_dict().items()}
    sd.update({f"model.layers.{cfg.num_hidden_layers - 1}.{k}": v for k, v in last.state_dict().items()})
    sd["model.norm.weight"] = torch.ones(cfg.hidden_size)
    return sd


def save_zimage(out, configs: dict, dit: ZImageTransformer, text_encoder: Qwen3TextEncoder,
                vae: AutoencoderKL, tokenizer_dir: Path, defaults: dict | None = None, seed: int = 0,
                dit_dtype=None, te_dtype=None) -> Path:
    """Write a checkpoint directory in the real layout: model_index.json, transformer/ and text_encoder/
    sharded with index files, vae/ in one file, scheduler/, tokenizer/ (copied), zerase.json from `defaults`.

    configs: {"transformer", "text_encoder", "vae", "scheduler"} -> their config.json contents. Written to
    a temporary folder, then renamed.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("transformer", "text_encoder", "vae", "scheduler"):
        (tmp / sub).mkdir(parents=True)
    dump = lambda p, obj: p.write_text(json.dumps(obj, indent=2) + "\n")
    dump(tmp / "model_index.json", MODEL_INDEX)
    dump(tmp / "transformer" / "config.json", configs["transformer"])
    _save_sharded(_cast(dict(dit.state_dict()), dit_dtype), tmp / "transformer", "diffusion_pytorch_model", 2)
    sd = _as_causal_lm(text_encoder, seed)
    dump(tmp / "text_encoder" / "config.json", configs["text_encoder"])
    _save_sharded(_cast(sd, te_dtype), tmp / "text_encoder", "model", 2)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    from safetensors.torch import save_file
    dump(tmp / "vae" / "config.json", configs["vae"])
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(tmp / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    dump(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
    if defaults is not None:
        dump(tmp / "zerase.json", defaults)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
