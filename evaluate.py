"""
Score images of the embedded tiny model with the concept classifier (the paper's metrics in miniature).

    python evaluate.py                                          # base model: per-concept accuracy table
    python evaluate.py --lora loras/van-gogh.safetensors        # erasure: Acc_e, Acc_ir, H_a, FD, robustness
    python evaluate.py --lora a.safetensors --lora b.safetensors  # several LoRAs averaged (Eq. 63)

Prompts come from the world's held-out templates (EVAL_TEMPLATES: phrasings never seen in pretraining), so
a score measures the concept, not a memorised caption. For a prompt that requests concept c of category k,
an image counts as correct when the classifier's k-head predicts c.
  Acc_e:  accuracy on prompts that ask for the erased concept (lower is better);
  Acc_ir: accuracy on prompts that ask for the other concepts of its category (higher is better);
  H_a = Acc_ir - Acc_e;
  FD:     Fréchet distance between classifier features of base and erased images of unrelated prompts,
          same seeds (the FID stand-in; lower is better);
  robustness: Acc_e on aliases, misspellings, held-out spellings and paraphrase/prefix templates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import checkpoint as C
import lora_file
from cli import atomic_write, die
from model import CheckpointError
from sample import DEFAULT_MODEL, TURBO, generate
from tiny import world
from tiny.classifier import frechet_distance, load_classifier, score


def images_for(zi: C.ZImage, prompts: list[str], seeds: list[int], feats=None) -> torch.Tensor:
    """(len(seeds) * len(prompts), 3, H, W) images in [-1, 1], sampled with the model's stored defaults;
    seed s draws the noise of every prompt (as sample.py does)."""
    d = {**TURBO, **zi.defaults}
    feats = feats if feats is not None else zi.encode_prompts(prompts)
    return torch.cat([world.to_tensor(generate(zi, prompts, s, d["height"], d["width"], d["steps"], d["guidance"],
                                               cond=feats).numpy()) for s in seeds])


def accuracy(pred: dict, requests: list[dict], category: str) -> float:
    """Share of images whose `category` prediction equals what their prompt requested."""
    want = torch.tensor([r[category] for r in requests])
    return (pred[category] == want).float().mean().item()


def concept_accuracy(zi, clf, concept: str, n: int, seeds: list[int], **kw) -> float:
    prompts = world.prompts_for_concept(concept, n, seed=0, **kw)
    imgs = images_for(zi, [p for p, _ in prompts], seeds)
    return accuracy(score(imgs, clf), [r for _, r in prompts] * len(seeds), world.category_of(concept))


def base_table(zi, clf, n: int, seeds: list[int]) -> dict:
    """Per-concept accuracy of the base model (README, "The embedded tiny model"), plus Van Gogh from its variants."""
    rows = {}
    for category, concepts in world.CONCEPTS.items():
        for c in concepts:
            rows[c] = {"category": category, "acc": concept_accuracy(zi, clf, c, n, seeds)}
            print(f"  {category:<7} {c:<10} {rows[c]['acc']:.3f}", flush=True)
    robust = {}
    for spelling in ("alias", "misspelling", "held_out"):
        robust[spelling] = concept_accuracy(zi, clf, "Van Gogh", n, seeds, spelling=spelling)
    robust["robust_templates"] = concept_accuracy(zi, clf, "Van Gogh", n, seeds,
                                                  templates=world.ROBUST_TEMPLATES)
    means = {k: sum(r["acc"] for r in rows.values() if r["category"] == k) / len(world.CONCEPTS[k])
             for k in world.CONCEPTS}
    return {"per_concept": rows, "mean_by_category": means, "van_gogh_variants": robust}


def erasure_report(zi_base, zi_erased, clf, concept: str, n: int, seeds: list[int]) -> dict:
    """Acc_e, Acc_ir, H_a, FD and robustness of an erased model against its base."""
    cat = world.category_of(concept)
    acc_e = {"base": concept_accuracy(zi_base, clf, concept, n, seeds),
             "erased": concept_accuracy(zi_erased, clf, concept, n, seeds)}
    # Acc_ir: the same number of held-out prompts for every other concept of the category (so no concept
    # weighs more by chance), the same prompts and seeds for both models, and the figure per concept.
    others = [c for c in world.CONCEPTS[cat] if c != concept]
    per = max(2, n // 2)
    ir = [pr for c in others for pr in world.prompts_for_concept(c, per, seed=1)]
    want = torch.tensor([r[cat] for _, r in ir] * len(seeds))
    acc_ir, by_concept = {}, {}
    for k, z in (("base", zi_base), ("erased", zi_erased)):
        hit = (score(images_for(z, [p for p, _ in ir], seeds), clf)[cat] == want).float()
        acc_ir[k] = hit.mean().item()
        for i, c in enumerate(others):  # images are ordered seed-major: index = seed * len(ir) + prompt
            rows = [s * len(ir) + i * per + j for s in range(len(seeds)) for j in range(per)]
            by_concept.setdefault(c, {})[k] = hit[rows].mean().item()
    unrelated = [p for p, _ in world.prompts_excluding(concept, n, seed=2, same_category=False)]
    f_base = score(images_for(zi_base, unrelated, seeds), clf)["features"]
    f_erased = score(images_for(zi_erased, unrelated, seeds), clf)["features"]
    robust = {s: concept_accuracy(zi_erased, clf, concept, n, seeds, spelling=s)
              for s in ("alias", "misspelling", "held_out")}
    robust["robust_templates"] = concept_accuracy(zi_erased, clf, concept, n, seeds,
                                                  templates=world.ROBUST_TEMPLATES)
    return {"concept": concept, "Acc_e": acc_e, "Acc_ir": acc_ir, "Acc_ir_by_concept": by_concept,
            "H_a": acc_ir["erased"] - acc_e["erased"],
            "FD": frechet_distance(f_base, f_erased), "robustness_Acc_e": robust}


def style_grid(zi, path, entities=("circle", "star", "heart", "house", "tree", "moon"), seed=0) -> None:
    """One row per style (and a plain row), one column per entity, colours varied: a picture to look at."""
    from sample import grid, save_png
    prompts = [f"a {world.COLOURS[(i + j) % len(world.COLOURS)]} {e} in the style of {s}"
               for i, s in enumerate(world.STYLES) for j, e in enumerate(entities)]
    prompts += [f"a {world.COLOURS[j % len(world.COLOURS)]} {e} on a plain background" for j, e in enumerate(entities)]
    imgs = images_for(zi, prompts, [seed])
    big = torch.nn.functional.interpolate(imgs, scale_factor=2, mode="nearest")  # x2 so a person can see it
    save_png(grid(torch.from_numpy(world.to_uint8(big)), len(entities)), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--lora", action="append", help="LoRA file(s) to evaluate (averaged per Eq. 63)")
    p.add_argument("--concept", action="append", help="erased concept(s) to score (default: from the LoRAs)")
    p.add_argument("--prompts", type=int, default=20, help="prompts per concept")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--grid", help="write a style x entity image grid of the base model to this PNG and stop")
    args = p.parse_args(argv)
    seeds = list(range(args.seeds))
    try:
        zi = C.load_zimage(args.model)
        clf = load_classifier()
        if args.grid:
            style_grid(zi, args.grid)
            print(f"wrote {args.grid}")
            return None
        if not args.lora:
            print(f"base model {args.model}: {args.prompts} held-out prompts x {args.seeds} seeds per concept")
            res = base_table(zi, clf, args.prompts, seeds)
            for k, v in res["mean_by_category"].items():
                print(f"mean {k:<7} {v:.3f}   min {min(r['acc'] for r in res['per_concept'].values() if r['category'] == k):.3f}")
            for k, v in res["van_gogh_variants"].items():
                print(f"Van Gogh via {k:<17} {v:.3f}")
        else:
            erased = C.load_zimage(args.model)
            info = lora_file.apply_loras(erased.transformer, args.lora)
            concepts = args.concept or [m["concept"] for m in info["metas"]]
            res = [erasure_report(zi, erased, clf, c, args.prompts, seeds) for c in concepts]
            for r in res:
                print(f"{r['concept']}: Acc_e {r['Acc_e']['base']:.3f} -> {r['Acc_e']['erased']:.3f}   Acc_ir "
                      f"{r['Acc_ir']['base']:.3f} -> {r['Acc_ir']['erased']:.3f}   H_a {r['H_a']:.3f}   "
                      f"FD {r['FD']:.3f}   robustness Acc_e "
                      + " ".join(f"{k}={v:.3f}" for k, v in r["robustness_Acc_e"].items()))
                print("  Acc_ir per concept (base -> erased): " + ", ".join(
                    f"{c} {v['base']:.2f}->{v['erased']:.2f}" for c, v in r["Acc_ir_by_concept"].items()))
    except (CheckpointError, lora_file.LoRAFileError, ValueError) as e:
        die(str(e))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2)))
    return res


if __name__ == "__main__":
    main()
