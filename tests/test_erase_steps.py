"""--erase-steps K: Eq. 5's target and Eq. 6 act on the erase pool's states from the sampler's first K steps;
on the later states of a trajectory the LoRA is trained towards the frozen model's own v_θ(x_t, c_er).
Resolved from the flag, else the model's zerase.json per category, else every step (the paper). Resuming such a
run is tested with the other resume tests (tests/test_train.py)."""
import json
import shutil
from contextlib import ExitStack

import pytest
import torch

import checkpoint as C
import lora_file
import train
import zerase as Z
from sample import turbo_sigmas
from tests.test_cli_sample import refused
from tests.test_train import args

TINY = str(train.DEFAULT_MODEL)


def storing(random_ckpt, tmp_path, defaults: dict):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, ckpt)
    (ckpt / "zerase.json").write_text(json.dumps(defaults))
    return ckpt


def test_erase_steps_is_the_stored_value_for_the_category_else_every_step_and_the_flag_wins(random_ckpt,
                                                                                           tmp_path):
    ckpt = storing(random_ckpt, tmp_path, {"erase_steps": {"entity": 3, "style": 5}})  # args(): an entity
    out = tmp_path / "x.safetensors"
    plan = train.check(train.parse_args(args(ckpt, out)))
    assert plan.erase_steps == plan.settings["erase_steps"] == 3
    assert train.check(train.parse_args(args(ckpt, out, "--erase-steps", "6"))).erase_steps == 6
    # the model's 8 sampler steps or more is every step: the paper's training, recorded as None
    assert train.check(train.parse_args(args(ckpt, out, "--erase-steps", "8"))).erase_steps is None
    assert train.check(train.parse_args(args(random_ckpt, out))).erase_steps is None  # stores none
    stored = C.read_configs(TINY).defaults.get("erase_steps", {})
    for concept in ("Van Gogh", "star", "red"):  # the tiny model: what its zerase.json says, per category
        plan = train.check(train.parse_args(["--model", TINY, "--concept", concept, "--out", str(out)]))
        assert plan.erase_steps == stored.get(plan.category)


@pytest.mark.parametrize("stored", [0, 2.5, "3", True])
def test_a_bad_stored_erase_steps_is_one_line_naming_zerase_json_and_the_flag(random_ckpt, tmp_path, capsys,
                                                                              stored):
    ckpt = storing(random_ckpt, tmp_path, {"erase_steps": {"entity": stored}})
    out = tmp_path / "x.safetensors"
    line = refused(train.main, args(ckpt, out), capsys)
    assert "zerase.json" in line and "erase_steps" in line and "--erase-steps" in line and not out.exists()
    assert train.check(train.parse_args(args(ckpt, out, "--erase-steps", "2"))).erase_steps == 2  # the fix


def test_erase_steps_below_one_is_refused_in_one_line(random_ckpt, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    line = refused(train.main, args(random_ckpt, out, "--erase-steps", "0"), capsys)
    assert "--erase-steps" in line and "at least 1" in line and not out.exists()


@pytest.mark.parametrize("anchor", ["content", "null"])
def test_past_erase_steps_the_target_is_the_frozen_output_and_there_is_no_attention_loss(random_ckpt,
                                                                                         tmp_path, anchor,
                                                                                         monkeypatch):
    """Each draw is kept exactly when its state comes from sampler step K or later; the pool's step index
    agrees with the state's time (t = 1 − σ_k); a kept state's L_erase is measured against v_θ(x_t, c_er)
    and its L_attn is 0, an earlier state's against Eq. 5's target with Eq. 6 on."""
    K = 3
    run = train.prepare(train.parse_args(args(random_ckpt, tmp_path / "x.safetensors", "--erase-steps",
                                              str(K), "--anchor", anchor)))
    sig = turbo_sigmas(8, C.read_configs(random_ckpt).scheduler.shift)
    assert torch.allclose(run.erase.t, 1 - sig[run.erase.k].to(run.erase.t))
    targets = []
    real = Z.erase_loss
    monkeypatch.setattr(Z, "erase_loss", lambda v, target: targets.append(target) or real(v, target))
    seen = set()
    for step in range(40):
        er, pr = train.draw(run, step)
        j = next(i for i in range(len(run.erase.x)) if torch.equal(run.erase.x[i:i + 1], er.x))
        assert er.keep == (int(run.erase.k[j]) >= K)
        with ExitStack() as probed:
            _, L_attn, _ = train.losses(run, er, pr, probed)
        want = er.v_c if er.keep else Z.erase_target(er.v_anchor, er.v_c, run.eta)
        assert torch.equal(targets[-1], want)
        assert (L_attn.item() == 0.0) == er.keep
        seen.add(er.keep)
    assert seen == {True, False}  # both kinds of state were drawn, so both branches were checked


def test_erase_steps_of_every_step_trains_the_papers_lora_and_fewer_steps_another(random_ckpt, tmp_path):
    every, paper, fewer = (tmp_path / f"{n}.safetensors" for n in ("every", "paper", "fewer"))
    train.main(args(random_ckpt, every, "--steps", "4", "--erase-steps", "8"))
    train.main(args(random_ckpt, paper, "--steps", "4"))
    train.main(args(random_ckpt, fewer, "--steps", "4", "--erase-steps", "2"))
    (fe, me), (fp, mp), (ff, mf) = (lora_file.read_lora(f) for f in (every, paper, fewer))
    assert me == mp and json.loads(mf["settings"])["erase_steps"] == 2
    assert all(torch.equal(fe[k], fp[k]) for k in fp)
    assert not all(torch.equal(ff[k], fp[k]) for k in fp)

