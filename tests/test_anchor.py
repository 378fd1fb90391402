"""--anchor content: erase prompts that pair the concept with content, x_t on their trajectories, and Eq. 5's
target built around v_θ(x_t, content) instead of v_θ(x_t, ∅). Checked on the tiny model (it stores its
concepts' categories and preservation prompts) against a freshly loaded base model."""
from contextlib import ExitStack

import pytest
import torch

import checkpoint as C
import train
import zerase as Z
from sample import denoise, initial_noise, turbo_sigmas

MODEL = train.DEFAULT_MODEL


@pytest.fixture(scope="module")
def zi():
    return C.load_zimage(MODEL, vae=False)


def args_for(tmp_path, *extra):
    return train.parse_args(["--concept", "Monet", "--anchor", "content", "--pool", "3", "--steps", "4",
                             "--out", str(tmp_path / "m.safetensors"), *extra])


@pytest.mark.parametrize("concept", ["Monet", "star", "red"])
def test_content_prompts_name_no_concept_of_the_category(zi, concept):
    """The content paired with a style names no style (an entity: no entity; a colour: no colour), nor the
    concept or its aliases; the draw is a function of the seed."""
    category = zi.defaults["categories"][concept]
    same = [c for c, k in zi.defaults["categories"].items() if k == category]
    aliases = zi.defaults.get("aliases", {}).get(concept, [])
    contents = train.content_prompts(zi.defaults, None, category, [concept] + aliases, 16, 0)
    assert len(contents) == 16 and len(set(contents)) == 16
    assert not [q for q in contents if Z.find_phrases(q, same + aliases)]
    assert contents == train.content_prompts(zi.defaults, None, category, [concept] + aliases, 16, 0)
    assert contents != train.content_prompts(zi.defaults, None, category, [concept] + aliases, 16, 1)


def test_each_erase_prompt_is_its_content_then_the_template_and_its_tokens_are_the_concepts(zi, tmp_path):
    plan = train.check(args_for(tmp_path))
    assert len(plan.anchors) == len(plan.cer_prompts) == 3
    for q, content, toks in zip(plan.cer_prompts, plan.anchors, plan.cer_tokens):
        assert q == f"{content}, An art in the style of Monet"
        spans = zi.tokenizer.encode(q)[1]
        assert toks and "".join(q[spans[j][0]:spans[j][1]] for j in toks).strip() == "Monet"
        assert min(spans[j][0] for j in toks) > len(content)  # the template's tokens, after the content


def test_states_lie_on_their_own_prompts_trajectories_and_the_anchor_is_the_content(zi, tmp_path):
    """State k of trajectory i is sample.py's Euler state under erase prompt i; v_anchor of every state is
    the base model on (x_t, its prompt's content); the step's erase prompt is the state's own."""
    args = args_for(tmp_path)
    plan = train.check(args)
    run = train.prepare(args)
    run.log.close()
    base = C.load_zimage(MODEL, text_encoder=False, vae=False).transformer
    steps, guidance = zi.defaults["steps"], zi.defaults["guidance"]
    n, size = len(plan.cer_prompts), plan.size
    c_er, c_anchor = zi.encode_prompts(plan.cer_prompts), zi.encode_prompts(plan.anchors)
    c_null = zi.encode_prompts([""])[0]
    sig = turbo_sigmas(steps, zi.scheduler.shift)
    x = initial_noise(n, base.cfg.in_channels, size, size, zi.vae_scale_factor, args.seed)
    x = denoise(base, x, c_er, sig[0:2], [c_null] * n, guidance)  # one Euler step: the k = 1 states
    rows = slice(n, 2 * n)
    torch.testing.assert_close(run.erase.x[rows], x, rtol=1e-4, atol=1e-5)
    assert run.erase.prompt_of == [i % n for i in range(n)] * steps
    with torch.no_grad():
        want = base(x, run.erase.t[rows], c_anchor)
        v_c = base(x, run.erase.t[rows], c_er)  # Eq. 5's v_θ(x_t, c_er): the sampler's, kept by the pool
    torch.testing.assert_close(run.erase.v_anchor[rows], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.erase.v_c[rows], v_c, rtol=1e-4, atol=1e-5)
    assert (v_c - want).abs().max() > 1e-2  # the two references differ: neither check passes for the other
    for step in range(4):
        er, _ = train.draw(run, step)
        j = [i for i in range(len(run.erase.x)) if torch.equal(run.erase.x[i:i + 1], er.x)][0]
        assert er.c_er is run.erase.c_er[run.erase.prompt_of[j]]
        assert torch.equal(er.v_anchor, run.erase.v_anchor[j]) and torch.equal(er.v_c, run.erase.v_c[j])
        kept = run.erase.refined  # the state's own (x_t, c_er) after the refiners
        assert torch.equal(er.refined.img[0], kept.img[j]) and torch.equal(er.refined.cap[0], kept.cap[j])
    assert run.refs == (None, None)  # the pool's references served every step: frozen_reference never ran


def test_the_erase_loss_is_eq_5_around_the_content_anchor(zi, tmp_path):
    """With a random LoRA installed, L_erase = ‖v_{θ+Δθ}(x_t, c_er) − (v_a − η (v_θ(x_t, c_er) − v_a))‖² with
    v_a = v_θ(x_t, content) of the base model, not v_θ(x_t, ∅)."""
    args = args_for(tmp_path)
    plan = train.check(args)
    run = train.prepare(args)
    run.log.close()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in Z.lora_modules(run.dit).values():
            m.lora_B.normal_(0.0, 0.3)
    er, pr = train.draw(run, 2)
    with ExitStack() as probed:
        L_erase = train.losses(run, er, pr, probed)[0]
    p = [i for i, c in enumerate(run.erase.c_er) if c is er.c_er][0]
    base = C.load_zimage(MODEL, text_encoder=False, vae=False).transformer
    c_anchor, c_null = zi.encode_prompts([plan.anchors[p]])[0], zi.encode_prompts([""])[0]
    with torch.no_grad():
        v_c, v_a = base(er.x, er.t, [er.c_er])[0], base(er.x, er.t, [c_anchor])[0]
        v_null, v_lora = base(er.x, er.t, [c_null])[0], run.dit(er.x, er.t, [er.c_er])[0]
    eta = plan.eta  # the tiny model's stored η for the category (tests/test_cli_train.py checks which)
    assert L_erase.item() == pytest.approx(Z.erase_loss(v_lora, v_a - eta * (v_c - v_a)).item(), rel=1e-4)
    assert (v_a - v_null).abs().max() > 1e-2  # the anchor is not ∅: the check tells the two apart


@pytest.mark.parametrize("concept, extra, want", [
    ("Monet", [], "content"), ("star", [], "content"), ("red", [], "content"),
    ("a nude figure", ["--category", "nudity", "--force"], "null")])
def test_auto_is_the_anchor_measured_for_the_category_and_the_papers_null_elsewhere(tmp_path, concept, extra,
                                                                                   want):
    """--anchor auto, the default, resolves by the concept's category (train.ANCHOR_BY_CATEGORY) to exactly
    the plan of the explicit flag: the same erase prompts and anchors, and settings that record the resolved
    anchor, so the LoRA it trains is the explicit flag's. A category no sweep measured (nudity, not in the
    tiny world) keeps the paper's ∅."""
    out = ["--out", str(tmp_path / "x.safetensors"), *extra]
    auto = train.check(train.parse_args(["--concept", concept, *out]))
    explicit = train.check(train.parse_args(["--concept", concept, "--anchor", want, *out]))
    assert auto.settings["anchor"] == want and auto.settings == explicit.settings
    assert (auto.cer_prompts, auto.anchors) == (explicit.cer_prompts, explicit.anchors)
    assert bool(auto.anchors) == (want == "content")


def test_auto_falls_back_to_null_only_where_no_prompt_is_free_of_the_category(tmp_path, capsys):
    """--preserve prompts that all name a colour leave no content to pair with a colour: auto then trains
    the paper's ∅ target and says so; an explicit --anchor content is refused; for a style the same prompts
    are content."""
    args = ["--preserve", "a blue heart", "--preserve", "a green tree",
            "--out", str(tmp_path / "x.safetensors")]
    plan = train.check(train.parse_args(["--concept", "red", *args]))
    assert plan.settings["anchor"] == "null" and plan.anchors == []
    assert plan.note.startswith("--anchor auto")
    train.prepare(train.parse_args(["--concept", "red", "--pool", "2", "--steps", "1", *args])).log.close()
    assert capsys.readouterr().err.count("--anchor auto") == 1  # said once per run, by prepare
    with pytest.raises(ValueError, match="--anchor content needs"):
        train.check(train.parse_args(["--concept", "red", "--anchor", "content", *args]))
    style = train.check(train.parse_args(["--concept", "Monet", *args]))
    assert style.settings["anchor"] == "content"
    assert sorted(set(style.anchors)) == ["a blue heart", "a green tree"]
