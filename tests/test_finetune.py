"""finetune.py, the full fine-tuning baseline: it changes only the targeted weights (all of them), Eq. 5's
frozen reference comes from θ_0 while those weights move, and its file puts exactly the trained weights back
into a fresh model of the same base (and refuses another)."""
import pytest
import torch

import checkpoint as C
import finetune
import train
from model import CheckpointError

MODEL = train.DEFAULT_MODEL
LAYERS, TARGETS = (0, 2), ("to_q", "to_v")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "vg.safetensors"
    args = finetune.parse_args(["--concept", "Van Gogh", "--steps", "3", "--pool", "2", "--variants", "2",
                                "--layers", ",".join(map(str, LAYERS)), "--targets", ",".join(TARGETS),
                                "--lr", "1e-3", "--out", str(out)])
    run, full = finetune.run_finetune(args)
    return run, full, out


def fresh():
    return C.load_zimage(MODEL, text_encoder=False, vae=False).transformer


def test_only_the_targeted_weights_change_and_all_of_them_do(trained):
    run, _, _ = trained
    base = dict(fresh().named_parameters())
    changed = {k for k, w in run.dit.named_parameters() if not torch.equal(w, base[k])}
    assert changed == {f"layers.{i}.attention.{t}.weight" for i in LAYERS for t in TARGETS}


def test_the_frozen_reference_is_theta_0_while_the_weights_move(trained):
    """A chunk of references computed after training (a step no chunk has covered yet) equals the base
    model's velocity on the same draw (to float rounding: the chunk is one batched call), far closer than
    the trained model is; the trained weights are back afterwards."""
    run, full, _ = trained
    trained_w = {k: w.detach().clone() for k, w in full.params.items()}
    step = 10 * run.ref_chunk * (run.args.steps + 1)
    er, _ = train.draw(run, step)
    with torch.no_grad():
        v_base = fresh()(er.x, er.t, [er.c_er])[0]
        v_now = run.dit(er.x, er.t, [er.c_er])[0]
    off, moved = (er.v_c - v_base).abs().max().item(), (v_now - v_base).abs().max().item()
    assert off < 1e-5 and moved > 1e3 * off, (off, moved)
    assert all(torch.equal(w, trained_w[k]) for k, w in full.params.items())


def test_the_file_puts_the_trained_weights_into_a_fresh_model(trained):
    run, _, out = trained
    dit = fresh()
    meta = finetune.apply_finetune(dit, out)
    assert meta["concept"] == "Van Gogh"
    ours, theirs = dict(dit.named_parameters()), dict(run.dit.named_parameters())
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_another_base_model_is_refused(trained):
    _, _, out = trained
    dit = fresh()
    dit.stored_values = {k: v + 1 for k, v in dit.stored_values.items()}  # as another checkpoint stores
    with pytest.raises(CheckpointError, match="base model"):
        finetune.apply_finetune(dit, out)


@pytest.mark.parametrize("flags, says", [(["--losses", "erase,pr"], "--losses"),
                                         (["--resume"], "--resume")])
def test_what_it_cannot_do_is_one_line(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--concept", "Van Gogh", "--out", str(tmp_path / "x.safetensors"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and says in err
    assert not list(tmp_path.iterdir())


def test_a_nan_loss_is_one_line_and_exit_3_with_no_file(tmp_path, capsys, monkeypatch):
    def nan_step(run, step):
        raise train.NonFiniteLoss(step + 1)
    monkeypatch.setattr(train, "fixed_step", nan_step)
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as e:
        finetune.main(["--concept", "Van Gogh", "--pool", "2", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3 and "NaN/inf at step 1" in err[-1] and not out.exists()
