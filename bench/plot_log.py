"""
Draw the training curves of a train.py log (<out>.jsonl) to a PNG: L_erase, L_attn and L_pr per step (faint)
and smoothed as train.py's progress bar smooths them, λ, and g̃ when the log has it (--mode implicit).

    python bench/plot_log.py loras/van-gogh.jsonl                  # writes loras/van-gogh.png
    python bench/plot_log.py loras/van-gogh.jsonl --out curves.png

The log holds one JSON record per step ({"step": ..., "L_erase": ..., "lambda": ...}) and, after a finished
run, a closing {"finished": steps, "seconds": ...}. Needs matplotlib (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import HelpFormatter, OutputError, atomic_write, check_output, die  # noqa: E402

LOSSES = ("L_erase", "L_attn", "L_pr")


def read_log(path: Path) -> tuple[list[dict], dict]:
    """The step records and the closing summary ({} for an unfinished run); ValueError on a bad file."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the log {path} ({getattr(e, 'strerror', None) or e}); pass the .jsonl "
                         f"train.py wrote next to the LoRA.") from None
    steps, summary = [], {}
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{path} line {i} is not JSON; pass the .jsonl train.py wrote.") from None
        if "step" in rec:
            steps.append(rec)
        elif "finished" in rec:
            summary = rec
    if not steps or not all(k in steps[0] for k in (*LOSSES, "lambda")):
        raise ValueError(f"{path} holds no training steps; pass the .jsonl of a train.py run that has taken "
                         f"at least one step.")
    return steps, summary


def smoothed(steps: list[dict]) -> dict[str, list[float]]:
    """Per loss, the value train.py's progress bar showed after each step (train.Smoothed)."""
    from train import Smoothed
    s, out = Smoothed(), {k: [] for k in LOSSES}
    for rec in steps:
        for k, v in s.update(rec).items():
            out[k].append(v)
    return out


def plot(steps: list[dict], summary: dict, title: str):
    """The figure: one panel per loss (raw and smoothed), λ, and g̃ if logged."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    x = [r["step"] for r in steps]
    smooth = smoothed(steps)
    panels = [*LOSSES, "lambda"] + (["g_tilde"] if all("g_tilde" in r for r in steps) else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], panels):
        y = [r[key] for r in steps]
        if key in LOSSES:
            ax.plot(x, y, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
            ax.plot(x, smooth[key], color="tab:blue", lw=1.6, label="smoothed")
            ax.set_yscale("log" if min(y) > 0 else "symlog", **({} if min(y) > 0 else {
                "linthresh": min((v for v in y if v > 0), default=1e-12)}))
        else:
            ax.plot(x, y, color="tab:orange" if key == "lambda" else "tab:green", lw=1.2)
        if key == "g_tilde":
            ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel({"lambda": "λ", "g_tilde": "g̃"}.get(key, key))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    setup = sum(v for k, v in summary.items() if k not in ("finished", "seconds"))  # stage timings
    done = (f", finished in {summary['seconds']:.0f} s after {setup:.0f} s of setup" if "seconds" in summary
            else ", unfinished")
    fig.suptitle(f"{title}: {len(steps)} steps{done}")
    fig.tight_layout()
    return fig


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("log", help="a train.py log, <out>.jsonl")
    p.add_argument("--out", help="the PNG to write (default: the log's name with .png)")
    args = p.parse_args(argv)
    log = Path(args.log)
    try:
        steps, summary = read_log(log)
        out = check_output(args.out or log.with_suffix(".png"), "--out", (".png",))
        try:
            fig = plot(steps, summary, log.stem)
        except ImportError:
            raise ValueError("drawing needs matplotlib: pip install -r requirements-dev.txt.") from None
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    except ValueError as e:
        die(str(e))
    except OutputError as e:
        die(str(e), code=1)
    print(f"wrote {out} ({len(steps)} steps)")
    return out


if __name__ == "__main__":
    main()
