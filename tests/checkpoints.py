"""Small random Z-Image checkpoints in the exact Hugging Face layout, written by diffusers/transformers.

Test helper (not product code). Our loader must read the real `Tongyi-MAI/Z-Image-Turbo` directory:
`model_index.json`, sharded fp32 transformer, sharded bf16 Qwen3 text encoder with a `model.` key prefix,
Qwen2 tokenizer, single-file VAE, scheduler config. The real one is 33 GB and cannot be
downloaded here, so the parity tests use a directory of the same shape with tiny random weights, saved
by the libraries' own `save_pretrained`, which `diffusers.ZImagePipeline` then loads as the oracle.

Every parameter is re-drawn from a seeded generator after construction: the libraries' inits leave some
weights zero or constant (pad tokens, norm weights, ...), and a path that multiplies by zero or one
cannot show a bug. Draws are scaled by 1/sqrt(fan_in), so activations and outputs stay O(1).

    from tests.checkpoints import make_random_checkpoint, load_diffusers_pipeline
    path = make_random_checkpoint(tmp_path / "ckpt", seed=0, transformer={"n_layers": 3})
    pipe = load_diffusers_pipeline(path)
"""

import json
import math
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from safetensors import safe_open
from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM

from tiny.tokenizer import IM_END, PAD, save_tokenizer, train_tokenizer

# --------------------------------------------------------------------------------------------------
# default tiny configs (the real values: model.ZIMAGE_TURBO; comments say where ours differ and why)

TEXT_ENCODER = dict(  # Qwen3Config kwargs; the real one is Qwen3-4B (hidden 2560, 36 layers)
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,  # hidden_states[-2] is then the raw output of layer 1
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA as in the real model (32 q heads, 8 kv heads)
    head_dim=8,
    hidden_act="silu",
    max_position_embeddings=512,  # the pipeline pads prompts to max_sequence_length=512
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=True,
    attention_bias=False,
    use_sliding_window=False,
)

TRANSFORMER = dict(  # ZImageTransformer2DModel kwargs; the real one has dim 3840, 30 layers, 30 heads
    all_patch_size=[2],
    all_f_patch_size=[1],
    dim=64,  # < 256, so the adaLN width min(dim, 256) equals dim here (it is 256 != dim in the real model)
    n_layers=2,
    n_refiner_layers=2,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],  # sums to head_dim = 64 / 2
    axes_lens=[1536, 512, 512],  # the checkpoint's value (the diffusers class default is 1024, 512, 512)
    # cap_feat_dim and in_channels follow the text encoder and the VAE unless overridden
)

VAE = dict(  # AutoencoderKL kwargs; the real one is the FLUX.1 VAE with block_out_channels [128,256,512,512]
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=[32, 32, 64, 64],  # 4 levels as in the real VAE: vae_scale_factor = 8
    layers_per_block=1,
    norm_num_groups=32,
    act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    mid_block_add_attention=True,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

TOKENIZER_VOCAB_SIZE = 400

# A few hundred words of captions in the style of the concept world (tiny/world.py), for the tokenizer.
CORPUS = [
    "A photo of a red circle",
    "A photo of a blue square on a white background",
    "An art in the style of Van Gogh",
    "An art in the style of Monet",
    "A painting of a house in the style of Picasso",
    "A green tree under a yellow sky, in the style of Mondrian",
    "A small star next to a big heart",
    "Vincent van Gogh's swirling night sky over a quiet village",
    "Soft pastel water lilies by Claude Monet",
    "A cubist portrait with sharp shards of colour",
    "Black grid lines with red, blue and yellow blocks",
    "A photo of a purple heart on an orange background",
    "Two circles and a square, drawn in thick strokes",
    "A tall tree beside a small house at sunset",
    "An abstract composition of stars and circles",
    "A photo of a cat sitting on a wooden chair",
    "A dog running across a green field",
    "A bowl of fruit on a kitchen table, in the style of Van Gogh",
    "A red house with a blue door and a white fence",
    "A portrait of a woman with a pearl earring",
    "A boat on a calm lake in the morning light",
    "Sunflowers in a vase, painted with bold yellow strokes",
    "A city street at night with bright lights and rain",
    "A mountain landscape with snow and a clear blue sky",
    "An image of a star, a heart and a circle",
    "A minimalist poster with one black square",
    "A photo of an apple and a pear on a plate",
    "A garden full of flowers in the style of Monet",
    "A guitar and a bottle, in the style of Picasso",
    "Colourful rectangles separated by black lines",
    "A child flying a kite on a windy beach",
    "The moon over a dark forest, oil painting",
    "A photo of a green triangle",
    "A drawing of a tree with many small leaves",
    "A bridge over a river, in the style of Monet",
    "A starry night over the sea, in the manner of van Gogh",
    "",
]


# --------------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 1.0) -> None:
    """Re-draw every parameter: matrices/kernels ~ N(0, std²/fan_in), norm weights ~ 1 + N(0, 0.1²),
    biases ~ N(0, 0.1²), pad tokens ~ N(0, 1). Tied parameters are drawn once."""
    for name, p in module.named_parameters():
        if "pad_token" in name:
            p.copy_(torch.randn(p.shape, generator=generator))
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=generator) * (std / math.sqrt(fan_in)))
        elif name.endswith("weight"):  # 1-D weights are the scales of RMSNorm / GroupNorm / LayerNorm
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _shard_size(module: torch.nn.Module, n_shards: int = 3) -> int:
    """A max_shard_size in bytes that splits the module into about n_shards files (the real repo has 3)."""
    total = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return total // n_shards + 1


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _legacy_qwen3_config(config_path: Path) -> None:
    """Rewrite a transformers-5 Qwen3 config.json the way the real repo stores it (transformers 4.51):
    `rope_theta` at top level, `rope_scaling: null`, `torch_dtype`, no `rope_parameters`/`layer_types`."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    theta = rope["rope_theta"]
    cfg["rope_theta"] = int(theta) if float(theta).is_integer() else theta  # the real file has 1000000
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = "4.51.0"
    _write_json(config_path, dict(sorted(cfg.items())))


# --------------------------------------------------------------------------------------------------
# the checkpoint


def make_random_checkpoint(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    transformer: dict | None = None,
    text_encoder: dict | None = None,
    vae: dict | None = None,
    te_dtype: torch.dtype = torch.float32,
    te_rope_at_top_level: bool = False,
) -> Path:
    """Write a random Z-Image checkpoint directory in the real layout and return its path.

    transformer / text_encoder / vae: kwargs merged over TRANSFORMER / TEXT_ENCODER / VAE.
    te_dtype: stored dtype of the text encoder (the real one is bf16). te_rope_at_top_level: write the
    text encoder's config.json in the real repo's (transformers 4) form instead of transformers 5's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CORPUS, TOKENIZER_VOCAB_SIZE)  # first: its vocabulary sizes the text encoder
    save_tokenizer(tok, out / "tokenizer")
    te, dit, autoencoder = _random_models(seed, *_model_kwargs(tok, transformer, text_encoder, vae))
    _save_text_encoder(te, out / "text_encoder", te_dtype, te_rope_at_top_level)
    _save_transformer(dit, out / "transformer")
    autoencoder.save_pretrained(out / "vae", safe_serialization=True)  # vae/: one file
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    ).save_pretrained(out / "scheduler")
    _write_json(out / "model_index.json", {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return out


def _model_kwargs(tok, transformer: dict | None, text_encoder: dict | None,
                  vae: dict | None) -> tuple[dict, dict, dict]:
    """The libraries' constructor kwargs: the defaults above, the caller's overrides, and what follows from
    the tokenizer (vocabulary, special tokens) and from the text encoder and VAE (the DiT's input sizes)."""
    te_kwargs = {**TEXT_ENCODER, **(text_encoder or {})}
    te_kwargs.setdefault("vocab_size", tok.get_vocab_size())
    te_kwargs.setdefault("bos_token_id", tok.token_to_id(PAD))  # as in Qwen3: bos = <|endoftext|>
    te_kwargs.setdefault("eos_token_id", tok.token_to_id(IM_END))
    vae_kwargs = {**VAE, **(vae or {})}
    dit_kwargs = {
        "cap_feat_dim": te_kwargs["hidden_size"],
        "in_channels": vae_kwargs["latent_channels"],
        **TRANSFORMER,
        **(transformer or {}),
    }
    return te_kwargs, dit_kwargs, vae_kwargs


def _random_models(seed: int, te_kwargs: dict, dit_kwargs: dict, vae_kwargs: dict):
    """Qwen3ForCausalLM, ZImageTransformer2DModel and AutoencoderKL with every parameter drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    # fork_rng: construction-time inits (overwritten below) neither depend on nor disturb global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = Qwen3ForCausalLM(Qwen3Config(**te_kwargs))
        dit = ZImageTransformer2DModel(**dit_kwargs)
        autoencoder = AutoencoderKL(**vae_kwargs)
    for model in (te, dit, autoencoder):
        randomize_(model, g)
        model.eval()
    with torch.no_grad():  # halve the decoder's output so that few pixels are clipped to [-1, 1]
        autoencoder.decoder.conv_out.weight.mul_(0.5)
    return te, dit, autoencoder


def _save_text_encoder(te, folder: Path, dtype: torch.dtype, rope_at_top_level: bool) -> None:
    """text_encoder/: Qwen3ForCausalLM keys (model.*), sharded, tied lm_head not stored."""
    te.to(dtype).save_pretrained(folder, max_shard_size=_shard_size(te))
    (folder / "generation_config.json").unlink()  # not in the real repo
    if rope_at_top_level:
        _legacy_qwen3_config(folder / "config.json")


def _save_transformer(dit, folder: Path) -> None:
    """transformer/: fp32 like the real repo, sharded, config.json as the real repo writes it."""
    dit.save_pretrained(folder, safe_serialization=True, max_shard_size=_shard_size(dit))
    config = json.loads((folder / "config.json").read_text())
    if config.get("siglip_feat_dim", 0) is None:  # added in diffusers 0.37 (Omni); absent in the real file
        del config["siglip_feat_dim"]
        _write_json(folder / "config.json", config)


# --------------------------------------------------------------------------------------------------
# reading back (for tests)


def load_diffusers_pipeline(path: str | os.PathLike) -> ZImagePipeline:
    """diffusers' own pipeline on the checkpoint: the oracle, fp32 on CPU."""
    # dtype=: diffusers 0.42 deprecates torch_dtype=
    return ZImagePipeline.from_pretrained(Path(path), dtype=torch.float32).to("cpu")


def load_transformers_text_encoder(path: str | os.PathLike) -> torch.nn.Module:
    """The text encoder as the pipeline loads it (`Qwen3Model`, no LM head), fp32."""
    return AutoModel.from_pretrained(Path(path) / "text_encoder", dtype=torch.float32).eval()


def safetensors_dtypes(folder: str | os.PathLike) -> dict[str, str]:
    """{tensor name: stored dtype string, e.g. 'BF16'} over every *.safetensors file in folder."""
    dtypes = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                dtypes[k] = sf.get_slice(k).get_dtype()
    return dtypes


if __name__ == "__main__":  # python -m tests.checkpoints DIR: write a random checkpoint to try sample.py on
    import sys

    print(make_random_checkpoint(Path(sys.argv[1] if len(sys.argv) > 1 else "out/zimage-random")))


# --------------------------------------------------------------------------------------------------
# The real configuration at reduced depth, written by zerase's own code (checkpoint.save_zimage)

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "weights" / "zimage-tiny" / "tokenizer"


def make_real_config_checkpoint(out_dir, *, seed: int = 0, n_layers: int = 1, n_refiner_layers: int = 1,
                                te_layers: int = 2, pool_steps: int = 2) -> Path:
    """A checkpoint directory in the real layout whose transformer, text-encoder and VAE configs are those of
    Tongyi-MAI/Z-Image-Turbo (model.ZIMAGE_TURBO: dim 3840, 30 heads, Qwen3 hidden 2560, the FLUX VAE) but
    for depth, with random weights and the tiny model's tokenizer (so the embedding table stays small).
    Stored as the real repo stores it (transformer fp32, text encoder bf16 with the "model." prefix).

    The only file the real repo lacks is zerase.json, holding just {"steps": pool_steps}: it makes train.py's
    trajectory pools 2 states long instead of 8 so that a training run fits a CPU test. Nothing else is
    stored there, so training takes the real model's paths: generic preservation prompts, --category needed.
    """
    import checkpoint as C
    import model as M
    out = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    tokenizer = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    n_vocab = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    configs = {k: dict(v) for k, v in M.ZIMAGE_TURBO.items()}
    configs["transformer"].update(n_layers=n_layers, n_refiner_layers=n_refiner_layers)
    configs["text_encoder"].update(num_hidden_layers=te_layers, max_window_layers=te_layers,
                                   vocab_size=n_vocab, bos_token_id=0, eos_token_id=2)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):  # built without an init pass: randomize_ draws every parameter below
        dit = M.ZImageTransformer(M.DiTConfig.from_dict(strip(configs["transformer"])))
        te = M.Qwen3TextEncoder(M.TextEncoderConfig.from_dict(configs["text_encoder"]))
        vae = M.AutoencoderKL(M.VAEConfig.from_dict(strip(configs["vae"])))
    for module in (dit, te, vae):
        module.to_empty(device="cpu")
        randomize_(module, g)
    with torch.no_grad():  # halve the decoder's output so that few pixels are clipped to [-1, 1]
        vae.decoder.conv_out.weight.mul_(0.5)
    return C.save_zimage(out, configs, dit, te, vae, TINY_TOKENIZER, defaults={"steps": pool_steps},
                         seed=seed, te_dtype=torch.bfloat16)
