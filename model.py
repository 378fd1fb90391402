"""
Z-Image-Turbo in plain PyTorch: the single-stream DiT, the Qwen3 text encoder (up to hidden_states[-2]),
the AutoencoderKL, their configs and the tokenizer; checkpoint.py loads them from a Hugging Face directory.

Written from scratch for zerase (Z-Erase, arXiv 2603.25074) after diffusers' `ZImageTransformer2DModel`
(transformer_z_image.py) and `AutoencoderKL`, transformers' `Qwen3Model` and the official Tongyi-MAI/Z-Image
code; tests/test_parity.py holds each against the library version. Module and parameter names equal the
checkpoint keys, so the official files load with a strict key match and no renaming table.

How Z-Image's DiT ("S3-DiT") differs from a plain DiT:
  - single stream: image tokens and caption tokens are concatenated into one sequence, image FIRST, and
    every main layer uses the same Q/K/V weights for both (this is what Z-Erase's token gate splits);
  - each segment is padded to a multiple of 32 with a learned pad token (x_pad_token / cap_pad_token);
  - before the main layers, 2 "noise refiner" blocks see only image tokens (modulated by t) and 2
    "context refiner" blocks see only caption tokens (not modulated);
  - 3-axis RoPE (caption index, row, column) applied to interleaved pairs, with the caption index doubling
    as a "frame" axis so image tokens sit after the caption (axis 0 = padded caption length + 1);
  - sandwich RMSNorms around attention and FFN, tanh-gated residuals, adaLN scale only (no shift);
  - the model is called with t = 1 - sigma and predicts v ~ x0 - noise; the sampler negates it.

Sections: configs | DiT | Qwen3 text encoder | VAE | tokenizer | the real model's configs.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SEQ_MULTI_OF = 32  # each segment (image, caption) is padded to a multiple of 32 (diffusers: SEQ_MULTI_OF)
ADALN_EMBED_DIM = 256  # adaLN conditioning width is min(dim, 256)
FREQ_EMBED_DIM = 256  # timestep sinusoid width
T_MLP_HIDDEN = 1024  # timestep MLP hidden width, hard-coded in Z-Image
MAX_TEXT_TOKENS = 512  # the pipeline's max_sequence_length, template tokens included
CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # Qwen3, enable_thinking=True


class CheckpointError(ValueError):
    """A checkpoint (or config) that cannot be loaded; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Configs: frozen dataclasses read from each component's config.json and validated.
# Known fields are parsed; fields that would change the architecture in ways we do not implement are an
# error; anything else (bookkeeping written by newer library versions) is accepted and ignored.

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; point --model at a Z-Image checkpoint directory "
                              f"(model_index.json, transformer/, text_encoder/, tokenizer/, vae/, "
                              f"scheduler/).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problem = f"{path} is not valid JSON ({e})"
        raise CheckpointError(f"{problem}; re-download or regenerate that file.") from None


def _pick(cls, raw: dict, path: Path, renames: dict | None = None) -> dict:
    """Take the dataclass fields of `cls` from `raw`, failing with the file name when one is missing."""
    out = {}
    for f in fields(cls):
        key = (renames or {}).get(f.name, f.name)
        if key not in raw:
            what = f"a Z-Image {cls.__name__} config"
            raise CheckpointError(f"{path} has no '{key}' field; this is not {what}.")
        out[f.name] = tuple(raw[key]) if isinstance(raw[key], list) else raw[key]
    return out


def _unsupported(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what} is not supported by zerase's Z-Image implementation; "
                           f"use a Z-Image-Turbo checkpoint (text-to-image, no omni/siglip features).")


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    qk_norm: bool
    cap_feat_dim: int
    rope_theta: float
    t_scale: float
    axes_dims: tuple
    axes_lens: tuple
    all_patch_size: tuple
    all_f_patch_size: tuple

    @property
    def patch(self) -> int:
        return self.all_patch_size[0]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_json(cls, path: Path) -> "DiTConfig":
        return cls.from_dict(_read_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path="config") -> "DiTConfig":
        cfg = cls(**_pick(cls, raw, path))
        if raw.get("siglip_feat_dim") is not None:
            raise _unsupported(path, "siglip_feat_dim (the omni variant)")
        if cfg.all_patch_size != (2,) or cfg.all_f_patch_size != (1,):
            raise _unsupported(path, f"patch sizes {cfg.all_patch_size}/{cfg.all_f_patch_size} (only 2/1)")
        if not cfg.qk_norm:
            raise _unsupported(path, "qk_norm=false")
        if cfg.n_kv_heads != cfg.n_heads:
            raise _unsupported(path, "n_kv_heads != n_heads")
        if cfg.dim % cfg.n_heads or sum(cfg.axes_dims) != cfg.head_dim or any(d % 2 for d in cfg.axes_dims):
            raise CheckpointError(f"{path}: axes_dims {cfg.axes_dims} must be even and sum to the head dim "
                                  f"{cfg.dim}/{cfg.n_heads}; the config is inconsistent.")
        return cfg


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_json(cls, path: Path) -> "TextEncoderConfig":
        return cls.from_dict(_read_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path="config") -> "TextEncoderConfig":
        raw = dict(raw)
        # The real repo stores rope_theta at top level; transformers >= 5 writes it inside rope_parameters.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _unsupported(path, f"rope type {rope.get('rope_type', rope.get('type'))!r}")
        if "rope_theta" not in raw and "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
        if raw.get("model_type", "qwen3") != "qwen3":
            raise _unsupported(path, f"text encoder model_type {raw.get('model_type')!r} (expected qwen3)")
        if raw.get("hidden_act", "silu") != "silu":
            raise _unsupported(path, f"hidden_act {raw.get('hidden_act')!r}")
        if raw.get("attention_bias", False):
            raise _unsupported(path, "attention_bias=true")
        if raw.get("use_sliding_window", False) or "sliding_attention" in (raw.get("layer_types") or []):
            raise _unsupported(path, "sliding-window attention")
        cfg = cls(**_pick(cls, raw, path))
        if cfg.num_hidden_layers < 2:
            raise CheckpointError(f"{path}: hidden_states[-2] needs at least 2 decoder layers.")
        return cfg


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool

    @property
    def scale_factor(self) -> int:  # pixels per latent cell
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: Path) -> "VAEConfig":
        return cls.from_dict(_read_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path="config") -> "VAEConfig":
        n = len(raw.get("block_out_channels", []))
        if raw.get("down_block_types") != ["DownEncoderBlock2D"] * n or \
                raw.get("up_block_types") != ["UpDecoderBlock2D"] * n:
            raise _unsupported(path, "VAE block types other than DownEncoderBlock2D/UpDecoderBlock2D")
        if raw.get("act_fn", "silu") != "silu" or not raw.get("mid_block_add_attention", True):
            raise _unsupported(path, "a VAE without silu or without mid-block attention")
        if raw.get("shift_factor") is None:
            raise CheckpointError(f"{path} has no shift_factor; Z-Image's VAE (FLUX.1 VAE) needs one.")
        return cls(**_pick(cls, raw, path))


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int
    shift: float

    @classmethod
    def from_json(cls, path: Path) -> "SchedulerConfig":
        return cls.from_dict(_read_json(path), path)

    @classmethod
    def from_dict(cls, raw: dict, path="config") -> "SchedulerConfig":
        if raw.get("use_dynamic_shifting", False):
            raise _unsupported(path, "use_dynamic_shifting=true (Turbo uses a static shift)")
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                  "stochastic_sampling", "shift_terminal"):
            if raw.get(k):
                raise _unsupported(path, f"scheduler option {k}")
        return cls(**_pick(cls, raw, path))


# ---------------------------------------------------------------------------------------------------------
# DiT building blocks

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, the statistic taken in fp32 (as diffusers' and Qwen3's RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) the token gate, so a gated LoRA linear can stand in its place.

    Only the Q/K/V projections of the unified layers are this type; the gate (flat indices of the caption
    rows, see `Layout`) is what zerase's token-gated LoRA (Eq. 4) needs to act on text tokens only.
    """

    def forward(self, x: torch.Tensor, text_rows: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def rope_freqs(pos: torch.Tensor, axes_dims: tuple, theta: float) -> torch.Tensor:
    """3-axis RoPE as complex rotations: pos (..., 3) int -> (..., head_dim/2) complex64.

    ω_{a,k} = θ^(-2k/d_a); the angles pos_a·ω_{a,k} in float64, then float32 (as diffusers' RopeEmbedder).
    """
    out = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        angle = (pos[..., a, None].double() * omega).float()
        out.append(torch.polar(torch.ones_like(angle), angle))
    return torch.cat(out, dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head. x (B, S, H, Dh), freqs (B, S, Dh/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, Dh/2)
    return torch.view_as_real(xc * freqs[:, :, None]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(dim, dim, bias=False)
        self.to_v = Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # key to_out.0.weight
        self.norm_q = RMSNorm(dim // n_heads, eps)
        self.norm_k = RMSNorm(dim // n_heads, eps)
        self.probe = None  # optional callable(q, k): how zerase's attention loss (Eq. 6) reads q and k
        self.query_block = None  # attend a block of queries at a time (see attention_in_blocks)

    def qkv(self, x: torch.Tensor, freqs: torch.Tensor, text_rows: torch.Tensor | None = None):
        """Projected, QK-normed, rotated q, k, v, each (B, H, S, Dh)."""
        B, S, _ = x.shape
        q = self.to_q(x, text_rows).view(B, S, self.n_heads, -1)
        k = self.to_k(x, text_rows).view(B, S, self.n_heads, -1)
        v = self.to_v(x, text_rows).view(B, S, self.n_heads, -1)
        q, k = apply_rope(self.norm_q(q), freqs), apply_rope(self.norm_k(k), freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, freqs, mask=None, text_rows=None) -> torch.Tensor:
        q, k, v = self.qkv(x, freqs, text_rows)
        if self.probe is not None:
            self.probe(q, k)
        # mask (B, 1, 1, S): True = attend. Only batch padding is masked; the learned pad tokens are attended.
        if self.query_block is None:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, Dh), scale 1/sqrt(Dh)
        else:  # the same attention, rows of queries in blocks (each query's softmax is over all keys)
            b = self.query_block
            h = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + b], k, v, attn_mask=mask)
                           for i in range(0, q.shape[2], b)], dim=2)
        return self.to_out[0](h.transpose(1, 2).flatten(2))


@contextmanager
def attention_in_blocks(module: nn.Module, block: int):
    """Inside this block every Attention of `module` attends `block` queries at a time: the same values, and
    with the plain (math) attention at most (B, H, block, S) scores at once."""
    mods = [m for m in module.modules() if isinstance(m, Attention)]
    for m in mods:
        m.query_block = block
    try:
        yield
    finally:
        for m in mods:
            m.query_block = None


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):  # SwiGLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Z-Image transformer block with sandwich norms; modulated (adaLN scale + tanh gate) or plain."""

    def __init__(self, cfg: DiTConfig, modulation: bool):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(d, cfg.n_heads, 1e-5)  # QK-norm eps is hard-coded 1e-5 in diffusers
        self.feed_forward = FeedForward(d, int(d / 3 * 8))
        self.attention_norm1, self.attention_norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(d, eps), RMSNorm(d, eps)
        if modulation:  # Sequential of one: key adaLN_modulation.0.*; note no SiLU on c here
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(d, ADALN_EMBED_DIM), 4 * d))

    def forward(self, x, freqs, mask=None, c=None, text_rows=None):
        if c is None:  # context refiner: plain residual blocks
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask, text_rows))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), freqs, mask, text_rows)
        x = x + gate_msa.tanh() * self.attention_norm2(h)
        f = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(f)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, T_MLP_HIDDEN), nn.SiLU(),
                                 nn.Linear(T_MLP_HIDDEN, out_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = FREQ_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, then sin
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        # the Linear is item 1: keys adaLN_modulation.1.*
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim))

    def forward(self, x, c):  # scale only: no shift, no gate
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c)[:, None]))


@dataclass
class Layout:
    """Where every token of a batch sits in the unified sequence (image rows first, then caption rows).

    Item i occupies rows [0, n_img_padded[i]) with its image (n_img[i] real patches, then pad tokens) and
    the next n_cap_padded[i] rows with its caption (n_cap[i] real tokens, then pad tokens); rows after
    those are batch padding, up to seq_len. This is the only place the image/text boundary is decided: it
    depends on each item's resolution and caption length, never on a constant.
    """
    n_img: list[int]
    n_img_padded: list[int]
    n_cap: list[int]
    n_cap_padded: list[int]
    seq_len: int  # padded unified length S

    def text_mask(self, device=None) -> torch.Tensor:
        """S_T of Eq. 4 as a (B, S) bool: caption rows, caption pad slots included."""
        m = torch.zeros(len(self.n_img), self.seq_len, dtype=torch.bool, device=device)
        for i, (np_, lp) in enumerate(zip(self.n_img_padded, self.n_cap_padded)):
            m[i, np_:np_ + lp] = True
        return m

    def text_rows(self, device=None) -> torch.Tensor:
        """Flat indices of the caption rows in the (B*S) flattening, ascending: the gate of the fused LoRA
        linear (the True entries of text_mask, built without a data-dependent nonzero)."""
        S = self.seq_len
        return torch.cat([torch.arange(i * S + np_, i * S + np_ + lp, device=device)
                          for i, (np_, lp) in enumerate(zip(self.n_img_padded, self.n_cap_padded))])

    def caption_row(self, i: int, j: int) -> int:
        """Unified row of caption token j of item i."""
        return self.n_img_padded[i] + j

    @staticmethod
    def of(n_img: list[int], n_img_padded: list[int], n_cap: list[int], n_cap_padded: list[int]) -> "Layout":
        """The layout of items with these lengths; S is the longest item's image + caption rows."""
        return Layout(list(n_img), list(n_img_padded), list(n_cap), list(n_cap_padded),
                      max(a + b for a, b in zip(n_img_padded, n_cap_padded)))


@dataclass
class Refined:
    """What the unified layers start from: each item's image tokens after the noise refiner and caption
    tokens after the context refiner (padded to the layout's lengths), their RoPE rotations, and the
    timestep conditioning c. Items are independent until the unified layers, so a batch's Refined can be
    assembled from parts refined in separate calls (`cat`, `take`): train.py refines the preservation
    pool once, since nothing the LoRA trains sits in the refiners."""
    img: list[torch.Tensor]  # per item (n_img_padded_i, D)
    img_freqs: list[torch.Tensor]  # per item (n_img_padded_i, head_dim/2) complex64
    cap: list[torch.Tensor]  # per item (n_cap_padded_i, D)
    cap_freqs: list[torch.Tensor]  # per item (n_cap_padded_i, head_dim/2) complex64
    c: torch.Tensor  # (B, adaln) timestep conditioning
    sizes: list[tuple[int, int]]  # per item the latent's (H, W)
    lay: Layout
    stacked: bool = True  # the caller's x was one tensor: unified returns one

    def take(self, idx: list[int]) -> "Refined":
        """Items idx, in that order (repeats allowed)."""
        items = {f: [getattr(self, f)[i] for i in idx] for f in _ITEM_FIELDS}
        lay = Layout.of(*([getattr(self.lay, f)[i] for i in idx] for f in _LENGTH_FIELDS))
        return Refined(**items, c=self.c[idx], lay=lay, stacked=self.stacked)

    @staticmethod
    def cat(parts: list["Refined"]) -> "Refined":
        """The items of every part, in order."""
        items = {f: [v for r in parts for v in getattr(r, f)] for f in _ITEM_FIELDS}
        lay = Layout.of(*([n for r in parts for n in getattr(r.lay, f)] for f in _LENGTH_FIELDS))
        return Refined(**items, c=torch.cat([r.c for r in parts]), lay=lay,
                       stacked=all(r.stacked for r in parts))


_ITEM_FIELDS = ("img", "img_freqs", "cap", "cap_freqs", "sizes")  # Refined's per-item lists
_LENGTH_FIELDS = ("n_img", "n_img_padded", "n_cap", "n_cap_padded")  # Layout's


def _pad32(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def _batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad variable-length (S_i, ...) tensors with zeros; mask (B,1,1,S) only if lengths differ."""
    lens = [len(s) for s in seqs]
    out = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    if len(set(lens)) == 1:
        return out, None
    rows = torch.arange(out.shape[1], device=out.device)
    mask = rows[None] < torch.tensor(lens, device=out.device)[:, None]  # (B, S): True on real rows
    return out, mask[:, None, None, :]


class ZImageTransformer(nn.Module):
    """The single-stream DiT (diffusers' ZImageTransformer2DModel; same state-dict keys)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch
        key = f"{p}-{cfg.all_f_patch_size[0]}"  # checkpoint keys are "{patch}-{f_patch}" = "2-1"
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(p * p * cfg.in_channels, d)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(d, p * p * cfg.in_channels)})
        self.noise_refiner = nn.ModuleList([Block(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([Block(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(d, ADALN_EMBED_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, d))
        self.x_pad_token = nn.Parameter(torch.zeros(1, d))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, d))
        self.layers = nn.ModuleList([Block(cfg, True) for _ in range(cfg.n_layers)])
        self.gradient_checkpointing = False  # recompute each unified layer in backward (training memory)
        # checkpoint.FINGERPRINT_TENSORS as stored on disk (set by load_transformer); None when built in code
        self.stored_values: dict[str, torch.Tensor] | None = None

    def layout(self, sizes: list[tuple[int, int]], cap_lens: list[int]) -> Layout:
        """Layout for latents of (H, W) sizes and captions of cap_lens real tokens."""
        p = self.cfg.patch
        n_img = [(h // p) * (w // p) for h, w in sizes]
        return Layout.of(n_img, [_pad32(n) for n in n_img], cap_lens, [_pad32(n) for n in cap_lens])

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (H/p * W/p, p*p*C): tokens row-major; in each, channel fastest, then pw, then ph
        (as diffusers' patchify_and_embed)."""
        C, H, W = x.shape
        p = self.cfg.patch
        return x.view(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(H/p * W/p, p*p*C) -> (C, H, W), the exact inverse of patchify."""
        p, C = self.cfg.patch, self.cfg.in_channels
        return tokens.view(H // p, W // p, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, H, W)

    def embed(self, x: list[torch.Tensor], cap_feats: list[torch.Tensor], lay: Layout):
        """Each item's image and caption tokens, embedded and padded to the layout's lengths, with their
        3-axis RoPE positions: the inputs of the noise and context refiners."""
        dev = x[0].device
        img, img_pos, cap, cap_pos = [], [], [], []
        for i, (xi, ci) in enumerate(zip(x, cap_feats)):
            tokens, pos = self.embed_caption(ci, lay.n_cap[i], lay.n_cap_padded[i], dev)
            cap.append(tokens)
            cap_pos.append(pos)
            tokens, pos = self.embed_image(xi, lay.n_img[i], lay.n_img_padded[i], lay.n_cap_padded[i], dev)
            img.append(tokens)
            img_pos.append(pos)
        return img, img_pos, cap, cap_pos

    def embed_caption(self, feats: torch.Tensor, n: int, n_padded: int, dev):
        """(n_padded, D) caption tokens, pad slots filled with cap_pad_token; token j (pad slots included)
        sits at position (1 + j, 0, 0)."""
        pos = torch.zeros(n_padded, 3, dtype=torch.long, device=dev)
        pos[:, 0] = torch.arange(1, n_padded + 1, device=dev)
        e = self.cap_embedder(feats)  # (L, D)
        return torch.cat([e, self.cap_pad_token.expand(n_padded - n, -1).to(e.dtype)]), pos

    def embed_image(self, latent: torch.Tensor, n: int, n_padded: int, cap_padded: int, dev):
        """(n_padded, D) image tokens, pad slots filled with x_pad_token; token (h, w) sits at position
        (cap_padded + 1, h, w), pad tokens at (0, 0, 0)."""
        H, W = latent.shape[-2] // self.cfg.patch, latent.shape[-1] // self.cfg.patch
        pos = torch.zeros(n_padded, 3, dtype=torch.long, device=dev)
        pos[:n, 0] = cap_padded + 1
        pos[:n, 1] = torch.arange(H, device=dev).repeat_interleave(W)
        pos[:n, 2] = torch.arange(W, device=dev).repeat(H)
        emb = self.all_x_embedder[next(iter(self.all_x_embedder))]
        e = emb(self.patchify(latent).to(emb.weight.dtype))  # (N, D); latents enter in the DiT's dtype
        return torch.cat([e, self.x_pad_token.expand(n_padded - n, -1).to(e.dtype)]), pos

    def forward(self, x, t: torch.Tensor, cap_feats: list[torch.Tensor], return_layout: bool = False):
        """v = DiT(x, t, captions).

        x: latents, a (B, C, H, W) tensor or a list of (C, H_i, W_i) tensors (sizes may differ).
        t: (B,) with t = 1 - sigma (the model multiplies by t_scale = 1000 inside).
        cap_feats: list of (L_i, cap_feat_dim) text features, real tokens only.
        Returns v ~ x0 - noise, same structure as x (stacked tensor in, tensor out).
        """
        return self.unified(self.refine(x, t, cap_feats), return_layout)

    def refine(self, x, t: torch.Tensor, cap_feats: list[torch.Tensor]) -> Refined:
        """The first half of forward: the timestep embedding, the image and caption embeddings, and the two
        refiner stacks, each stream on its own (noise refiner: image tokens, modulated by t; context
        refiner: caption tokens, unmodulated)."""
        stacked = torch.is_tensor(x)
        xs = list(x.unbind(0)) if stacked else list(x)
        cfg = self.cfg
        sizes = [tuple(xi.shape[-2:]) for xi in xs]
        lay = self.layout(sizes, [len(c) for c in cap_feats])
        c = self.t_embedder(t * cfg.t_scale).to(self.x_pad_token.dtype)  # (B, adaln)
        img, img_pos, cap, cap_pos = self.embed(xs, cap_feats, lay)

        xb, xmask = _batch(img)
        xfreqs, _ = _batch([rope_freqs(p, cfg.axes_dims, cfg.rope_theta) for p in img_pos])
        for blk in self.noise_refiner:
            xb = blk(xb, xfreqs, xmask, c)
        cb, cmask = _batch(cap)
        cfreqs, _ = _batch([rope_freqs(p, cfg.axes_dims, cfg.rope_theta) for p in cap_pos])
        for blk in self.context_refiner:
            cb = blk(cb, cfreqs, cmask)
        rows = lambda batch, lengths: [batch[i, :n] for i, n in enumerate(lengths)]  # noqa: E731 (padding off)
        return Refined(rows(xb, lay.n_img_padded), rows(xfreqs, lay.n_img_padded), rows(cb, lay.n_cap_padded),
                       rows(cfreqs, lay.n_cap_padded), c, sizes, lay, stacked)

    def unified(self, r: Refined, return_layout: bool = False):
        """The second half of forward: the unified layers over one sequence per item (image rows first,
        then caption rows, as diffusers' ZImageTransformer2DModel), the final layer, and unpatchify."""
        u, umask = _batch([torch.cat([a, b]) for a, b in zip(r.img, r.cap)])  # (B, S, D)
        ufreqs, _ = _batch([torch.cat([a, b]) for a, b in zip(r.img_freqs, r.cap_freqs)])
        lay, c = r.lay, r.c
        text_rows = lay.text_rows(u.device)
        for blk in self.layers:
            inputs = (u, ufreqs, umask, c, text_rows)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                u = torch.utils.checkpoint.checkpoint(blk, *inputs, use_reentrant=False)
            else:
                u = blk(*inputs)
        u = self.all_final_layer[next(iter(self.all_final_layer))](u, c)

        out = [self.unpatchify(u[i, :n], *hw) for i, (n, hw) in enumerate(zip(lay.n_img, r.sizes))]
        out = torch.stack(out) if r.stacked else out
        return (out, lay) if return_layout else out


# ---------------------------------------------------------------------------------------------------------
# Qwen3 text encoder, only up to hidden_states[-2]: the raw output of the second-to-last decoder layer.
# The last decoder layer and the final norm never influence Z-Image, so they are neither built nor loaded.

class Qwen3Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        h, dh = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, dh
        self.q_proj = nn.Linear(h, self.n_heads * dh, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * dh, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * dh, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dh, cfg.rms_norm_eps), RMSNorm(dh, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, -1)).transpose(1, 2)  # (B, Hq, S, Dh)
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv, -1)).transpose(1, 2)  # (B, Hkv, S, Dh)
        v = self.v_proj(x).view(B, S, self.n_kv, -1).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # half-split RoPE (not pairs)
        rep = self.n_heads // self.n_kv  # GQA: kv head j serves q heads rep*j .. rep*j + rep-1
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(h.transpose(1, 2).flatten(2))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nn.Module):
    """Qwen3Model's embeddings + decoder layers 0 .. N-2; forward returns hidden_states[-2]."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers - 1)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S), right-padded; returns (B, S, hidden). Causal attention makes every real token's
        features independent of the padding after it, so no attention mask is needed."""
        x = self.embed_tokens(ids)
        dh = self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64, device=ids.device)
                                                 .float() / dh)
        ang = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * inv_freq  # (S, Dh/2)
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)  # fp32 tables cast to the activation dtype
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


# ---------------------------------------------------------------------------------------------------------
# AutoencoderKL (the FLUX.1 VAE): encoder (mean/logvar) and decoder with diffusers' key names.

def _gn(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _gn(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # key to_out.0.*

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (m(h)[:, None] for m in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Sampler2x(nn.Module):
    """Downsampler (pad right/bottom by 1, conv 3x3 stride 2) or upsampler (nearest x2, conv 3x3)."""

    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class VAEStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Sampler2x(cout, True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Sampler2x(cout, False)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            VAEStage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _gn(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # [mean | logvar]

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            VAEStage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None)
            for i in range(n)])
        self.conv_norm_out = _gn(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(c2, c2, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) in [-1, 1] -> (mean, logvar) of the posterior, each (B, C, H/f, W/f)."""
        m = self.encoder(img)
        if self.cfg.use_quant_conv:
            m = self.quant_conv(m)
        mean, logvar = m.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def latents_to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents -> image in about [-1, 1]: undo the scaling, z = x / scaling + shift."""
        z = latents.to(next(self.parameters()).dtype) / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decode(z)


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, as diffusers' postprocess does it."""
    return (img.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: the checkpoint's tokenizer.json through the `tokenizers` package, with the exact chat template.

class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the tokenizer/ folder needs tokenizer.json.")
        self.tok = HFTokenizer.from_file(str(path))
        self.prefix = CHAT_TEMPLATE.split("{prompt}")[0]
        for special in ("<|im_start|>", "<|im_end|>"):
            if self.tok.token_to_id(special) is None:
                raise CheckpointError(f"{path} lacks the special token {special}; "
                                      f"it is not a Qwen tokenizer.")

    def n_tokens(self, prompt: str) -> int:
        """How many tokens the chat-templated prompt has, before encode cuts it to MAX_TEXT_TOKENS."""
        return len(self.tok.encode(CHAT_TEMPLATE.format(prompt=prompt)).ids)

    def encode(self, prompt: str,
               max_tokens: int = MAX_TEXT_TOKENS) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the chat-templated prompt (real tokens only, at most max_tokens, cut from the right)
        and each token's (start, end) character span in `prompt` ((0, 0) for template tokens)."""
        enc = self.tok.encode(CHAT_TEMPLATE.format(prompt=prompt))
        k = len(self.prefix)
        spans = [(max(a - k, 0), max(min(b - k, len(prompt)), 0)) if k <= a < k + len(prompt) else (0, 0)
                 for a, b in enc.offsets]
        return enc.ids[:max_tokens], spans[:max_tokens]


def encode_text(text_encoder: Qwen3TextEncoder, tokenizer: Tokenizer,
                prompts: list[str]) -> list[torch.Tensor]:
    """Prompts -> list of (L_i, hidden) features, real tokens only; differentiable (the tiny model's
    pretraining trains its text encoder through this)."""
    ids = [tokenizer.encode(p)[0] for p in prompts]
    pad = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # right padding, any id will do
    for i, x in enumerate(ids):
        pad[i, :len(x)] = torch.tensor(x)
    h = text_encoder(pad.to(text_encoder.embed_tokens.weight.device))
    return [h[i, :len(x)] for i, x in enumerate(ids)]


# ---------------------------------------------------------------------------------------------------------
# Preset: the configs of Tongyi-MAI/Z-Image-Turbo, written out once (their config.json files). Loading reads
# each checkpoint's own config.json; these are for building the real-size model without the files
# (benchmarks, the meta-device key/shape test).

ZIMAGE_TURBO = {
    "transformer": {
        "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
        "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30,
        "n_kv_heads": 30, "norm_eps": 1e-05, "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0,
        "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    },
    "text_encoder": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 40960, "vocab_size": 151936,
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 36,
    },
    "vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3, "out_channels": 3,
        "latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "mid_block_add_attention": True, "sample_size": 1024,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
        "use_post_quant_conv": False, "force_upcast": True,
    },
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": False},
}
