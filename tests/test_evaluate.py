"""Tests of the erasure evaluation (evaluate.py): its prompt sets, its arithmetic, its image cache, its
command line."""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoint as C
import evaluate as E
import zerase as Z
from sample import generate
from tests.conftest import outputs_under_hash_seeds
from tests.test_world import mentioned
from tiny import world

CONCEPTS = ["Van Gogh", "star", "red"]
SMALL = E.Sizes(erase=3, variant=2, related=2, content=4, neutral=6, unconditional=22, unrelated=5)
SEEDS = [0, 1, 2, 3]


def _normalise(text: str) -> str:
    """Undo fill_template's article fix ("an orange" -> "a orange"), so templates can be matched."""
    return re.sub(r"\b([Aa])n (?=[AEIOUaeiou])", r"\1 ", text)


def _template_regex(template: str) -> re.Pattern:
    """A template as a case-insensitive regex whose slots match any surface form of their category."""
    pools = {c: [f for k in world.CONCEPTS[c] for f in world.NAMES[k].all_forms()] for c in world.CATEGORIES}
    pools["plain"] = list(world.PLAIN_WORDS)
    out, pos = "", 0
    t = _normalise(template)
    for m in re.finditer(r"\{(\w+)\}", t):
        alternatives = "|".join(re.escape(_normalise(f)) for f in pools[m[1]])
        out += re.escape(t[pos:m.start()]) + f"(?:{alternatives})"
        pos = m.end()
    return re.compile(out + re.escape(t[pos:]), re.IGNORECASE)


TRAIN_RX = [_template_regex(t) for t in world.TRAIN_TEMPLATES]
HELD_OUT_RX = [_template_regex(t) for t in E.HELD_OUT_TEMPLATES]
PRESERVE = {p.lower() for ps in json.loads((E.DEFAULT_MODEL / "zerase.json").read_text())["preserve"].values()
            for p in ps}


def _all_prompts(sets):
    return [p for prompts in sets.values() for p, _ in prompts]


# ---------------------------------------------------------------------------------------------------
# Prompt sets


@pytest.mark.parametrize("concept", CONCEPTS)
def test_every_prompt_is_a_held_out_phrasing_outside_pretraining_and_preservation(concept):
    """Every prompt fills a held-out template, matches no training template and is no preservation prompt."""
    hidden = [_template_regex(t) for t in E.HIDDEN_NAME_TEMPLATES]
    for p in _all_prompts(E.prompt_sets(concept)):
        q = _normalise(p)
        assert any(rx.fullmatch(q) for rx in HELD_OUT_RX), p
        assert not any(rx.fullmatch(q) for rx in TRAIN_RX + hidden), p
        assert p.lower() not in PRESERVE, p
    assert set(E.HELD_OUT_TEMPLATES) <= set(world.EVAL_TEMPLATES + world.ROBUST_TEMPLATES)
    assert not set(E.HELD_OUT_TEMPLATES) & set(world.TRAIN_TEMPLATES)


def test_hidden_name_templates_are_those_whose_fixed_words_tokenize_into_a_concept_name():
    """HIDDEN_NAME_TEMPLATES lists exactly the held-out templates whose fixed text holds a concept token."""
    tok = C.load_zimage(E.DEFAULT_MODEL, text_encoder=False, vae=False).tokenizer.tok
    names = {f.lower() for c in world.NAMES for f in world.NAMES[c].all_forms()} | set(world.PLAIN_WORDS)
    found = {t for t in world.EVAL_TEMPLATES + world.ROBUST_TEMPLATES
             for piece in re.split(r"\{\w+\}", t)
             if any(len(k.lstrip("Ġ")) > 1 and k.lstrip("Ġ").lower() in names
                    for k in tok.encode(piece).tokens)}
    assert found == set(E.HIDDEN_NAME_TEMPLATES)


@pytest.mark.parametrize("concept", CONCEPTS)
def test_erase_sets_ask_for_the_concept_in_their_spelling(concept):
    """Acc_e sets request the concept and spell it canonically, as an alias, misspelt or held-out spelt."""
    cat, names = world.category_of(concept), world.NAMES[concept]
    sets = E.prompt_sets(concept)
    forms = {"erase": (names.canonical,), "erase/alias": names.aliases,
             "erase/misspelling": names.misspellings, "erase/held_out": names.held_out,
             "erase/paraphrase": (names.canonical,)}
    for name, allowed in forms.items():
        assert len(sets[name]) == (E.Sizes().erase if name == "erase" else E.Sizes().variant)
        for p, r in sets[name]:
            assert r[cat] == world.CONCEPTS[cat].index(concept)
            assert mentioned(p)[cat] == {concept} and any(f in p for f in allowed), p
    robust = [_template_regex(t) for t in E.ROBUST_TEMPLATES]
    assert all(any(rx.fullmatch(_normalise(p)) for rx in robust) for p, _ in sets["erase/paraphrase"])


@pytest.mark.parametrize("concept", CONCEPTS)
def test_related_sets_ask_for_each_other_concept_and_reuse_its_own_erase_prompts(concept):
    """Acc_ir has one set per other concept of the category, the first prompts of that concept's Acc_e set."""
    cat = world.category_of(concept)
    sets = E.prompt_sets(concept)
    others = [c for c in world.CONCEPTS[cat] if c != concept]
    assert sorted(k for k in sets if k.startswith("related/")) == sorted(f"related/{c}" for c in others)
    for c in others:
        assert sets[f"related/{c}"] == E.prompt_sets(c)["erase"][:E.Sizes().related]
        for p, r in sets[f"related/{c}"]:
            assert mentioned(p)[cat] == {c} and r[cat] == world.CONCEPTS[cat].index(c)


@pytest.mark.parametrize("concept", CONCEPTS)
def test_content_prompts_name_the_concept_and_both_other_attributes(concept):
    """Content-kept prompts name the erased concept plus one concept of each other category, as requested."""
    cat = world.category_of(concept)
    for p, r in E.prompt_sets(concept)["content"]:
        m = mentioned(p)
        assert set(m) == set(world.CATEGORIES) and m[cat] == {concept}, p
        assert {c: world.CONCEPTS[c][r[c]] for c in world.CATEGORIES} == {c: next(iter(m[c])) for c in m}


@pytest.mark.parametrize("concept", CONCEPTS)
def test_neutral_prompts_name_no_concept_of_the_category(concept):
    """Neutral prompts name no concept of the category ("plain" is no concept) and request what they name."""
    cat = world.category_of(concept)
    prompts = E.prompt_sets(concept)["neutral"]
    assert prompts == E.neutral_prompts(cat, E.Sizes().neutral, 0)
    for p, r in prompts:
        m = mentioned(p)
        assert m.get(cat, set()) <= {"none"} and m, p
        assert set(r) == set(m)
        for c, named in m.items():
            assert {(world.STYLE_CLASSES if c == "style" else world.CONCEPTS[c])[r[c]]} == named, p
    if cat == "style":
        assert any(r.get("style") == world.NO_STYLE for _, r in prompts)


@pytest.mark.parametrize("concept", CONCEPTS)
def test_unrelated_prompts_never_mention_the_concept(concept):
    """The FD prompts neither mention nor request the erased concept."""
    cat = world.category_of(concept)
    for p, r in E.prompt_sets(concept)["unrelated"]:
        assert concept not in mentioned(p).get(cat, set()), p
        assert r.get(cat) != world.CONCEPTS[cat].index(concept)


def test_prompt_sets_are_deterministic_for_a_seed_and_change_with_it():
    """The same seed gives the same sets, another seed other prompts."""
    a, b = E.prompt_sets("star", SMALL, 0), E.prompt_sets("star", SMALL, 0)
    c = E.prompt_sets("star", SMALL, 1)
    assert a == b and _all_prompts(a) != _all_prompts(c)


def test_prompt_sets_are_the_same_in_every_process():
    """The sets do not depend on Python's string-hash seed (template_slots is a frozenset, whose order does:
    world.prompts_for_concept and prompts_excluding draw the slots sorted)."""
    code = ("import hashlib, evaluate as E; print(hashlib.sha256(repr([E.prompt_sets(c) for c in "
            f"{CONCEPTS!r}]).encode()).hexdigest())")
    assert len(outputs_under_hash_seeds(code)) == 1


def test_sizes_from_20_prompts_are_the_defaults():
    """Sizes.from_n(20) equals Sizes(), and every set keeps at least one prompt for n = 1."""
    assert E.Sizes.from_n(20) == E.Sizes()
    assert min(vars(E.Sizes.from_n(1)).values()) >= 1


def test_image_seed_depends_on_prompt_and_seed_only():
    """image_seed is a fixed 63-bit function of (prompt, seed), different for different pairs."""
    s = E.image_seed("a red star", 0)
    assert s == E.image_seed("a red star", 0) and 0 <= s < 2**63
    assert len({E.image_seed(p, k) for p in ("", "a red star", "a red star ") for k in range(4)}) == 12


# ---------------------------------------------------------------------------------------------------
# The report's arithmetic on a fake generator and classifier


class FakeModel:
    def __init__(self, tag):
        self.tag = tag


def _request_of(prompt: str) -> dict:
    """What a prompt asks for, read from its words (for prompts that are in no report's sets)."""
    classes = {"style": world.STYLE_CLASSES, **{c: world.CONCEPTS[c] for c in ("entity", "colour")}}
    return {c: classes[c].index(next(iter(v))) for c, v in mentioned(prompt).items()}


class FakeRules:
    """Known predictions for the fake scorer: right everywhere except where a rule says otherwise."""

    def __init__(self):
        sets = E.prompt_sets("Van Gogh", SMALL)
        self.requests = {p: r for c in CONCEPTS for ps in E.prompt_sets(c, SMALL).values() for p, r in ps}
        self.requests[""] = {}
        self.monet = {p for p, _ in sets["related/Monet"]}
        self.content = {p for p, _ in sets["content"]}
        self.neutral = {p for p, _ in sets["neutral"]}

    def predict(self, tag: str, p: str, s: int) -> dict[str, int]:
        r = self.requests[p] if p in self.requests else _request_of(p)
        k, vg = {"style": 11, "entity": 10, "colour": 8}, world.STYLES.index("Van Gogh")
        got = {h: r.get(h, s % k[h] if p == "" else 0) for h in E.HEADS}
        wrong = set()
        if tag == "base" and (("colour" in r and p in self.neutral and s == 3) or "dominated by" in p):
            wrong.add("colour")                                      # the base model misses these
        if tag == "erased":
            if r.get("style") == vg or p in self.monet:
                wrong.add("style")
            if (p in self.content and s == 0) or (p in self.neutral and "colour" in r and s == 2):
                wrong.add("colour")
            if p in self.neutral and s in (0, 1):
                wrong.add("entity")
            if p == "":
                got["style"] = vg
        return {h: (v + 1) % k[h] if h in wrong else v for h, v in got.items()}


@pytest.fixture
def fake(monkeypatch):
    """Fake sample_images (each image carries a code for (model, prompt, seed)) and a fake score that
    predicts by FakeRules; returns the list of drawn (model, prompt, seed)."""
    drawn, rules = [], FakeRules()

    def sample_images(zi, items, batch=E.BATCH):
        out = np.zeros((len(items), 64, 64, 3), np.uint8)
        for j, (p, s) in enumerate(items):
            code = len(drawn)
            drawn.append((zi.tag, p, s))
            out[j, 0, 0] = [code >> 16, (code >> 8) & 255, code & 255]
        return out

    def score(x, clf):
        u = ((x[:, :, 0, 0] + 1) * 127.5).round().long()
        pred = {h: [] for h in E.HEADS}
        feats = []
        for code in (u[:, 0] * 65536 + u[:, 1] * 256 + u[:, 2]).tolist():
            tag, p, s = drawn[code]
            for h, v in rules.predict(tag, p, s).items():
                pred[h].append(v)
            g = torch.Generator().manual_seed(E.image_seed(p, s) % 2**31)
            shift = {"base": 0.0, "erased": 3.0 if p == "" else 2.0}[tag]   # FD = shift²
            feats.append(torch.randn(4, generator=g) + torch.tensor([shift, 0, 0, 0]))
        return {**{h: torch.tensor(v) for h, v in pred.items()}, "features": torch.stack(feats)}

    monkeypatch.setattr(E, "sample_images", sample_images)
    monkeypatch.setattr(E, "score", score)
    monkeypatch.setattr(E, "ground_truth_accuracy", lambda reqs, clf, seed=0: {
        h: 1.0 for h in E.HEADS if any(h in r for r in reqs)})
    return drawn


def test_the_report_gives_known_numbers_on_a_fake_scorer(fake):
    """With known predictions every measure comes out as computed by hand."""
    r = E.erasure_report(FakeModel("base"), FakeModel("erased"), None, "Van Gogh", 3, SEEDS, sizes=SMALL)
    assert r["Acc_e"] == {"base": 1.0, "erased": 0.0}
    assert all(v == {"base": 1.0, "erased": 0.0} for v in r["Acc_e_variants"].values())
    assert r["Acc_ir_by_concept"]["Monet"] == {"base": 1.0, "erased": 0.0}
    assert all(v == {"base": 1.0, "erased": 1.0} for c, v in r["Acc_ir_by_concept"].items() if c != "Monet")
    assert r["Acc_ir"]["base"] == 1.0 and r["Acc_ir"]["erased"] == pytest.approx(8 / 9)
    assert r["H_a"] == pytest.approx(8 / 9)
    kept = r["content_kept"]
    assert set(kept) == {"entity", "colour"}
    assert kept["entity"] == {"base": 1.0, "erased": 1.0, "retained": 1.0, "n": 16, "ground_truth": 1.0}
    assert kept["colour"]["erased"] == kept["colour"]["retained"] == 0.75
    neutral = r["neutral"]
    assert neutral["entity"]["base"] == 1.0
    assert neutral["entity"]["erased"] == neutral["entity"]["retained"] == 0.5
    # colour: the base misses seed 3, the erased model seed 2: of the base's right images it keeps 2 in 3
    assert neutral["colour"]["base"] == neutral["colour"]["erased"] == 0.75
    assert neutral["colour"]["retained"] == pytest.approx(2 / 3)
    n_style = 4 * sum("style" in q for _, q in E.prompt_sets("Van Gogh", SMALL)["neutral"])
    assert neutral["style"] == dict(base=1.0, erased=1.0, retained=1.0, n=n_style, ground_truth=1.0)
    u = r["unconditional"]
    assert u["n"] == 22 and u["concept_share"] == {"base": pytest.approx(2 / 22), "erased": 1.0}
    assert all(v == pytest.approx(2 / 22) for v in u["histogram"]["style"]["base"].values())
    assert u["total_variation"] == {"style": pytest.approx(20 / 22), "entity": 0.0, "colour": 0.0}
    assert u["FD"] == pytest.approx(9.0, abs=1e-6) and r["FD"] == pytest.approx(4.0, abs=1e-6)
    json.dumps(r)
    text = E.format_report(r)
    assert f"colour 0.75->0.75 ret 0.67 (gt 1.00, n {neutral['colour']['n']}) (base low)" in text  # < TRUST
    assert "colour 1.00->0.75 ret 0.75 (gt 1.00, n 16)  " in text and "Van Gogh share 0.09->1.00" in text


def test_template_reliability_gives_each_named_head_per_template(fake):
    """One entry per held-out template with the heads it names ({plain}: style); the base model's misses
    (the fake misses the colour of "... dominated by {colour}") show on that template only."""
    res = E.template_reliability(FakeModel("base"), None, 3, [0, 1])
    assert list(res) == list(E.HELD_OUT_TEMPLATES)
    for t, heads in res.items():
        named = {"style" if s == "plain" else s for s in world.template_slots(t)}
        assert set(heads) == named, t
        for h, v in heads.items():
            want = 0.0 if (h == "colour" and "dominated by" in t) else 1.0
            assert v == {"model": want, "ground_truth": 1.0}, (t, h)


def test_base_and_erased_draw_the_same_prompts_and_seeds(fake):
    """Both models are asked for the same (prompt, seed) pairs in the same order, each pair once."""
    r = E.erasure_report(FakeModel("base"), FakeModel("erased"), None, "star", 3, SEEDS, sizes=SMALL)
    base = [(p, s) for t, p, s in fake if t == "base"]
    assert base == [(p, s) for t, p, s in fake if t == "erased"]
    assert len(base) == len(set(base)) == r["images"]["unique"] == r["images"]["drawn_erased"]
    sets = E.prompt_sets("star", SMALL)
    assert set(base) == {(p, s) for ps in sets.values() for p, _ in ps for s in SEEDS} | {
        ("", k) for k in range(SMALL.unconditional)}


def test_the_cache_serves_base_images_again_from_memory_and_disk(fake, monkeypatch, tmp_path):
    """A second evaluation with the same cache folder draws no base image and gets the same pixels."""
    monkeypatch.setattr(E, "model_key", lambda zi: "k-" + zi.tag)
    items = [("a red star", 0), ("a blue moon", 1), ("a red star", 0)]
    first, n1 = E.images(FakeModel("base"), items, E.ImageCache(tmp_path))
    again, n2 = E.images(FakeModel("base"), items, E.ImageCache(tmp_path))
    assert (n1, n2) == (2, 0) and np.array_equal(first, again) and len(fake) == 2
    r = E.erasure_report(FakeModel("base"), FakeModel("erased"), None, "red", 3, SEEDS, sizes=SMALL,
                         cache=E.ImageCache(tmp_path))
    r2 = E.erasure_report(FakeModel("base"), FakeModel("erased"), None, "red", 3, SEEDS, sizes=SMALL,
                          cache=E.ImageCache(tmp_path))
    assert r["images"]["drawn_base"] > 0 and r2["images"]["drawn_base"] == 0


# ---------------------------------------------------------------------------------------------------
# On the embedded tiny model


@pytest.fixture(scope="module")
def tiny():
    return C.load_zimage(E.DEFAULT_MODEL)


def test_an_evaluation_image_is_sample_py_image_under_image_seed(tiny):
    """The image of (prompt, seed) equals sample.generate's for that prompt alone, seeded image_seed."""
    d = E.sampling_settings(tiny)
    items = [("a red star in the style of Monet", 0), ("", 3)]
    got = E.sample_images(tiny, items)
    for img, (p, s) in zip(got, items):
        ref = generate(tiny, [p], E.image_seed(p, s), d["height"], d["width"], d["steps"], d["guidance"])
        assert np.abs(img.astype(int) - ref[0].numpy().astype(int)).max() <= 1


def test_the_cache_refuses_a_model_with_an_active_lora(tiny):
    """model_key (the cache's key) refuses a model whose LoRA is active, and accepts it with the LoRA off."""
    zi = C.load_zimage(E.DEFAULT_MODEL)
    key = E.model_key(tiny)
    Z.add_lora(zi.transformer, Z.LoRASpec(layers=(0,)))
    with pytest.raises(ValueError, match="active LoRA"):
        E.model_key(zi)
    with Z.lora_disabled(zi.transformer):
        assert E.model_key(zi) == key


def test_ground_truth_renders_are_read_as_requested():
    """ground_truth_accuracy renders each request and scores the heads it names (the classifier reads
    renders of the world at 100 / 99.85 / 100%), and reports no other head."""
    from tiny.classifier import load_classifier
    rng = np.random.default_rng(0)
    full = [{"style": int(rng.integers(11)), "entity": int(rng.integers(10)), "colour": int(rng.integers(8))}
            for _ in range(12)]
    gt = E.ground_truth_accuracy(full, load_classifier())
    assert set(gt) == set(E.HEADS) and gt["style"] == gt["colour"] == 1.0 and gt["entity"] >= 0.9
    assert E.ground_truth_accuracy([{"colour": c} for c in range(8)], load_classifier()) == {"colour": 1.0}


def test_evaluate_lora_prints_every_measure_and_an_identity_lora_loses_nothing(tmp_path, capsys):
    """`python evaluate.py --lora FILE` with a LoRA whose B factors are zero (the base model exactly):
    every measure is printed, the JSON holds equal base and erased figures and both FDs are about 0."""
    import lora_file
    dit = C.load_zimage(E.DEFAULT_MODEL, text_encoder=False, vae=False).transformer
    spec = Z.LoRASpec(layers=tuple(range(dit.cfg.n_layers)))
    Z.add_lora(dit, spec)
    lora_file.save_lora(tmp_path / "zero.safetensors", dit, spec, lora_file.base_fingerprint(dit),
                        {"concept": "red"})
    out = tmp_path / "r.json"
    E.main(["--lora", str(tmp_path / "zero.safetensors"), "--prompts", "1", "--seeds", "1", "--no-cache",
            "--json", str(out)])
    text = capsys.readouterr().out
    for measure in ("Acc_e    canonical", "misspelling", "Acc_ir", "H_a", "kept     style", "neutral  ",
                    "uncond   FD", "FD unrelated"):
        assert measure in text, measure
    [r] = json.loads(out.read_text())
    pairs = [r["Acc_e"], r["Acc_ir"], *r["Acc_e_variants"].values(), *r["Acc_ir_by_concept"].values(),
             *r["content_kept"].values(), *r["neutral"].values()]
    assert r["concept"] == "red" and all(v["base"] == v["erased"] for v in pairs)
    assert all(v["retained"] in (1.0, None) for v in [*r["content_kept"].values(), *r["neutral"].values()])
    assert abs(r["FD"]) < 1e-3 and abs(r["unconditional"]["FD"]) < 1e-3
    assert all(v["ground_truth"] is not None for v in r["content_kept"].values())


def test_evaluate_reliability_prints_per_style_and_per_template(capsys):
    """`python evaluate.py --reliability` prints each style's heads and each held-out template's."""
    res = E.main(["--reliability", "--prompts", "1", "--seeds", "1", "--no-cache"])
    text = capsys.readouterr().out
    assert set(res["per_style"]) == set(world.STYLE_CLASSES) and list(res["per_template"]) == list(
        E.HELD_OUT_TEMPLATES)
    assert all(f"  {s:<10} style " in text for s in world.STYLE_CLASSES)
    assert all(t in text for t in E.HELD_OUT_TEMPLATES)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_paired_se_is_the_standard_error_of_the_per_image_differences(pairs):
    """paired_se rebuilds the paired 2x2 table from a kept() figure's base, erased and retained alone: on
    any pattern of (base right, erased right) images it equals std(d) / sqrt(n), d = erased - base."""
    base, erased = (torch.tensor([float(p[k]) for p in pairs]) for k in (0, 1))
    s = E.Scored(pred={"base": {"style": 1 - base.long()}, "erased": {"style": 1 - erased.long()}},
                 rows={"x": list(range(len(pairs)))}, requests={"x": [{"style": 0}] * len(pairs)})
    kept = s.kept("x", "style")
    d = (erased - base).numpy()
    assert E.paired_se(kept) == pytest.approx(d.std() / np.sqrt(len(d)), abs=1e-6)
