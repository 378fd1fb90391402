"""
Do the tests pin the training math? Break one line at a time (in a copy of this tree) and check that the
test suite then fails. A mutant that survives marks a line no test covers.

    python bench/mutants.py                      # every mutant below, ~1 min each
    python bench/mutants.py --only eta-sign,lambda-sign-implicit

Each mutant is (name, file, the line as written, the broken line); the original must occur exactly once.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_training_math.py", "tests/test_train.py", "tests/test_gate.py",
         "tests/test_lagrangian.py", "tests/test_precision.py", "tests/test_anchor.py",
         "tests/test_finetune.py", "tests/test_erase_steps.py"]
MUTANTS = [
    ("eta-sign", "zerase.py", "return v_null - eta * (v_c - v_null)", "return v_null + eta * (v_c - v_null)"),
    ("eta-ignored", "train.py", "Z.erase_target(er.v_anchor, er.v_c, run.eta)",
     "Z.erase_target(er.v_anchor, er.v_c, 2.0)"),
    ("reference-with-lora", "train.py", "with run.frozen() if run.frozen else Z.lora_disabled(run.dit):",
     "if True:"),
    ("reference-with-full-weights", "finetune.py", "    run.frozen = full.original", "    pass"),
    ("pool-time-sigma", "train.py", "return (ErasePool(x_t, 1 - sigma_t.to(zi.device),",
     "return (ErasePool(x_t, sigma_t.to(zi.device),"),
    ("reference-time-sigma", "train.py", "dit(x[i:i + chunk], 1 - sigma[i:i + chunk].to(x.device)",
     "dit(x[i:i + chunk], sigma[i:i + chunk].to(x.device)"),
    ("pool-state-next-sigma", "train.py", "sigmas.append(torch.full((n,), sig[k].item()))",
     "sigmas.append(torch.full((n,), sig[k + 1].item()))"),
    ("pr-references-swapped", "train.py",
     "return Z.preservation_loss(v[:K], pr.v_null) + Z.preservation_loss(v[K:], pr.v_c)",
     "return Z.preservation_loss(v[:K], pr.v_c) + Z.preservation_loss(v[K:], pr.v_null)"),
    ("lambda-sign-implicit", "train.py", "(L_erase + L_attn + run.lam * L_pr).backward()",
     "(L_erase + L_attn - run.lam * L_pr).backward()"),
    ("lambda-sign-fixed", "train.py", "(L_er + run.lam * L_pr if", "(L_er - run.lam * L_pr if"),
    ("exact-arguments-swapped", "train.py", "Z.d_star_per_param(g_er, g_pr, run.eps)",
     "Z.d_star_per_param(g_pr, g_er, run.eps)"),
    ("merge-sums", "lora_file.py", "else [1.0 / len(read)] * len(read)", "else [1.0] * len(read)"),
    ("erase-steps-keep-ignored", "train.py", "target = er.v_c if er.keep else", "target = er.v_c if False else"),
    ("erase-steps-off-by-one", "train.py", "int(e.k[j]) >= run.erase_steps", "int(e.k[j]) > run.erase_steps"),
    ("gtilde-after-other-batch", "train.py", "        value = pr_value(run, batch)\n",
     "        value = pr_value(run, self.batch(run, step + 2, batch))\n"),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated mutant names")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for name, file, old, new in chosen:
            path = tree / file
            text = path.read_text()
            if text.count(old) != 1:
                sys.exit(f"mutant {name}: the line to break occurs {text.count(old)} times in {file}; "
                         "update it")
            path.write_text(text.replace(old, new))
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                               cwd=tree, capture_output=True, text=True,
                               env={**os.environ, "PYTHONHASHSEED": "0"})
            path.write_text(text)
            failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
            verdict = f"killed by {failed[0].split('::')[-1].split(' ')[0]}" if r.returncode else "SURVIVED"
            if not r.returncode:
                survived.append(name)
            print(f"{name:<26} {verdict}  ({time.time() - t0:.0f} s)", flush=True)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
