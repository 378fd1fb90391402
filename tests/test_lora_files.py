"""zerase LoRA files (save_lora / read_lora / apply_loras): they round-trip, they cannot be mistaken for an
ordinary LoRA, and every kind of wrong file is refused with a LoRAFileError that says what is wrong.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint as C
import lora_file
import model as M
import zerase as Z
from tests.checkpoints import make_random_checkpoint

SPEC = Z.LoRASpec(layers=(0, 1), rank=4, lora_alpha=4.0)
UNGATED_SPEC = Z.LoRASpec(layers=(1,), targets=("to_k", "to_v"), rank=2, lora_alpha=1.0, gated=False)

# ---------------------------------------------------------------------------------------------------
# Helpers


def load_dit(ckpt) -> M.ZImageTransformer:
    return C.load_zimage(ckpt, text_encoder=False, vae=False).transformer


def trained_lora(ckpt, spec=SPEC, seed=0) -> M.ZImageTransformer:
    """A DiT with a LoRA whose factors are random and non-zero, as after training."""
    dit = load_dit(ckpt)
    Z.add_lora(dit, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in Z.lora_modules(dit).values():
            m.lora_B.normal_(0.0, 0.1, generator=g)
    return dit


def save(dit, path, spec=SPEC, concept="circle"):
    lora_file.save_lora(path, dit, spec, lora_file.base_fingerprint(dit), {"concept": concept, "steps": 3})
    return path


def rewrite(src, dst, tensors=lambda t: t, meta=lambda m: m):
    """Copy a safetensors file, editing its tensors and metadata on the way (to make damaged files)."""
    with safe_open(str(src), "pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors(t), str(dst), metadata=meta(m))
    return dst


def dit_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(cfg.in_channels, 4, 6, generator=g), torch.randn(cfg.in_channels, 8, 8, generator=g)]
    caps = [torch.randn(5, cfg.cap_feat_dim, generator=g), torch.randn(40, cfg.cap_feat_dim, generator=g)]
    return x, torch.rand(2, generator=g), caps


@pytest.fixture(scope="module")
def saved_lora(random_ckpt, tmp_path_factory):
    return save(trained_lora(random_ckpt), tmp_path_factory.mktemp("lora") / "circle.safetensors")


@pytest.fixture(scope="module")
def other_ckpts(tmp_path_factory):
    """Checkpoints that are not random_ckpt: other weights (seed 1), wider (dim 128), deeper (3 layers)."""
    root = tmp_path_factory.mktemp("others")
    wide = {"dim": 128, "n_heads": 4, "n_kv_heads": 4}  # head dim 32 = sum(axes_dims) as in random_ckpt
    return {"seed": make_random_checkpoint(root / "seed1", seed=1),
            "dim": make_random_checkpoint(root / "dim128", seed=0, transformer=wide),
            "layers": make_random_checkpoint(root / "layers3", seed=0, transformer={"n_layers": 3})}


# ---------------------------------------------------------------------------------------------------
# Round trip and file contents


@pytest.mark.parametrize("spec, exact", [(SPEC, True), (UNGATED_SPEC, False)])
def test_a_saved_lora_applied_to_a_fresh_model_gives_the_in_memory_loras_outputs(random_ckpt, tmp_path,
                                                                                  spec, exact):
    """save_lora then apply_loras on a fresh model reproduces the trained model's outputs and factors."""
    # bit for bit when the scale is 1, to float rounding otherwise
    dit = trained_lora(random_ckpt, spec, seed=3)
    path = save(dit, tmp_path / "x.safetensors", spec)
    factors, meta = lora_file.read_lora(path)
    state = Z.lora_state(dit)
    assert set(factors) == set(state) and all(torch.equal(factors[k], state[k]) for k in state)
    assert (meta["layers"], meta["targets"], meta["rank"], meta["gated"]) == \
        (spec.layers, spec.targets, spec.rank, spec.gated)
    assert meta["scale"] == spec.lora_alpha / spec.rank

    fresh = load_dit(random_ckpt)
    info = lora_file.apply_loras(fresh, [path])
    assert info["metas"][0]["concept"] == "circle"
    inputs = dit_inputs(dit.cfg)
    with torch.no_grad():
        want, got = dit(*inputs), fresh(*inputs)
        with Z.lora_disabled(fresh):
            base = fresh(*inputs)
    for w, g, b in zip(want, got, base):
        assert not torch.allclose(w, b)  # the LoRA does something, so the comparison can see a wrong load
        if exact:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_file_has_no_ordinary_lora_key_names_and_says_what_it_is(saved_lora, random_ckpt):
    """No key is named like an ordinary LoRA's, and the metadata says what the file is and what it is for."""
    # so ordinary LoRA loaders find nothing to apply to image tokens
    with safe_open(str(saved_lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("zerase_gated.") for k in keys)
    for name in ("lora_a", "lora_b", "lora_down", "lora_up", "lora."):
        assert not any(name in k.lower() for k in keys), name
    assert meta["format"] == "zerase-gated-lora" and int(meta["format_version"]) >= 1
    assert meta["concept"] == "circle"
    assert json.loads(meta["targets"]) == ["to_q", "to_k", "to_v"] and json.loads(meta["layers"]) == [0, 1]
    assert int(meta["rank"]) == 4 and float(meta["scale"]) == 1.0 and meta["gate"] == "text"
    assert meta["base_model"] == lora_file.base_fingerprint(load_dit(random_ckpt))


# ---------------------------------------------------------------------------------------------------
# Files that are not zerase LoRAs


def test_an_ordinary_lora_file_is_refused(tmp_path, random_ckpt):
    """A peft/diffusers-style LoRA (lora_A / lora_B keys) is refused by name, whatever its metadata says."""
    t = {"layers.0.attention.to_q.lora_A.weight": torch.randn(4, 64),
         "layers.0.attention.to_q.lora_B.weight": torch.randn(64, 4)}
    plain = tmp_path / "plain.safetensors"
    save_file(t, str(plain))
    with_meta = tmp_path / "meta.safetensors"
    save_file(t, str(with_meta), metadata={"format": "pt"})
    # keys of an ordinary LoRA under a zerase format tag: still refused, the keys are checked too
    forged = tmp_path / "forged.safetensors"
    save_file(t, str(forged), metadata={"format": "zerase-gated-lora", "format_version": "1"})
    dit = load_dit(random_ckpt)
    for p in (plain, with_meta, forged):
        with pytest.raises(lora_file.LoRAFileError, match="not a zerase token-gated LoRA") as e:
            lora_file.apply_loras(dit, [p])
        assert str(p) in str(e.value)
    assert not Z.lora_modules(dit)


def test_the_vae_weights_are_refused_as_a_lora(random_ckpt):
    """Another safetensors file of the checkpoint (the VAE weights) is refused as not a zerase LoRA."""
    vae = random_ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae.is_file()
    with pytest.raises(lora_file.LoRAFileError, match="not a zerase token-gated LoRA"):
        lora_file.read_lora(vae)


def test_random_bytes_an_empty_file_a_truncated_lora_and_a_missing_path_are_refused(tmp_path, saved_lora):
    """Random bytes, an empty file, a truncated LoRA, a missing path and a folder give a LoRAFileError."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.safetensors"
    data = saved_lora.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    for p in (junk, empty, cut, tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(lora_file.LoRAFileError, match="not a readable safetensors file"):
            lora_file.read_lora(p)


class _Tripwire:
    """Unpickling this object creates a file: proof that something unpickled the LoRA."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_a_torch_pickle_is_refused_without_being_unpickled(tmp_path):
    """A torch.save file (zip of pickles), as .pt or renamed .safetensors, is refused and never unpickled."""
    flag = tmp_path / "unpickled"
    pt = tmp_path / "evil.pt"
    torch.save({"zerase_gated.layers.0.attention.to_q.A": _Tripwire(flag)}, pt)
    torch.load(pt, weights_only=False)  # the tripwire works: unpickling the file does create the flag
    assert flag.exists()
    flag.unlink()
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(pt.read_bytes())
    for path in (pt, renamed):
        with pytest.raises(lora_file.LoRAFileError, match="not a readable safetensors file"):
            lora_file.read_lora(path)
        assert not flag.exists()


# ---------------------------------------------------------------------------------------------------
# zerase LoRAs for another model


@pytest.mark.parametrize("other", ["seed", "dim", "layers"])
def test_a_lora_trained_on_another_model_is_refused(other, other_ckpts, random_ckpt, tmp_path):
    """A LoRA saved on a model with other weights, width or depth is refused as for another base model."""
    ckpt = other_ckpts[other]
    n_layers = load_dit(ckpt).cfg.n_layers
    spec = Z.LoRASpec(layers=tuple(range(n_layers)))
    path = save(trained_lora(ckpt, spec), tmp_path / f"{other}.safetensors", spec)
    lora_file.apply_loras(load_dit(ckpt), [path])  # fine on its own model
    with pytest.raises(lora_file.LoRAFileError, match="another base model"):
        lora_file.apply_loras(load_dit(random_ckpt), [path])


def test_a_lora_for_other_shapes_or_layers_is_refused_even_with_a_matching_fingerprint(
        other_ckpts, random_ckpt, tmp_path):
    """With a forged fingerprint, the shape and layer checks still refuse a LoRA of another model."""
    base = lora_file.base_fingerprint(load_dit(random_ckpt))
    forge = lambda m: {**m, "base_model": base}  # noqa: E731
    wide = save(trained_lora(other_ckpts["dim"]), tmp_path / "wide.safetensors")
    deep_spec = Z.LoRASpec(layers=(0, 1, 2))
    deep = save(trained_lora(other_ckpts["layers"], deep_spec), tmp_path / "deep.safetensors", deep_spec)
    with pytest.raises(lora_file.LoRAFileError, match="does not fit this model"):
        lora_file.apply_loras(load_dit(random_ckpt), [rewrite(wide, tmp_path / "wide2.safetensors",
                                                              meta=forge)])
    with pytest.raises(lora_file.LoRAFileError, match="which this model does not have"):
        lora_file.apply_loras(load_dit(random_ckpt), [rewrite(deep, tmp_path / "deep2.safetensors",
                                                              meta=forge)])


def test_loras_with_different_targets_or_gates_are_not_merged(random_ckpt, tmp_path, saved_lora):
    """LoRAs with different gates or on different layers are refused together (Eq. 63 needs the same ones)."""
    for spec in (Z.LoRASpec(layers=(0, 1), gated=False), Z.LoRASpec(layers=(1,))):
        other = save(trained_lora(random_ckpt, spec), tmp_path / "other.safetensors", spec)
        with pytest.raises(lora_file.LoRAFileError, match="targets other layers/projections or gate"):
            lora_file.apply_loras(load_dit(random_ckpt), [saved_lora, other])


# ---------------------------------------------------------------------------------------------------
# Damaged zerase LoRAs


@pytest.mark.parametrize("field", ["layers", "targets", "rank", "scale", "gate", "base_model",
                                   "format_version"])
def test_a_zerase_lora_with_a_missing_metadata_field_is_refused(field, saved_lora, tmp_path):
    """Dropping any metadata field the loader needs gives a LoRAFileError, not a KeyError."""
    drop = lambda m: {k: v for k, v in m.items() if k != field}  # noqa: E731
    path = rewrite(saved_lora, tmp_path / "x.safetensors", meta=drop)
    with pytest.raises(lora_file.LoRAFileError, match="metadata"):
        lora_file.read_lora(path)


def test_a_zerase_lora_with_garbled_metadata_is_refused(saved_lora, tmp_path):
    """Metadata values that do not parse (layers not JSON, rank not a number) give a LoRAFileError."""
    for edit in ({"layers": "[0, 1"}, {"rank": "four"}, {"scale": "x"}):
        path = rewrite(saved_lora, tmp_path / "x.safetensors", meta=lambda m: {**m, **edit})
        with pytest.raises(lora_file.LoRAFileError, match="metadata"):
            lora_file.read_lora(path)


def test_a_lora_from_a_newer_format_version_asks_for_an_upgrade(saved_lora, tmp_path):
    """A file of a newer format version is refused with the advice to upgrade zerase."""
    path = rewrite(saved_lora, tmp_path / "x.safetensors", meta=lambda m: {**m, "format_version": "99"})
    with pytest.raises(lora_file.LoRAFileError, match="upgrade zerase"):
        lora_file.read_lora(path)


def test_a_zerase_lora_missing_factors_is_refused(saved_lora, random_ckpt, tmp_path):
    """A file missing a factor, a listed projection's factors, or all factors is a LoRAFileError."""
    key = "zerase_gated.layers.1.attention.to_v"
    without = lambda *drop: lambda t: {k: v for k, v in t.items() if k not in drop}  # noqa: E731
    half = rewrite(saved_lora, tmp_path / "half.safetensors", tensors=without(f"{key}.B"))
    with pytest.raises(lora_file.LoRAFileError, match="one A and one B factor"):
        lora_file.read_lora(half)
    gone = rewrite(saved_lora, tmp_path / "gone.safetensors", tensors=without(f"{key}.A", f"{key}.B"))
    with pytest.raises(lora_file.LoRAFileError, match="no factors for layers.1.attention.to_v"):
        lora_file.apply_loras(load_dit(random_ckpt), [gone])
    empty = rewrite(saved_lora, tmp_path / "empty.safetensors", tensors=lambda t: {})
    with pytest.raises(lora_file.LoRAFileError):
        lora_file.read_lora(empty)
