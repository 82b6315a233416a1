"""Loss curves as a PNG: training loss, every validation set, and the data's true entropy when it is known.

    python -m pretrain.plot runs/NAME [runs/OTHER ...] [--out curves.png] [--x step|tokens]

One run draws into `runs/NAME/loss.png` (the training loop also writes it at the end of a run); several runs
are overlaid into `--out` (default `loss.png` here), e.g. MDM against its AR baseline, or a sweep. The lower
panel is the learning rate, so warmup and decay can be read off next to the loss.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by `python -m pretrain` "
                                "(it holds metrics.jsonl)")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write can leave a torn last line; anything earlier is a real error.
            if n < len(lines):
                raise ValueError(f"{path}:{n} is not valid JSON") from None
    return records


def curves(records: list[dict], x: str = "step") -> dict:
    """{'train': (xs, losses), 'lr': (xs, lrs), 'val/<name>': (xs, losses), 'true_entropy': value or None}.

    A resumed run appends records for steps it had already logged before the interruption; the later record
    of a step wins, so the curve is the one the finished run followed."""
    by_step: dict[str, dict[int, float]] = {}
    tokens_at: dict[int, float] = {}
    true_entropy = None
    for r in records:
        step = r.get("step")
        if step is None:
            continue
        if "tokens" in r:
            tokens_at[step] = r["tokens"]
        for key, value in r.items():
            if key == "true_entropy" and value is not None:
                true_entropy = value
            elif key == "loss" or key == "lr" or key.startswith("val/"):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    by_step.setdefault("train" if key == "loss" else key, {})[step] = float(value)
    if x == "tokens" and tokens_at:
        per_step = max(tokens_at.items())[1] / max(tokens_at)  # tokens are G*L per step, constant in a run

        def xs_of(steps):
            return [tokens_at.get(s, s * per_step) for s in steps]
    else:
        def xs_of(steps):
            return list(steps)
    out = {}
    for key, points in by_step.items():
        steps = sorted(points)
        out[key] = (xs_of(steps), [points[s] for s in steps])
    out["true_entropy"] = true_entropy
    return out


def plot_runs(run_dirs: Sequence[Path], out: Path, x: str = "step", title: Optional[str] = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    entropies = set()
    drawn = 0
    for i, run in enumerate(run_dirs):
        c = curves(read_metrics(run), x)
        color = colors[i % len(colors)]
        label = Path(run).name if len(run_dirs) > 1 else ""
        if "train" in c:
            ax.plot(*c["train"], color=color, alpha=0.45, lw=1, label=f"{label} train".strip())
            drawn += 1
        for j, key in enumerate(k for k in c if k.startswith("val/")):
            ax.plot(*c[key], color=color, lw=2, marker="o", ms=3, ls=["-", "--", ":", "-."][j % 4],
                    label=f"{label} {key[4:]}".strip())
            drawn += 1
        if "lr" in c:
            ax_lr.plot(*c["lr"], color=color, lw=1.5)
        if c["true_entropy"] is not None:
            entropies.add(round(c["true_entropy"], 6))
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no losses logged yet in {', '.join(map(str, run_dirs))}")
    for h in sorted(entropies):
        ax.axhline(h, color="black", lw=1, ls=":", label=f"true entropy {h:.4f}")
    ax.set_ylabel("loss (nats/token; an upper bound for MDM)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%.3g")  # 1.5, not 1.5 x 10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or ", ".join(Path(r).name for r in run_dirs))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens" if x == "tokens" else "step")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")  # atomic: a reader never sees a half-written image
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (runs/NAME)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/loss.png for one run, "
                                                          "else ./loss.png)")
    p.add_argument("--x", choices=["step", "tokens"], default="step")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "loss.png" if len(args.runs) == 1 else Path("loss.png"))
    try:
        print(f"wrote {plot_runs(args.runs, out, args.x, args.title)}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
