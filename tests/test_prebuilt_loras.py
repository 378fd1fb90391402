"""The prebuilt LoRAs under weights/loras/ (made by bench/sweep.py with train.py's defaults): each loads the
way sample.py loads a --lora (lora_file.apply_loras on weights/zimage-tiny) and still erases its concept on
a few held-out canonical prompts, with the base model drawing the same prompts and noise."""

import copy
import dataclasses
from pathlib import Path

import pytest

import checkpoint as C
import evaluate as E
import lora_file
from tiny import world
from tiny.classifier import load_classifier, score

ROOT = Path(__file__).resolve().parents[1]
PREBUILT = {"van-gogh": "Van Gogh", "monet": "Monet", "star": "star", "red": "red"}
PROMPTS = 6  # canonical held-out prompts per concept, seed 0


def accuracy(zi, clf, concepts: list[str]) -> list[float]:
    """Per concept, the classifier's accuracy for it on the model's images of its canonical prompts."""
    prompts = [E.concept_prompts(c, PROMPTS, 0) for c in concepts]
    imgs, _ = E.images(zi, E.items_of([p for ps in prompts for p in ps], [0]))  # one sampler batch or two
    pred = score(world.to_tensor(imgs), clf)
    return [E.accuracy({k: v[i * PROMPTS:(i + 1) * PROMPTS] for k, v in pred.items()}, [r for _, r in ps],
                       world.category_of(c)) for i, (c, ps) in enumerate(zip(concepts, prompts))]


@pytest.fixture(scope="module")
def base():
    """The base model, the classifier, and the base model's accuracy for every prebuilt concept."""
    zi, clf = C.load_zimage(E.DEFAULT_MODEL), load_classifier()
    return zi, clf, dict(zip(PREBUILT, accuracy(zi, clf, list(PREBUILT.values()))))


@pytest.mark.parametrize("name", sorted(PREBUILT))
def test_prebuilt_lora_loads_and_erases(name, base):
    zi, clf, base_accuracy = base
    path = ROOT / "weights" / "loras" / f"{name}.safetensors"
    assert path.stat().st_size < 200_000, "a tiny-model LoRA is tens of KB"
    erased = dataclasses.replace(zi, transformer=copy.deepcopy(zi.transformer))  # weights/zimage-tiny's DiT
    info = lora_file.apply_loras(erased.transformer, [path])  # what sample.py --lora does
    assert info["metas"][0]["concept"] == PREBUILT[name]
    before, after = base_accuracy[name], accuracy(erased, clf, [PREBUILT[name]])[0]
    assert before >= 0.6, f"the base model draws {PREBUILT[name]} on most prompts (got {before:.2f})"
    assert after <= min(0.2, before - 0.4), f"{name} no longer erases: accuracy {before:.2f} -> {after:.2f}"
