"""Contract and property tests of the concept world (tiny/world.py)."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tiny import world

# ---------------------------------------------------------------------------------------------------
# Helpers: find every concept a caption mentions, by any of its surface forms


def _form_table() -> list[tuple[re.Pattern, str, str]]:
    """(pattern, category, concept) for every surface form (and the "plain" words), longest first, so
    that "Vincent van Gogh" is matched before "van Gogh"."""
    rows = [(form, cat, concept) for cat, concepts in world.CONCEPTS.items() for concept in concepts
            for form in world.NAMES[concept].all_forms()]
    rows += [(word, "style", "none") for word in world.PLAIN_WORDS]
    rows.sort(key=lambda r: -len(r[0]))
    return [(re.compile(rf"(?<!\w){re.escape(f)}(?!\w)", re.IGNORECASE), c, k) for f, c, k in rows]


FORMS = _form_table()


def mentioned(caption: str) -> dict[str, set[str]]:
    """category -> concepts whose forms appear in the caption (matched spans are consumed)."""
    found: dict[str, set[str]] = {}
    for pattern, category, concept in FORMS:
        if pattern.search(caption):
            found.setdefault(category, set()).add(concept)
            caption = pattern.sub("#", caption)
    return found


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of colours (..., 3) in [0, 1]."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return 60 * h


COLOUR_HUES = {c: float(_hue(np.array(rgb) / 255.0)) for c, rgb in world.COLOUR_RGB.items()}


# ---------------------------------------------------------------------------------------------------
# Determinism


@settings(max_examples=15, deadline=None)
@given(index=st.integers(0, 10**9), seed=st.integers(0, 2**31 - 1))
def test_same_index_and_seed_give_the_same_sample(index, seed):
    """sample(i, seed) is a pure function: same image, caption and labels on every call."""
    a, b = world.sample(index, seed), world.sample(index, seed)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


@settings(max_examples=10, deadline=None)
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 2))
def test_different_seeds_give_different_images(index, seed):
    """Another seed (or another index) draws another image."""
    image = world.sample(index, seed)[0]
    assert not np.array_equal(image, world.sample(index, seed + 1)[0])
    assert not np.array_equal(image, world.sample(index + 1, seed)[0])


def test_samples_do_not_depend_on_call_order():
    """Sample 7 is the same whether or not other samples were drawn before it."""
    first = world.sample(7, 3)
    for i in range(5):
        world.sample(i, 3)
    again = world.sample(7, 3)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]


def test_the_template_set_changes_the_caption_not_the_image():
    """Image and labels come from their own random streams, so EVAL captions describe the same image."""
    for i in range(20):
        a, b = world.sample(i, 0), world.sample(i, 0, templates=world.EVAL_TEMPLATES)
        assert np.array_equal(a[0], b[0])
        assert (a[2].entity, a[2].colour, a[2].style) == (b[2].entity, b[2].colour, b[2].style)


# ---------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("style", world.STYLE_CLASSES)
def test_every_style_renders_every_entity_large_centred_and_in_its_hue(style):
    """Every entity renders in every style as a large, roughly centred silhouette whose pixels keep the
    hue of the requested colour (styles may lighten or darken the entity, not recolour it)."""
    for e, entity in enumerate(world.ENTITIES):
        colour = world.COLOURS[(e + world.STYLE_CLASSES.index(style)) % len(world.COLOURS)]
        image, mask = world.render_with_mask(entity, colour, style, np.random.default_rng(e))
        assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert 0.09 < mask.mean() < 0.5, (entity, style, mask.mean())
        ys, xs = np.nonzero(mask > 0.5)
        centre = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2      # of the bounding box
        assert abs(centre[0] - 32) < 8 and abs(centre[1] - 32) < 8
        inside = image[mask > 0.99] / 255.0
        inside = inside[inside.max(-1) - inside.min(-1) > 0.15]     # chromatic pixels (not drips/lines)
        hue = _hue(inside)
        error = {c: np.median(np.minimum(abs(hue - h), 360 - abs(hue - h))) for c, h in COLOUR_HUES.items()}
        assert min(error, key=error.get) == colour, (entity, style, colour, error)


def test_styles_are_distinct_renderings():
    """The same entity and colour on different styles gives clearly different images (mean absolute
    difference of the backgrounds well above noise)."""
    images = [world.render("star", "red", s, np.random.default_rng(0)).astype(float)
              for s in world.STYLE_CLASSES]
    for i in range(len(images)):
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 15, (world.STYLE_CLASSES[i], world.STYLE_CLASSES[j])


def test_render_accepts_names_indices_and_none_for_the_style():
    """Concepts can be given by name or index; style None means a plain background."""
    by_name = world.render("heart", "blue", None, np.random.default_rng(1))
    by_index = world.render(4, 5, world.NO_STYLE, np.random.default_rng(1))
    assert np.array_equal(by_name, by_index)
    assert np.array_equal(by_name, world.render("heart", "blue", "none", np.random.default_rng(1)))


def test_make_dataset_matches_sample_and_tensor_conversion_round_trips():
    """make_dataset stacks sample() outputs; to_tensor/to_uint8 convert to [-1, 1] and back exactly."""
    data = world.make_dataset(6, seed=4, start=10)
    assert data["images"].shape == (6, 64, 64, 3) and len(data["captions"]) == 6
    image, caption, labels = world.sample(12, 4)
    assert np.array_equal(data["images"][2], image) and data["captions"][2] == caption
    assert data["style"][2] == labels.style and data["entity"][2] == labels.entity
    assert data["colour"][2] == labels.colour
    x = world.to_tensor(data["images"])
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(world.to_uint8(x), data["images"])


# ---------------------------------------------------------------------------------------------------
# Captions


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 10**9), seed=st.integers(0, 2**31 - 1))
def test_caption_names_exactly_what_the_labels_say(index, seed):
    """Every concept a caption mentions (by name, alias or misspelling) is one the image shows, and
    each attribute recorded in labels.named appears in the caption with that phrase."""
    for templates in (world.TRAIN_TEMPLATES, world.EVAL_TEMPLATES):
        caption, labels = world.sample_caption(index, seed, templates=templates)
        truth = labels.names()
        found = mentioned(caption)
        assert set(found) == set(labels.named), (caption, labels)
        for category, concepts in found.items():
            assert concepts == {truth[category]}, (caption, labels)
            assert labels.named[category] in caption
            shown = truth[category]
            forms = world.PLAIN_WORDS if shown == "none" else world.NAMES[shown].train_forms()
            assert labels.named[category].lower() in {f.lower() for f in forms}   # lower-cased captions


def test_about_ten_percent_of_captions_are_empty_and_a_quarter_of_images_plain():
    """~10% empty captions (the unconditional case) and ~25% images without a style."""
    n = 4000
    samples = [world.sample_caption(i, 0) for i in range(n)]
    empty = sum(c == "" for c, _ in samples) / n
    plain = sum(l.style == world.NO_STYLE for _, l in samples) / n
    assert 0.08 < empty < 0.12 and 0.22 < plain < 0.28
    assert all(l.named == {} for c, l in samples if c == "")


def test_captions_use_aliases_and_misspellings_sometimes():
    """Training captions mostly use canonical names, but aliases and misspellings occur."""
    kinds = {"canonical": 0, "alias": 0, "misspelling": 0}
    for i in range(1500):
        _, labels = world.sample_caption(i, 1)
        for category, phrase in labels.named.items():
            concept = labels.names()[category]
            if concept == "none":
                continue
            names = world.NAMES[concept]
            kind = ("canonical" if phrase.lower() == names.canonical.lower() else
                    "alias" if phrase.lower() in map(str.lower, names.aliases) else "misspelling")
            kinds[kind] += 1
    total = sum(kinds.values())
    assert kinds["canonical"] / total > 0.6 and kinds["alias"] / total > 0.1
    assert kinds["misspelling"] / total > 0.03


def test_template_sets_are_disjoint_and_hold_the_papers_templates():
    """TRAIN, EVAL and ROBUST phrasings share no template; Table 7's three are training templates."""
    lower = lambda ts: {t.lower() for t in ts}  # noqa: E731
    train, eval_ = lower(world.TRAIN_TEMPLATES), lower(world.EVAL_TEMPLATES)
    robust = lower(world.ROBUST_TEMPLATES)
    assert not train & eval_ and not train & robust and not eval_ & robust
    for t in ("A photo of {entity}", "An art in the style of {style}", "A close scene of {colour}"):
        assert t in world.TRAIN_TEMPLATES


def test_surface_forms_are_unambiguous():
    """No surface form belongs to two concepts, and held-out spellings never occur in training."""
    owner: dict[str, str] = {}
    for concept, names in world.NAMES.items():
        for form in names.all_forms():
            assert owner.setdefault(form.lower(), concept) == concept, form
        assert not {f.lower() for f in names.held_out} & {f.lower() for f in names.train_forms()}
    assert set(world.NAMES) == set(world.STYLES + world.ENTITIES + world.COLOURS)


def test_tokenizer_text_covers_training_forms_but_not_held_out_ones():
    """all_caption_text() holds every training template and spelling, and no held-out spelling."""
    text = world.all_caption_text()
    joined = "\n".join(text)
    for names in world.NAMES.values():
        for form in names.train_forms():
            assert form in text
        for form in names.held_out:
            assert not re.search(rf"(?<!\w){re.escape(form)}(?!\w)", joined), form
    assert len(world.all_caption_text(include_held_out=True)) > len(text)


# ---------------------------------------------------------------------------------------------------
# Evaluation prompts


@pytest.mark.parametrize("concept", ["Van Gogh", "star", "red"])
@pytest.mark.parametrize("spelling", ["canonical", "alias", "misspelling", "held_out"])
def test_prompts_for_concept_ask_for_the_concept(concept, spelling):
    """Each prompt mentions the concept (in the requested spelling) and records it in its request."""
    category = world.category_of(concept)
    names = world.NAMES[concept]
    allowed = {"canonical": (names.canonical,), "alias": names.aliases,
               "misspelling": names.misspellings, "held_out": names.held_out}[spelling]
    for templates in (world.EVAL_TEMPLATES, world.TRAIN_TEMPLATES, world.ROBUST_TEMPLATES):
        prompts = world.prompts_for_concept(concept, 12, seed=0, templates=templates, spelling=spelling)
        assert len(prompts) == 12
        for prompt, request in prompts:
            assert request[category] == world.CONCEPTS[category].index(concept)
            assert any(form in prompt for form in allowed), prompt
            assert mentioned(prompt)[category] == {concept}


def test_prompts_excluding_never_mention_the_concept():
    """prompts_excluding gives prompts without the concept; same_category ones name a sibling."""
    for same in (True, False):
        for prompt, request in world.prompts_excluding("Monet", 30, seed=1, same_category=same):
            assert "Monet" not in mentioned(prompt).get("style", set())
            assert request.get("style") != world.STYLES.index("Monet")
            if same:
                assert "style" in request
