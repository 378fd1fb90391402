"""The DiT split in two (model.ZImageTransformer.refine, then .unified) and train.py's use of it: the
pools' refiner outputs are computed once and reused every step.

The split must give forward's outputs however the items are grouped: refined in separate calls, put
together in any order (Refined.cat, .take). train.py's losses and L_pr values from the kept refiner
outputs must equal those computed from the states and prompts, and nothing may be kept where the
refiners train or the outputs would not fit.
"""
from contextlib import ExitStack

import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint as C
import model as M
import train
import zerase as Z
from tests.test_training_math import make_run, randomize_lora_


@pytest.fixture(scope="module")
def dit(random_ckpt):
    return C.load_zimage(random_ckpt, text_encoder=False, vae=False).transformer


item = st.tuples(st.sampled_from([4, 8]), st.sampled_from([4, 8]), st.integers(1, 70))  # latent H, W; tokens


@settings(max_examples=25, deadline=None)
@given(items=st.lists(item, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 5), max_size=3),
       order=st.randoms(use_true_random=False), seed=st.integers(0, 2**16))
def test_items_refined_in_separate_calls_and_reordered_give_forwards_outputs(dit, items, cuts, order, seed):
    """Refine the items in groups (split at `cuts`), cat the groups, take them in a shuffled order with
    repeats: unified's outputs are forward's on those items in that order, sizes and caption lengths mixed."""
    g = torch.Generator().manual_seed(seed)
    C_in, D = dit.cfg.in_channels, dit.cfg.cap_feat_dim
    x = [torch.randn(C_in, h, w, generator=g) for h, w, _ in items]
    t = torch.rand(len(items), generator=g)
    caps = [torch.randn(n, D, generator=g) for _, _, n in items]
    bounds = sorted({0, len(items), *(c for c in cuts if c < len(items))})
    idx = [order.randrange(len(items)) for _ in range(len(items) + 1)]
    with torch.no_grad():
        parts = [dit.refine(x[a:b], t[a:b], caps[a:b]) for a, b in zip(bounds, bounds[1:])]
        got = dit.unified(M.Refined.cat(parts).take(idx))
        want = dit([x[i] for i in idx], t[idx], [caps[i] for i in idx])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_stacked_batch_comes_back_stacked_and_a_list_as_a_list(dit):
    x = torch.randn(3, dit.cfg.in_channels, 4, 4)
    caps = [torch.randn(n, dit.cfg.cap_feat_dim) for n in (2, 9, 33)]
    with torch.no_grad():
        stacked = dit.unified(dit.refine(x, torch.rand(3), caps))
        listed = dit.unified(M.Refined.cat([dit.refine(list(x[:1]), torch.rand(1), caps[:1]),
                                            dit.refine(x[1:], torch.rand(2), caps[1:])]))
    assert torch.is_tensor(stacked) and stacked.shape == x.shape
    assert isinstance(listed, list) and len(listed) == 3


def same_losses(run, a: tuple, b: tuple) -> tuple:
    """L_erase, L_attn, L_pr of a step on draws a and b, (erase sample, preservation batch); equal to
    float rounding. Returns a's."""
    with ExitStack() as probed:
        la = train.losses(run, *a, probed)
    with ExitStack() as probed:
        lb = train.losses(run, *b, probed)
    for u, v in zip(la, lb):
        assert u.item() == pytest.approx(v.item(), rel=1e-5, abs=1e-9)
    return la


def test_the_kept_refiner_outputs_give_the_same_losses_and_l_pr_as_computing_them(random_ckpt, tmp_path):
    """With a trained (randomised) LoRA, for every sample the pool can draw: L_erase, L_attn, L_pr (Eq. 8)
    of a step and pr_value are the same whether the preservation inputs' refiner outputs come from the
    pool or from the states and prompts, and they are kept as the pool's own order ((x_pr, ∅) then
    (x_pr, c_pr) of each drawn state)."""
    run = make_run(random_ckpt, tmp_path, "--pr-batch", "3")
    assert run.preserve.refined is not None and len(run.preserve.refined.img) == 2 * len(run.preserve)
    randomize_lora_(run, seed=1)
    n = len(run.preserve)
    for step in range(0, n, 3):  # every state at least once, in batches of 3 with one repeat
        idx = [step % n, (step + 1) % n, step % n]
        kept = run.preserve.batch(idx)
        fresh = train.PreserveBatch(kept.x, kept.t, kept.c_pr, kept.v_null, kept.v_c)
        er, _ = train.draw(run, step)
        a = same_losses(run, (er, kept), (er, fresh))
        assert a[2].item() > 1e-8  # the LoRA changed the preservation outputs: the comparison is not 0 = 0
        assert train.pr_value(run, kept) == pytest.approx(train.pr_value(run, fresh), rel=1e-5)


def test_the_kept_erase_streams_give_the_same_losses_as_computing_them(tmp_path):
    """--anchor content: each erase state has its own prompt, so the pool keeps (x_t, c_er) after the
    refiners; for every state, L_erase and L_attn from the kept streams equal those from x_t and c_er (with
    a randomised LoRA), and the kept streams are the state's own."""
    argv = ["--concept", "Monet", "--anchor", "content", "--pool", "3", "--steps", "4",
            "--out", str(tmp_path / "m.safetensors")]
    run = train.prepare(train.parse_args(argv))
    run.log.close()
    e = run.erase
    assert e.refined is not None and len(e.refined.img) == len(e.x)
    randomize_lora_(run, seed=2)
    _, pr = train.draw(run, 0)
    for j in range(len(e.x)):
        kept = train.EraseSample(e.x[j:j + 1], e.t[j:j + 1], e.v_anchor[j], e.c_er[e.prompt_of[j]],
                                 e.concept_tokens[e.prompt_of[j]], v_c=e.v_c[j], refined=e.refined.take([j]))
        fresh = train.EraseSample(kept.x, kept.t, kept.v_anchor, kept.c_er, kept.concept_tokens, v_c=kept.v_c)
        assert same_losses(run, (kept, pr), (fresh, pr))[0].item() > 1e-8  # not 0 = 0
    # the anchor ∅ pairs a state with any variant: nothing fixed to keep
    argv = ["--concept", "Monet", "--anchor", "null", "--pool", "3", "--steps", "4",
            "--out", str(tmp_path / "n.safetensors")]
    null = train.prepare(train.parse_args(argv))
    null.log.close()
    assert null.erase.refined is None and null.erase.v_c is None


def test_nothing_is_kept_when_the_refiners_train_or_the_outputs_would_not_fit(random_ckpt, tmp_path,
                                                                               monkeypatch):
    run = make_run(random_ckpt, tmp_path)
    assert not train.refiners_train(run.dit) and run.preserve.refined is not None

    def lora_and_refiner(dit, spec, seed=0):  # an adapter that also trains a refiner weight
        params = Z.add_lora(dit, spec, seed)
        dit.noise_refiner[0].attention.to_q.weight.requires_grad_(True)
        return params + [dit.noise_refiner[0].attention.to_q.weight]

    argv = ["--concept", "circle", "--model", str(random_ckpt), "--category", "entity", "--resolution", "32",
            "--pool", "2", "--variants", "4", "--out", str(tmp_path / "y.safetensors")]
    trains = train.prepare(train.parse_args(argv), adapt=lora_and_refiner)
    trains.log.close()
    assert train.refiners_train(trains.dit) and trains.preserve.refined is None

    pool, dit = run.preserve, run.dit
    seq = dit.layout([tuple(pool.x.shape[-2:])], [max(len(c) for c in pool.c_pr + [run.c_null])]).seq_len
    need = 2 * len(pool) * seq * (dit.cfg.dim * 4 + dit.cfg.head_dim // 2 * 8)  # fp32 tokens, complex64 RoPE
    monkeypatch.setattr(train, "REFINED_BUDGET", need)
    assert train.refine_pool(dit, pool, run.c_null) is not None
    monkeypatch.setattr(train, "REFINED_BUDGET", need - 1)
    assert train.refine_pool(dit, pool, run.c_null) is None
