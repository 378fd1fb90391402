"""Tests of the concept classifier (tiny/classifier.py) and its shipped weights."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny import world
from tiny.classifier import (DEFAULT_PATH, HEADS, ClassifierConfig, ConceptClassifier, augment,
                             frechet_distance, load_classifier, save_classifier, score)

FRESH_SEED = 424242     # a world seed used neither for training (0) nor for held-out evaluation (1000)


@pytest.fixture(scope="module")
def classifier() -> ConceptClassifier:
    return load_classifier()


@pytest.fixture(scope="module")
def fresh() -> dict:
    return world.make_dataset(128, FRESH_SEED)


def test_shipped_classifier_is_accurate_on_fresh_world_images(classifier, fresh):
    """The committed weights load through load_classifier and classify unseen world images: >= 90% per
    attribute on 128 samples (the training run reports ~99% on 2,000)."""
    out = score(world.to_tensor(fresh["images"]), classifier)
    for head in HEADS:
        accuracy = (out[head].numpy() == fresh[head]).mean()
        assert accuracy >= 0.9, (head, accuracy)


def test_score_returns_indices_probabilities_and_features(classifier, fresh):
    """score() gives (B,) indices, (B, n_classes) probabilities summing to 1, (B, feature_dim) features."""
    out = score(world.to_tensor(fresh["images"][:10]), classifier)
    sizes = {"style": len(world.STYLE_CLASSES), "entity": len(world.ENTITIES), "colour": len(world.COLOURS)}
    for head, n in sizes.items():
        assert out[head].shape == (10,) and out[head].dtype == torch.int64
        assert out[f"{head}_probs"].shape == (10, n)
        torch.testing.assert_close(out[f"{head}_probs"].sum(-1), torch.ones(10))
        assert torch.equal(out[f"{head}_probs"].argmax(-1), out[head])
    assert out["features"].shape == (10, classifier.config.feature_dim)


def test_score_resizes_other_resolutions(classifier, fresh):
    """A 128×128 image (e.g. from `sample.py --height 128`) is classified like its 64×64 original."""
    x = world.to_tensor(fresh["images"][:64])
    big = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    a, b = score(x, classifier), score(big, classifier)
    for head in HEADS:
        assert (a[head] == b[head]).float().mean() >= 0.9


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    """FD(a, a) ~ 0; a mean shift d adds |d|^2; a bigger shift gives a bigger distance; symmetric."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)   # correlated features
    assert abs(frechet_distance(a, a)) < 1e-6 * float(a.var(0).sum())
    assert frechet_distance(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)
    b = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    assert frechet_distance(a, b) > 0
    assert frechet_distance(a, b + 1.0) > frechet_distance(a, b)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a.numpy(), b.numpy()) == pytest.approx(frechet_distance(a, b))


def test_frechet_distance_matches_the_closed_form_for_isotropic_gaussians():
    """For N(0, I) vs N(0, 4I) in D dimensions, FD = D (1 + 4 - 2·2) = D."""
    gen = torch.Generator().manual_seed(1)
    d = 8
    a = torch.randn(20000, d, generator=gen)
    b = 2 * torch.randn(20000, d, generator=gen)
    assert frechet_distance(a, b) == pytest.approx(d, rel=0.05)


def test_classifier_features_separate_styles(classifier, fresh):
    """FD between features of two disjoint halves of the same world is far smaller than between
    plain-background images and styled ones: the feature space sees what the world changes."""
    feats = score(world.to_tensor(fresh["images"]), classifier)["features"]
    plain = fresh["style"] == world.NO_STYLE
    styled = np.nonzero(~plain)[0]
    same = frechet_distance(feats[styled[0::2]], feats[styled[1::2]])
    assert frechet_distance(feats[plain], feats[styled]) > 2 * same


def test_save_and_load_round_trip(tmp_path):
    """save_classifier writes safetensors + config.json; load_classifier restores identical outputs."""
    torch.manual_seed(0)
    model = ConceptClassifier(ClassifierConfig.for_world()).eval()
    save_classifier(model, tmp_path, {"training": {"note": "test"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_classifier(tmp_path)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    for head in HEADS:
        torch.testing.assert_close(score(x, model)[f"{head}_probs"], score(x, loaded)[f"{head}_probs"])


def test_load_rejects_a_config_whose_classes_differ_from_the_world(tmp_path):
    """A classifier trained on other concept lists must not load silently (its labels would be wrong)."""
    shutil.copytree(DEFAULT_PATH, tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["styles"] = config["styles"][::-1]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="style"):
        load_classifier(tmp_path / "clf")


def test_augment_keeps_shape_and_range_and_is_seeded():
    """augment() is a pure function of its generator and keeps images in [-1, 1]."""
    x = world.to_tensor(world.make_dataset(4, 0)["images"])
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    assert not torch.equal(a, x)
