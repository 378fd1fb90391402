"""
The paper's claims in miniature: each claim of Z-Erase (arXiv 2603.25074) as a list of runs on the embedded
tiny model, trained with train.py, scored with evaluate.erasure_report on fixed prompts and seeds, then
summarised in docs/claims.md with one verdict per claim (bench/claims_report.py) and plots in docs/claims/.

    python bench/claims.py run --quick                 # smoke test: every code path, a few minutes
    python bench/claims.py run                         # every claim, 3 training seeds, 2 processes
    python bench/claims.py run --claims 1,2 --seeds 1 -j 2
    python bench/claims.py report                      # docs/claims.md and docs/claims/*.png

Resumable: a run whose result JSON (<out>/results/<key>.json) exists is skipped, and LoRAs are kept under
<out>/loras/. Each run is one process (`nice -n 19`, one torch thread), so -j processes run side by side.
Runs are ordered by priority: at the first seed claims 2, 6 (the default LoRA and the baselines, cheap), 1, 5,
then 3, 4, 7, 8, 9; then the next seeds. A run already in flight (another runner's) is not started again.
The baselines of claims 2 and 6 (baselines.py) involve no training and are deterministic: one run each.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "claims"
QUICK_OUT = ROOT / "out" / "claims-quick"
CONCEPT = "Van Gogh"
EVAL_N, EVAL_SEEDS, QUICK_SEEDS = 10, (0, 1, 2), (0,)  # erasure_report: canonical prompts, image seeds
QUICK_TRAIN = ("--steps", "6", "--pool", "2", "--variants", "4", "--checkpoint-every", "6")
STRIP = ("A painting of a red star in the style of Van Gogh", "A blue heart in the style of Monet",
         "A yellow house, Picasso style", "A photo of a pink square")  # the images shown per run
MERGE_CONCEPTS = ("Van Gogh", "star", "green", "Monet", "circle")  # merge-N averages the first N


@dataclass(frozen=True)
class Point:
    """One experiment: a training (train.py flags), an inference-time baseline, or a merge of LoRAs."""
    name: str
    flags: tuple[str, ...] = ()
    kind: str = "train"  # train | finetune | zeroing | localize | merge
    concept: str = CONCEPT
    arg: int = 0  # localize: K layers; merge: the number of concepts averaged

    @property
    def seeded(self) -> bool:
        return self.kind in ("train", "finetune", "merge")


def _slug(s: str) -> str:
    return s.lower().replace(" ", "-")


def alone(concept: str) -> str:
    """The point that trains `concept` alone with the defaults."""
    return "default" if concept == CONCEPT else f"alone-{_slug(concept)}"


PAPER = ("--anchor", "null")  # every run erases towards v(x_t, ∅), as the paper's Eq. 5 (train.py's --anchor)


def paper_settings(concept: str) -> tuple[str, ...]:
    """--eps at Table 6's value for the concept's category, --eta at the paper's 2 and --beta at its 0.1:
    the tiny model stores its own ε for entities, η for each category and β (train.default_eps,
    default_eta, default_beta); the claims are checked with the paper's (a point's own flag comes last and
    wins)."""
    import checkpoint as C
    import train
    category = C.read_configs(train.DEFAULT_MODEL).defaults["categories"][concept]
    return ("--eps", repr(train.EPS_BY_CATEGORY[category]), "--eta", repr(train.ETA),
            "--beta", repr(train.BETA))


ESD = ("--losses", "erase")
FULL_LR = "1e-4"  # full fine-tuning moves every entry of W: α a tenth of the LoRA's (ESD fine-tunes at 1e-5)
GAP_EVERY = 25  # claim 8: steps between the exact g_t that train.py --check-gtilde logs beside g̃
LAYER_SETS = {"all": (), "first": ("--layers", "0,1,2"), "second": ("--layers", "3,4,5")}
POINTS = {p.name: p for p in [
    Point("default"), Point("nogate", ("--no-gate",)),
    *[Point(f"esd-{g}-{s}", ESD + lay + (("--no-gate",) if g == "ungated" else ()))
      for s, lay in LAYER_SETS.items() for g in ("gated", "ungated")],
    *[Point(f"esd-full-{s}", ESD + lay + ("--lr", FULL_LR), kind="finetune")
      for s, lay in LAYER_SETS.items()],
    Point("esd-full-all-lr1e-3", ESD + ("--lr", "1e-3"), kind="finetune"),  # the LoRA's α, for comparison
    Point("losses-erase,attn", ("--losses", "erase,attn")),
    Point("losses-erase,pr", ("--losses", "erase,pr")),
    *[Point(f"fixed-{x}", ("--fixed-lambda", x)) for x in ("0.01", "0.1", "1", "10", "100")],
    *[Point(f"eps-{x}", ("--eps", x)) for x in ("1e-4", "1e-2", "1e-1")],
    *[Point(f"beta-{x}", ("--beta", x)) for x in ("0.01", "1")],
    Point("exact", ("--mode", "exact")),
    # the default run again, logging the exact g_t every 25 steps (Lemma C.3); the LoRA is the default's
    Point("gap-check", ("--check-gtilde", str(GAP_EVERY))),
    Point("zeroing", kind="zeroing"), *[Point(f"localize-k{k}", kind="localize", arg=k) for k in (1, 2, 4)],
    *[Point(alone(c), concept=c) for c in MERGE_CONCEPTS[1:]],
    *[Point(f"merge-{n}", kind="merge", arg=n) for n in (2, 3, 5)],
]}
# Aliases: the same objective under two names is trained once. Static λ = 0 is L_er + 0·L_pr, i.e.
# L_erase + L_attn: the {erase, attn} run; ε = 1e-3 (styles, Table 6) and β = 0.1 are the defaults.
SAME = {"fixed-0": "losses-erase,attn", "eps-1e-3": "default", "beta-0.1": "default",
        "losses-erase": "esd-gated-all", "losses-erase,attn,pr": "default", "implicit": "default"}


@dataclass(frozen=True)
class Claim:
    title: str
    points: tuple[str, ...]


CLAIMS = {
    1: Claim("Naive fine-tuning collapses, the gate prevents it (§3, Fig. 3 right, Fig. 15)",
             tuple(f"esd-{g}-{s}" for s in LAYER_SETS for g in ("gated", "ungated", "full")) +
             ("esd-full-all-lr1e-3", "default", "nogate")),
    2: Claim("Attention zeroing erases but is brittle (Fig. 3 left)", ("zeroing", "default")),
    3: Claim("Static weighting forces a binary outcome; the Lagrangian reaches the balance (§4.2, Fig. 5)",
             ("fixed-0", "fixed-0.01", "fixed-0.1", "fixed-1", "fixed-10", "fixed-100",
              "eps-1e-4", "eps-1e-3", "eps-1e-2", "eps-1e-1")),
    4: Claim("ε controls the trade-off monotonically; β barely matters (Fig. 8)",
             ("eps-1e-4", "eps-1e-3", "eps-1e-2", "eps-1e-1", "beta-0.01", "beta-0.1", "beta-1")),
    5: Claim("Each loss term does its job (Table 5)",
             ("losses-erase", "losses-erase,attn", "losses-erase,pr", "losses-erase,attn,pr")),
    6: Claim("DiT-Localization, K ∈ {1, 2, 4}, against Z-Erase (Zarei et al. 2025)",
             ("localize-k1", "localize-k2", "localize-k4", "default")),
    7: Claim("Implicit vs exact modulation: same quality, cost of each", ("implicit", "exact")),
    8: Claim("Eq. 16: L_pr(θ_t) − L_pr(θ_0) ≤ t·ε·α along a default run; Lemma C.3's gap of g̃",
             ("default", "gap-check")),
    9: Claim("Multi-concept merging (Eq. 63): 2, 3, 5 averaged LoRAs vs each alone",
             tuple(alone(c) for c in MERGE_CONCEPTS) + ("merge-2", "merge-3", "merge-5")),
}
PRIORITY = (2, 6, 1, 5, 3, 4, 7, 8, 9)


def point(name: str) -> Point:
    return POINTS[SAME.get(name, name)]


def deps(p: Point) -> list[str]:
    """Points whose LoRAs a point needs: a merge needs its concepts, each trained alone."""
    return [alone(c) for c in MERGE_CONCEPTS[:p.arg]] if p.kind == "merge" else []


@dataclass(frozen=True)
class Job:
    point: str
    seed: int
    after: tuple[str, ...] = ()  # job keys that must have finished first

    @property
    def key(self) -> str:
        return job_key(self.point, self.seed)


def job_key(name: str, seed: int) -> str:
    p = point(name)
    return f"{p.name}-s{seed}" if p.seeded else p.name


def jobs(claims: list[int], seeds: int) -> list[Job]:
    """The runs of `claims` in priority order, each once (aliases resolved), dependencies first; the
    unseeded baselines only at seed 0."""
    out, seen = [], set()
    for seed in range(seeds):
        for c in (c for c in PRIORITY if c in claims):
            for name in CLAIMS[c].points:
                p = point(name)
                for n in deps(p) + [p.name]:
                    if (key := job_key(n, seed)) not in seen and (point(n).seeded or seed == 0):
                        seen.add(key)
                        out.append(Job(point(n).name, seed, tuple(job_key(d, seed) for d in deps(point(n)))))
    return out


def select(all_jobs: list[Job], only: str | None) -> list[Job]:
    """The jobs of the points named in `only` (comma-separated), and the jobs they need; all if None."""
    if not only:
        return all_jobs
    names = {point(n).name for n in only.split(",")}
    wanted = {j.key for j in all_jobs if j.point in names}
    wanted |= {d for j in all_jobs if j.key in wanted for d in j.after}
    return [j for j in all_jobs if j.key in wanted]


def result_path(out: Path, key: str) -> Path:
    return out / "results" / f"{key}.json"


def todo(all_jobs: list[Job], out: Path) -> list[Job]:
    """The jobs whose result JSON does not exist yet (resumability) and that no live process is running."""
    return [j for j in all_jobs if not result_path(out, j.key).exists() and not in_flight(out, j.key)]


def marker(out: Path, key: str) -> Path:
    return out / "running" / key


def in_flight(out: Path, key: str) -> bool:
    """Whether the process named in the job's marker file is alive."""
    try:
        os.kill(int(marker(out, key).read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# Running jobs: N processes at a time, each `claims.py job`


def job_command(j: Job, out: Path, quick: bool) -> list[str]:
    return (["nice", "-n", "19", sys.executable, str(Path(__file__).resolve()), "job", j.point,
             "--seed", str(j.seed), "--out", str(out)] + (["--quick"] if quick else []))


def run_all(pending: list[Job], out: Path, quick: bool, parallel: int) -> None:
    """Start the pending jobs in order, `parallel` at a time, a job once its dependencies have results; a
    job whose dependency failed is skipped. One line per job in <out>/bench.jsonl."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    running, failed, env = {}, set(), {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        for key, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[key]
                ok = proc.returncode == 0 and result_path(out, key).exists()
                failed |= set() if ok else {key}
                note(out, {"job": key, "rc": proc.returncode, "start": t0,
                           "seconds": round(time.time() - t0)})
                print(f"{'done' if ok else 'FAILED'} {key} ({time.time() - t0:.0f} s)", flush=True)
        for j in list(pending):
            if len(running) >= parallel:
                break
            if any(d in failed for d in j.after):
                pending.remove(j)
                failed.add(j.key)
                print(f"skipped {j.key}: a run it needs failed", flush=True)
            elif all(result_path(out, d).exists() for d in j.after):
                pending.remove(j)
                log = open(out / "logs" / f"{j.key}.log", "w")
                proc = subprocess.Popen(job_command(j, out, quick), stdout=log, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT)
                running[j.key] = (proc, time.time(), log)
                print(f"started {j.key}", flush=True)
        time.sleep(1)


def note(out: Path, rec: dict) -> None:
    with open(out / "bench.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------------------------
# One job: train (train.py, its own process), then score


def train_command(p: Point, seed: int, lora: Path, quick: bool) -> list[str]:
    """A point's training process: the paper's anchor, ε and β, then the point's own flags (which win)."""
    script = "finetune.py" if p.kind == "finetune" else "train.py"  # finetune.py: L_erase alone, no ε
    return [sys.executable, str(ROOT / script), "--concept", p.concept, "--seed", str(seed), "--out",
            str(lora), "--force", *PAPER, *(paper_settings(p.concept) if script == "train.py" else ()),
            *p.flags, *(QUICK_TRAIN if quick else ())]


def train_lora(p: Point, seed: int, out: Path, quick: bool) -> tuple[Path, dict]:
    """The LoRA of a training point (trained unless kept), and its cost: wall time and the training
    process's peak RSS (this job's only child), saved next to it for a resumed job."""
    lora = out / "loras" / f"{job_key(p.name, seed)}.safetensors"
    cost = lora.with_suffix(".cost.json")
    if lora.exists() and cost.exists():
        return lora, json.loads(cost.read_text())
    lora.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(p, seed, lora, quick)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    log = [json.loads(s) for s in lora.with_suffix(".jsonl").read_text().splitlines()]
    c = {"wall_s": round(time.time() - t0, 1), "loop_s": log[-1].get("seconds"),
         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
         "command": " ".join(cmd[1:])}
    cost.write_text(json.dumps(c))
    return lora, c


def run_job(name: str, seed: int, out: Path, quick: bool) -> None:
    import torch
    torch.set_num_threads(1)
    import checkpoint as C
    import evaluate as E
    import lora_file
    from tiny.classifier import load_classifier
    p, t0 = point(name), time.time()
    flag = marker(out, job_key(name, seed))
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(str(os.getpid()))
    base, clf = C.load_zimage(E.DEFAULT_MODEL), load_classifier()
    cache = E.ImageCache(OUT / "cache")  # base images, shared by every run (full and quick)
    seeds, sizes = (QUICK_SEEDS, E.Sizes.from_n(1)) if quick else (EVAL_SEEDS, E.Sizes.from_n(EVAL_N))

    def report(model, concept):
        return E.erasure_report(base, model, clf, concept, sizes.erase, list(seeds), sizes=sizes, cache=cache)

    res = {"key": job_key(name, seed), "point": p.name, "kind": p.kind, "concept": p.concept, "seed": seed,
           "flags": list(p.flags), "quick": quick}
    if p.kind in ("train", "finetune"):
        lora, res["train"] = train_lora(p, seed, out, quick)
        model = C.load_zimage(E.DEFAULT_MODEL)
        if p.kind == "finetune":
            import finetune
            finetune.apply_finetune(model.transformer, lora)
        else:
            lora_file.apply_loras(model.transformer, [lora])
        res["report"] = report(model, p.concept)
    elif p.kind == "merge":
        model = C.load_zimage(E.DEFAULT_MODEL)
        files = [out / "loras" / f"{job_key(alone(c), seed)}.safetensors" for c in MERGE_CONCEPTS[:p.arg]]
        lora_file.apply_loras(model.transformer, files)  # w_i = 1/N (Eq. 63)
        res["reports"] = {c: report(model, c) for c in MERGE_CONCEPTS[:p.arg]}
    else:
        model, res["baseline"] = baseline_model(base, p, quick)
        res["report"] = report(model, p.concept)
    save_strip(model, out / "images" / f"{res['key']}.png")
    if not (out / "images" / "base.png").exists():
        save_strip(base, out / "images" / "base.png")
    res["seconds"] = round(time.time() - t0, 1)
    path = result_path(out, res["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, path)
    flag.unlink(missing_ok=True)


def save_strip(model, path: Path) -> None:
    """The model's images of STRIP at seed 0, side by side, as one PNG."""
    import numpy as np
    from PIL import Image
    import evaluate as E
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(E.sample_images(model, [(s, 0) for s in STRIP])), axis=1)).save(path)


# ---------------------------------------------------------------------------------------------------------
# Inference-time baselines inside erasure_report: the base model, its DiT calls wrapped per sampler batch


class Intervened:
    """A ZImage whose every DiT call runs inside an inference-time baseline made for the prompts of that
    sampler batch: `make(prompts)` returns the context manager (baselines.attention_zeroing / dit_localization
    with the batch's concept tokens). The prompts are those last encoded, which in evaluate.sample_images
    (and sample.generate) are the batch's, encoded just before it is denoised."""

    def __init__(self, zi, make):
        self._zi, self._make, self._prompts = zi, make, []
        self.transformer = _WrappedDiT(zi.transformer, self)

    def encode_prompts(self, prompts):
        self._prompts = list(prompts)
        return self._zi.encode_prompts(prompts)

    def context(self):
        return self._make(self._prompts)

    def __getattr__(self, name):
        return getattr(self._zi, name)


class _WrappedDiT:
    def __init__(self, dit, owner: Intervened):
        self._dit, self._owner = dit, owner

    def __call__(self, *args, **kwargs):
        with self._owner.context():
            return self._dit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._dit, name)


def baseline_model(zi, p: Point, quick: bool):
    """The base model under attention zeroing or DiT-Localization (top-K layers, the empty caption as the
    neutral one), the concept located by its canonical spelling only, as the baselines are given it."""
    import baselines as B
    import evaluate as E
    forms = [p.concept]
    toks = (lambda prompts: B.concept_tokens(zi.tokenizer, forms, prompts, negative_prompt=""))  # noqa: E731
    if p.kind == "zeroing":
        return Intervened(zi, lambda prompts: B.attention_zeroing(zi.transformer, toks(prompts))), {}
    calib = [t for t, _ in E.concept_prompts(p.concept, 2 if quick else 8, seed=1)]  # not the eval prompts
    layers, mass = B.localize(zi, forms, calib, p.arg)
    null = B.null_caption(zi)
    info = {"layers": list(layers), "mass": [round(m, 5) for m in mass.tolist()], "calibration": calib}
    model = Intervened(zi, lambda prompts: B.dit_localization(zi.transformer, toks(prompts), layers, null))
    return model, info


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "job", "list"])
    p.add_argument("name", nargs="?", help="job: the point to run")
    p.add_argument("--quick", action="store_true", help="a few training steps, one seed, tiny evaluation "
                   f"sets, into {QUICK_OUT.relative_to(ROOT)} (a smoke test of every code path)")
    p.add_argument("--claims", default=",".join(map(str, CLAIMS)), help="comma-separated claim numbers")
    p.add_argument("--only", help="comma-separated point names: only their runs (and what they need)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per point")
    p.add_argument("--seed", type=int, default=0, help="job: the training seed")
    p.add_argument("-j", "--parallel", type=int, default=2, help="processes at a time")
    p.add_argument("--out", help=f"results folder (default {OUT.relative_to(ROOT)})")
    p.add_argument("--docs", help="report: where claims.md and its plots go (default docs/, with --quick "
                   "the results folder)")
    a = p.parse_args(argv)
    a.claims = sorted({int(c) for c in a.claims.split(",")})
    if unknown := [c for c in a.claims if c not in CLAIMS]:
        p.error(f"unknown claim {unknown[0]}; the claims are {', '.join(map(str, CLAIMS))}")
    a.seeds = 1 if a.quick else a.seeds
    a.out = Path(a.out) if a.out else QUICK_OUT if a.quick else OUT
    a.docs = Path(a.docs) if a.docs else a.out if a.quick else ROOT / "docs"
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.command == "job":
        run_job(a.name, a.seed, a.out, a.quick)
    elif a.command in ("run", "list"):
        pending = todo(select(jobs(a.claims, a.seeds), a.only), a.out)
        print(f"{len(pending)} runs to do: " + " ".join(j.key for j in pending), flush=True)
        if a.command == "run":
            run_all(pending, a.out, a.quick, a.parallel)
    if a.command in ("run", "report"):
        import claims_report
        print(f"wrote {claims_report.write(a.out, a.docs, a.claims)}")


if __name__ == "__main__":
    main()
