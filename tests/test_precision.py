"""The paths the real model takes: bf16 weights with fp32 latents, gradient checkpointing, a base-model
fingerprint that does not depend on the load dtype, and a preservation set that never names the concept.
"""

import json

import pytest
import torch

import checkpoint as C
import model as M
import lora_file
import train
import zerase as Z

TINY = str(train.DEFAULT_MODEL)


def tiny_args(out, *extra) -> list[str]:
    return ["--concept", "Van Gogh", "--model", TINY, "--pool", "2", "--variants", "4", "--out", str(out),
            *extra]


def small_args(ckpt, out, *extra) -> list[str]:
    return ["--concept", "circle", "--model", str(ckpt), "--category", "entity", "--resolution", "32",
            "--pool", "2", "--variants", "4", "--out", str(out), *extra]


def records(out) -> list[dict]:
    return [r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines()) if "step" in r]


def test_bf16_training_on_the_tiny_model_runs_with_fp32_pools(bf16_cpu, tmp_path):
    """--dtype bfloat16: the fp32 trajectory pools enter the bf16 DiT cast to its dtype; every loss is finite
    and the LoRA factors (kept in fp32) move."""
    out = tmp_path / "vg.safetensors"
    train.main(tiny_args(out, "--steps", "3", "--dtype", "bfloat16"))
    recs = records(out)
    assert len(recs) == 3 and all(torch.isfinite(torch.tensor(r["L_erase"])) for r in recs)
    factors, meta = lora_file.read_lora(out)
    assert json.loads(meta["settings"])["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in factors.values())
    assert any(v.abs().sum() > 0 for k, v in factors.items() if k.endswith("lora_B"))


@pytest.mark.parametrize("mode", ["implicit", "exact"])
def test_gradient_checkpointing_trains_the_same_lora(random_ckpt, tmp_path, mode):
    """With --gradient-checkpointing the recomputed layers call the attention probe as the forward did, and
    the LoRA after 3 steps equals the run without checkpointing bit for bit (fp32, same seed)."""
    loras = []
    for flags in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"{mode}{len(flags)}.safetensors"
        train.main(small_args(random_ckpt, out, "--steps", "3", "--mode", mode, "--eps", "0", *flags))
        loras.append(lora_file.read_lora(out)[0])
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
    assert any(loras[0][k].abs().sum() > 0 for k in loras[0] if k.endswith("lora_B"))


def test_the_fingerprint_names_the_checkpoint_not_the_load_dtype(random_ckpt_bf16_te, tmp_path, bf16_cpu):
    """A LoRA trained on the fp32 load of a checkpoint applies to its bf16 load and vice versa; a fine-tuned
    copy of the model (pad token moved) still has another fingerprint."""
    def load(dtype):
        return C.load_zimage(random_ckpt_bf16_te, dtype=dtype, text_encoder=False, vae=False).transformer

    fp32, bf16 = load(torch.float32), load(torch.bfloat16)
    assert lora_file.base_fingerprint(fp32) == lora_file.base_fingerprint(bf16)
    spec = Z.LoRASpec(layers=(0,))
    for src, dst in ((fp32, load(torch.bfloat16)), (bf16, load(torch.float32))):
        Z.add_lora(src, spec) if not Z.lora_modules(src) else None
        path = tmp_path / f"{src.x_pad_token.dtype}.safetensors"
        lora_file.save_lora(path, src, spec, lora_file.base_fingerprint(src), {"concept": "circle"})
        lora_file.apply_loras(dst, [path])  # raises LoRAFileError if the fingerprints disagree
    tuned = load(torch.float32)
    with torch.no_grad():
        tuned.x_pad_token.add_(1e-3)
    tuned.stored_values = None  # as a model built and fine-tuned in code: its own values count
    assert lora_file.base_fingerprint(tuned) != lora_file.base_fingerprint(fp32)


def test_the_generic_preservation_list_leaves_out_prompts_that_name_the_concept():
    """Erasing "cat" (or its alias "kitty") drops "a cat on a sofa" from the generic D_pr, whole words only
    and in any case; the stored per-category list is filtered the same way."""
    got = train.preservation_prompts({}, None, "entity", "Cat", ["Cat", "kitty"])
    assert got == [p for p in train.GENERIC_PRESERVE if p != "a cat on a sofa"]
    stored = {"preserve": {"abstraction": ["a red star", "a star coloured cyan", "RED moon"]}}
    got = train.preservation_prompts(stored, None, "abstraction", "red", ["red"])
    assert got == ["a star coloured cyan"]  # "coloured" contains "red" but is another word


def test_a_preservation_set_that_only_names_the_concept_is_one_clear_error(random_ckpt, tmp_path, capsys):
    """If every preservation prompt names the concept, nothing is left to preserve: one error line, no file;
    a --preserve prompt that names it is refused the same way."""
    for extra in (["--preserve", "a circle and a square"],
                  ["--preserve", "a red star", "--preserve", "CIRCLE"]):
        with pytest.raises(SystemExit) as e:
            train.main(small_args(random_ckpt, tmp_path / "x.safetensors", "--steps", "1", *extra))
        assert e.value.code not in (0, None)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "preserv" in err[0] and "circle" in err[0].lower(), err
    stored = {"preserve": {"entity": ["a circle", "two Circle shapes"]}}
    with pytest.raises(ValueError, match="none is left"):
        train.preservation_prompts(stored, None, "entity", "circle", ["circle"])
    assert not list(tmp_path.iterdir())


def test_the_jvp_change_equals_the_difference_in_fp32(random_ckpt, tmp_path):
    """--gtilde jvp measures ∇L_pr(θ_mid)·Δθ; in fp32 it is Eq. 15's difference L_pr(after) − L_pr(before)
    up to O(‖Δθ‖³), so both give the same g̃ and λ at every step (ε = 0, so λ moves), up to the rounding of
    the difference."""
    recs = {}
    for how in ("difference", "jvp"):
        out = tmp_path / f"{how}.safetensors"
        train.main(small_args(random_ckpt, out, "--steps", "4", "--eps", "0", "--gtilde", how))
        recs[how] = records(out)
    assert all("L_pr_change" in r for r in recs["jvp"]) and all("L_pr_after" in r for r in recs["difference"])
    for a, b in zip(recs["difference"], recs["jvp"]):
        difference = a["L_pr_after"] - a["L_pr_before_measured"]
        assert b["L_pr_change"] == pytest.approx(difference, rel=2e-2, abs=1e-12)
        assert b["g_tilde"] == pytest.approx(a["g_tilde"], rel=2e-2, abs=1e-9)
        assert b["lambda"] == pytest.approx(a["lambda"], rel=2e-2, abs=1e-9)
    assert max(r["lambda"] for r in recs["jvp"]) > 0


def test_in_bf16_g_tilde_follows_the_fp32_run_not_the_rounding(bf16_cpu, tmp_path):
    """bf16 rounding noise in L_pr (~1e-4 on the tiny model) dwarfs one step's change (~1e-7), so Eq. 15's
    difference reads noise; the default in bf16 (--gtilde auto = jvp) stays within ε/4 of the fp32 g̃."""
    g = {}
    for name, extra in (("fp32", []), ("bf16", ["--dtype", "bfloat16"]),
                        ("bf16-difference", ["--dtype", "bfloat16", "--gtilde", "difference"])):
        out = tmp_path / f"{name}.safetensors"
        train.main(tiny_args(out, "--steps", "3", *extra))
        g[name] = [r["g_tilde"] for r in records(out)]
    eps = 1e-3  # Table 6, style
    assert all(abs(a - b) < eps / 4 for a, b in zip(g["bf16"], g["fp32"])), g
    # what the default avoids:
    assert max(abs(a - b) for a, b in zip(g["bf16-difference"], g["fp32"])) > eps, g


def test_attention_in_query_blocks_gives_the_same_velocity(random_ckpt):
    """attention_in_blocks (used by the jvp measurement to bound memory) changes how queries are batched, not
    the result: mixed sizes and caption lengths, block 7 (not a divisor of any length), within 1e-5."""
    dit = C.load_zimage(random_ckpt, text_encoder=False, vae=False).transformer
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(dit.cfg.in_channels, h, w, generator=g) for h, w in ((4, 6), (8, 8))]
    caps = [torch.randn(n, dit.cfg.cap_feat_dim, generator=g) for n in (5, 40)]
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        whole = dit(x, t, caps)
        with M.attention_in_blocks(dit, 7):
            blocked = dit(x, t, caps)
    assert all(a.abs().max() > 1e-2 for a in whole)
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(m.query_block is None for m in dit.modules() if isinstance(m, M.Attention))
