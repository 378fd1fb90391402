"""
zerase LoRAs inside a stock diffusers `ZImagePipeline`: the token gate of Eq. 4 on diffusers' own modules.

    from diffusers import ZImagePipeline
    from zerase_diffusers import apply_zerase
    pipe = ZImagePipeline.from_pretrained("weights/Z-Image-Turbo", dtype=torch.bfloat16).to("cuda")
    with apply_zerase(pipe, ["loras/van-gogh.safetensors", "loras/star.safetensors"]):  # averaged, Eq. 63
        image = pipe("a starry night", num_inference_steps=8, guidance_scale=0.0).images[0]

Optional module: it is the only one that touches diffusers, and the core (zerase.py, model.py, sample.py,
...) never imports it. Tested with diffusers 0.42.1 (transformers 5.23.0): tests/test_diffusers_adapter.py
renders the same images as sample.generate with lora_file.apply_loras.

How it works, from diffusers 0.42.1's transformer_z_image.py:
  - `ZSingleStreamAttnProcessor` calls `attn.to_q/to_k/to_v(hidden_states)` (three separate nn.Linear, never
    a fused `to_qkv`) on the unified sequence of every main layer `transformer.layers[i].attention`;
  - `_build_unified_sequence` (basic mode) puts each item's image tokens first, then its caption tokens,
    each segment padded to a multiple of 32 (`_pad_with_ids`), and right-pads the batch; CFG runs the
    positive and the negative captions as one batch of 2B items.
So a forward pre-hook on the transformer reads `x` (a list of (C, F, H, W) latents) and `cap_feats` and
builds the same `model.Layout` our DiT uses; the wrapped projections (`zerase.GatedLoRALinear`, sharing
the frozen weight) add S_T·H·ΔW on those caption rows only (Eq. 4).

Checks, so that a LoRA is never silently wrong or silently ignored:
  - the file's base-model fingerprint must be this transformer's (lora_file.base_fingerprint, computed
    from the diffusers config and the stored tensors);
  - refused: the omni variant (siglip features; its unified sequence is caption-first), fused qkv
    projections, projections already wrapped by another adapter (PEFT LoRA);
  - per forward: the RoPE positions the first gated layer receives must put caption token j at
    (1 + j, 0, 0) on exactly the rows the gate selects (the layout is read, not assumed), and every
    wrapped projection must have been called; otherwise ZEraseAdapterError.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

import checkpoint as C
import lora_file
import model as M
import zerase as Z
from lora_file import LoRAFileError

TESTED_DIFFUSERS = ("0.42.1",)
_TESTED = ", ".join(TESTED_DIFFUSERS)
TARGETS = ("to_q", "to_k", "to_v")


class ZEraseAdapterError(RuntimeError):
    """diffusers did not run the transformer the way this adapter relies on; the message says how."""


# ---------------------------------------------------------------------------------------------------------
# The gated projection and the per-forward state it reads


class _Gate:
    """What one transformer forward tells the wrapped projections: the caption rows (flat indices into the
    (B*S) flattening of the unified sequence), the sequence shape, and which projections were called."""

    def __init__(self):
        self.layout: M.Layout | None = None
        self.rows: Tensor | None = None
        self.shape: tuple[int, int] | None = None
        self.in_forward = False
        self.layout_checked = False
        self.calls: dict[str, int] = {}


class _GatedProjection(Z.GatedLoRALinear):
    """zerase's gated LoRA linear (Eq. 4) called as diffusers calls a projection: `attn.to_q(x)`, the
    caption rows coming from the transformer's own inputs of the current forward."""

    def forward(self, x: Tensor) -> Tensor:  # x (B, S, D_in): the unified sequence
        gate, name = self._zerase_gate, self._zerase_name
        if gate.rows is None:
            raise ZEraseAdapterError(f"{name} was called outside ZImageTransformer2DModel.forward, so its "
                                     f"caption rows are unknown; call the transformer (or the pipeline).")
        if tuple(x.shape[:2]) != gate.shape:
            raise ZEraseAdapterError(f"{name} got a sequence of shape {tuple(x.shape[:2])}, but the unified "
                                     f"sequence of this forward is {gate.shape} (image first, then caption, "
                                     f"each padded to 32); this diffusers version builds it differently.")
        if gate.in_forward:
            gate.calls[name] += 1
        return super().forward(x, gate.rows)


# ---------------------------------------------------------------------------------------------------------
# The base model's identity, computed as lora_file.base_fingerprint computes it for our module


def dit_config(transformer) -> M.DiTConfig:
    """Our DiTConfig from a diffusers ZImageTransformer2DModel's config (same fields, same values)."""
    raw = dict(transformer.config)
    if raw.get("siglip_feat_dim") is not None:
        raise LoRAFileError("this is the omni Z-Image transformer (siglip_feat_dim is set): its unified "
                            "sequence is caption-first with SigLIP tokens, which zerase's gate does not "
                            "cover; use Z-Image-Turbo.")
    try:
        return M.DiTConfig.from_dict(raw, "the diffusers transformer's config")
    except M.CheckpointError as e:
        raise LoRAFileError(f"zerase cannot adapt this transformer: {e}") from None


def _stored_values(transformer) -> dict[str, Tensor]:
    """The fingerprint tensors as the checkpoint stores them. Read from the transformer's folder when it
    is local and its weights still equal the file's (a bf16 load of an fp32 checkpoint then keeps the
    file's fingerprint); otherwise the loaded parameters themselves."""
    params = {n: transformer.get_parameter(n).detach() for n in C.FINGERPRINT_TENSORS}
    folder = Path(str(transformer.config.get("_name_or_path") or ""))
    if folder.is_dir():
        try:
            stored = C.read_stored(folder, C.FINGERPRINT_TENSORS)
        except (M.CheckpointError, KeyError, OSError):
            stored = None
        if stored is not None and all(p.is_meta or torch.equal(p.cpu(), stored[n].to(p.dtype))
                                      for n, p in params.items()):
            return stored
    return params


def diffusers_fingerprint(transformer) -> str:
    """lora_file.base_fingerprint of a diffusers transformer: the same hash of our DiTConfig and the
    stored tensors, so a LoRA trained with train.py on a checkpoint matches diffusers' load of it."""
    shim = SimpleNamespace(cfg=dit_config(transformer), stored_values=_stored_values(transformer))
    return lora_file.base_fingerprint(shim)


# ---------------------------------------------------------------------------------------------------------
# Applying and removing


class ZEraseHandle:
    """Returned by apply_zerase: `.remove()` (or leaving the `with` block) puts the original projection
    modules back, so the transformer is again exactly the base model."""

    def __init__(self, transformer, originals, hooks, weights, metas):
        self.transformer, self.weights, self.metas = transformer, weights, metas
        self._originals, self._hooks = originals, hooks

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def remove(self) -> None:
        for attn, name, lin in self._originals:
            setattr(attn, name, lin)
        for h in self._hooks:
            h.remove()
        self._originals, self._hooks = [], []

    def __enter__(self) -> ZEraseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _transformer_of(pipe_or_transformer):
    from diffusers import ZImageTransformer2DModel
    t = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(t, ZImageTransformer2DModel):
        raise TypeError(f"apply_zerase needs a diffusers ZImagePipeline or its ZImageTransformer2DModel, got "
                        f"{type(pipe_or_transformer).__name__}.")
    return t


def _weights(paths: list, weight) -> list[float]:
    if weight is None:
        return [1.0 / len(paths)] * len(paths)  # Eq. 63: w_i = 1/N
    w = [float(weight)] if isinstance(weight, (int, float)) else [float(x) for x in weight]
    if len(w) != len(paths):
        raise ValueError(f"give one weight per LoRA file ({len(paths)} files, {len(w)} weights), or none "
                         f"to average them (Eq. 63).")
    return w


def _read_and_check(transformer, paths: list) -> list[tuple[dict, dict]]:
    """Every file read and validated against this transformer, as lora_file.apply_loras validates them."""
    read = [lora_file.read_lora(p) for p in paths]
    base = diffusers_fingerprint(transformer)
    first = read[0][1]
    for p, (_, meta) in zip(paths, read):
        if meta["base_model"] != base:
            raise LoRAFileError(f"{p} was trained for another base model ({meta['base_model']}; this "
                                f"diffusers transformer is {base}: config and x_pad_token, cap_pad_token, "
                                f"t_embedder.mlp.0.bias as stored); train a LoRA for this model.")
        if any(meta[k] != first[k] for k in ("layers", "targets", "gated")):
            raise LoRAFileError(f"{p} targets other layers/projections or gate than {paths[0]}; merge only "
                                f"LoRAs trained with the same --layers/--targets.")
    if max(first["layers"]) >= len(transformer.layers) or not set(first["targets"]) <= set(TARGETS):
        raise LoRAFileError(f"{paths[0]} targets layers {first['layers']} / {first['targets']}, which this "
                            f"transformer does not have; use a LoRA trained on this model.")
    return read


def apply_zerase(pipe_or_transformer, path_or_paths, weight=None) -> ZEraseHandle:
    """Apply zerase LoRA file(s) to a diffusers ZImagePipeline (or its transformer), token-gated (Eq. 4).

    Several files are averaged per Eq. 63 (w_i = 1/N) unless `weight` gives one number per file (a number
    for a single file). Returns a handle whose `.remove()` restores the original projections; it is also
    a context manager. Raises LoRAFileError for a file that does not fit this transformer.
    """
    transformer = _transformer_of(pipe_or_transformer)
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise ValueError("apply_zerase needs at least one LoRA file.")
    w = _weights(paths, weight)
    read = _read_and_check(transformer, paths)
    meta = read[0][1]
    attns = {i: transformer.layers[i].attention for i in meta["layers"]}
    _check_plain_projections(attns, meta["targets"])
    merged = Z.merge_loras([f for f, _ in read], [m["scale"] for _, m in read], w)  # Eq. 63, one LoRA
    gate = _Gate()
    wrapped = _gated_projections(attns, meta, merged, gate, paths[0])
    for attn, name, _, g in wrapped:
        setattr(attn, name, g)
    Z.set_lora_state(transformer, merged, scale=1.0)  # merged factors carry w_i·s_i: scale 1
    hooks = _install_hooks(transformer, gate, attns)
    return ZEraseHandle(transformer, [(a, n, lin) for a, n, lin, _ in wrapped], hooks, w,
                        [m for _, m in read])


def _check_plain_projections(attns: dict, targets: list[str]) -> None:
    """Each targeted projection must be a plain, unfused nn.Linear that no adapter wraps yet."""
    for i, attn in attns.items():
        if getattr(attn, "fused_projections", False):
            raise LoRAFileError(f"layers.{i}.attention has fused qkv projections; a token-gated LoRA cannot "
                                f"act on a fused projection. Un-fuse them first "
                                f"(attention.fuse_projections(False)).")
        for name in targets:
            lin = getattr(attn, name)
            if isinstance(lin, _GatedProjection):
                raise LoRAFileError("a zerase LoRA is already applied to this transformer; remove() it "
                                    "first, or pass all files to one apply_zerase call (averaged, Eq. 63).")
            if type(lin) is not torch.nn.Linear:
                raise LoRAFileError(f"layers.{i}.attention.{name} is a {type(lin).__name__}, not a plain "
                                    f"nn.Linear (another adapter, e.g. a PEFT LoRA, wraps it); unload that "
                                    f"first.")


def _gated_projections(attns: dict, meta: dict, merged: dict, gate: "_Gate", path) -> list[tuple]:
    """(attention, name, original nn.Linear, its gated wrapper) for every targeted projection, each checked
    against the merged factors' shapes; nothing is installed yet."""
    wrapped = []
    for i, attn in attns.items():
        for name in meta["targets"]:
            lin = getattr(attn, name)
            mod = f"layers.{i}.attention.{name}"
            A, B = merged.get(f"{mod}.lora_A"), merged.get(f"{mod}.lora_B")
            if A is None or B is None or A.shape[1] != lin.in_features or B.shape[0] != lin.out_features:
                raise LoRAFileError(f"{path} does not fit this transformer ({mod}: factors missing or of "
                                    f"other shapes); use a LoRA trained on this model.")
            # its own generator: the placeholder init must not advance the global RNG the user may seed
            g = _GatedProjection.wrap(lin, rank=1, lora_alpha=1.0, gated=meta["gated"], rng=torch.Generator())
            g._zerase_gate, g._zerase_name = gate, mod
            gate.calls[mod] = 0
            wrapped.append((attn, name, lin, g))
    return wrapped


def _install_hooks(transformer, gate: "_Gate", attns: dict) -> list:
    """The hooks that give the gate each forward's caption rows and check how diffusers ran it."""
    first_layer = transformer.layers[min(attns)]
    return [transformer.register_forward_pre_hook(_make_pre_hook(gate, attns), with_kwargs=True),
            first_layer.register_forward_pre_hook(_make_layout_check(gate, transformer), with_kwargs=True),
            transformer.register_forward_hook(_make_post_hook(gate))]


# ---------------------------------------------------------------------------------------------------------
# Hooks: the caption rows of each forward, and the checks that diffusers ran it as expected


def _bind(module, args, kwargs) -> dict:
    """The forward's arguments by name (the class's signature: offloading hooks may wrap module.forward)."""
    try:
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    except TypeError as e:
        raise ZEraseAdapterError(f"cannot read the arguments of {type(module).__name__}.forward ({e}); "
                                 f"this diffusers version is not supported (tested: {_TESTED}).")
    bound.apply_defaults()
    return bound.arguments


def _make_pre_hook(gate: _Gate, attns: dict):
    def pre_hook(transformer, args, kwargs):
        a = _bind(transformer, args, kwargs)
        if not {"x", "cap_feats"} <= set(a):
            raise ZEraseAdapterError(f"ZImageTransformer2DModel.forward has no x / cap_feats arguments in "
                                     f"this diffusers version (tested: {_TESTED}).")
        x, caps = a["x"], a["cap_feats"]
        if isinstance(x[0], (list, tuple)) or a.get("siglip_feats") is not None:
            raise ZEraseAdapterError("omni mode (nested latents or siglip_feats): its unified sequence is "
                                     "caption-first with SigLIP tokens, which zerase's gate does not cover.")
        for i, attn in attns.items():
            if getattr(attn, "fused_projections", False):
                raise ZEraseAdapterError(f"layers.{i}.attention was fused (fuse_projections) after "
                                         f"apply_zerase; a token-gated LoRA cannot act on a fused "
                                         f"projection.")
        p, fp = a.get("patch_size", 2), a.get("f_patch_size", 1)
        # x: list of (C, F, H, W) latents -> F/fp * H/p * W/p image tokens per item (_patchify_image)
        n_img = [(xi.shape[-3] // fp) * (xi.shape[-2] // p) * (xi.shape[-1] // p) for xi in x]
        n_cap = [len(c) for c in caps]
        n_img_p, n_cap_p = ([n + (-n) % M.SEQ_MULTI_OF for n in ns] for ns in (n_img, n_cap))  # _pad_with_ids
        S = max(a_ + b_ for a_, b_ in zip(n_img_p, n_cap_p))
        gate.layout = M.Layout(n_img, n_img_p, n_cap, n_cap_p, S)
        gate.rows = gate.layout.text_rows(x[0].device)  # S_T of Eq. 4, flat over (B*S)
        gate.shape = (len(x), S)
        gate.in_forward, gate.layout_checked = True, False
        gate.calls = dict.fromkeys(gate.calls, 0)
    return pre_hook


def _make_layout_check(gate: _Gate, transformer):
    """Pre-hook on the first gated layer: the RoPE positions diffusers gives the unified sequence must put
    caption token j of item i at (1 + j, 0, 0) exactly on the rows the gate selects for item i."""
    def layout_check(block, args, kwargs):
        if not gate.in_forward or gate.layout_checked:
            return
        freqs = _bind(block, args, kwargs).get("freqs_cis")
        lay = gate.layout
        if not torch.is_tensor(freqs) or tuple(freqs.shape[:2]) != gate.shape:
            raise ZEraseAdapterError(f"the main layers did not get RoPE tables of the expected (B, S) = "
                                     f"{gate.shape}; this diffusers version lays out the unified sequence "
                                     f"differently (tested: {_TESTED}).")
        L = max(lay.n_cap_padded)
        ids = torch.zeros(L, 3, dtype=torch.int32, device=freqs.device)
        ids[:, 0] = torch.arange(1, L + 1, device=freqs.device)  # caption token j at (1 + j, 0, 0)
        want = transformer.rope_embedder(ids)  # (L, head_dim/2) complex
        for i, (a, b) in enumerate(zip(lay.n_img_padded, lay.n_cap_padded)):
            if not torch.equal(freqs[i, a:a + b], want[:b].to(freqs.dtype)):
                raise ZEraseAdapterError(f"item {i}: rows {a}..{a + b - 1} of the unified sequence are not "
                                         f"its caption (RoPE positions differ); diffusers no longer puts the "
                                         f"image first and the caption after it, so the gate would hit image "
                                         f"tokens.")
        gate.layout_checked = True
    return layout_check


def _make_post_hook(gate: _Gate):
    def post_hook(transformer, args, output):
        gate.in_forward = False
        missing = [n for n, c in gate.calls.items() if c == 0]
        if missing or not gate.layout_checked:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            what = f"{missing[0]}{more}" if missing else "the first gated layer"
            raise ZEraseAdapterError(f"diffusers did not call {what} during this forward (fused projections "
                                     f"or a changed attention processor?), so the zerase LoRA had no effect; "
                                     f"tested with diffusers {_TESTED}.")
    return post_hook
