"""PNGs of a stress report: validation loss vs LR per arm, loss curves at the highest LR, the
guard's scale over time at the highest LR, and (with ``--trace``) AdamW's gradient norm over
time at every LR: the traces the guard policies were designed from. One set per mode."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

LN256 = math.log(256)


def _smooth(xs: List[float], k: int = 10) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x if math.isfinite(x) else float("nan"))
        acc = acc[-k:]
        finite = [a for a in acc if math.isfinite(a)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(report: Dict, out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    env = report["environment"]
    caption = f"{report['model']['params'] / 1e6:.2f}M-param byte transformer, {env['device_name']}"
    written = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        arms = list(dict.fromkeys(r["arm"] for r in rs))
        top = max(r["lr"] for r in rs)
        first_seed = rs[0]["seed"]
        at_top = [r for r in rs if r["lr"] == top and r["seed"] == first_seed]  # curves: one seed

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        clipped = lambda y: min(y, 2 * LN256) if math.isfinite(y) else 2 * LN256  # noqa: E731
        for arm in arms:
            mine = [r for r in rs if r["arm"] == arm]
            lrs = sorted({r["lr"] for r in mine})
            # The mean over seeds as the line; each seed as a faint point when there are several.
            ys = [sum(clipped(r["final_val_loss"]) for r in mine if r["lr"] == lr)
                  / sum(1 for r in mine if r["lr"] == lr) for lr in lrs]
            line, = ax.plot(lrs, ys, marker="o", label=arm)
            if len({r["seed"] for r in mine}) > 1:
                ax.scatter([r["lr"] for r in mine], [clipped(r["final_val_loss"]) for r in mine],
                           s=12, alpha=0.35, color=line.get_color())
            div = [(r["lr"], clipped(r["final_val_loss"])) for r in mine if r["diverged"]]
            if div:
                ax.scatter(*zip(*div), marker="x", s=80, color=line.get_color(), zorder=3)
        if any(r["diverged"] or r["final_val_loss"] > 0.8 * LN256 for r in rs):
            ax.axhline(LN256, color="k", ls=":", lw=1, label="ln 256 (diverged above)")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss (nats/byte)")
        ax.set_title(f"{mode}: validation loss vs LR (x = diverged)\n{caption}", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"val_loss_vs_lr_{mode}.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in at_top:
            ax.plot(range(1, len(r["train_loss"]) + 1), _smooth(r["train_loss"]), label=r["arm"], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title(f"{mode}: loss curves at peak LR {top:.1e} (seed {first_seed})\n{caption}", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"loss_curves_{mode}.png"))

        guard = [r for r in at_top if r["scale"]]
        if guard:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for r in guard:
                ax.plot(range(1, len(r["scale"]) + 1), r["scale"], label=r["arm"], lw=1.2)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("step")
            ax.set_ylabel("guard scale (LR multiplier)")
            ax.set_title(f"{mode}: guard scale over time at peak LR {top:.1e} (seed {first_seed})\n{caption}", fontsize=9)
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"guard_scale_{mode}.png"))

        traced = [r for r in rs if r["arm"] == "adamw" and r["seed"] == first_seed and r.get("telemetry")]
        if traced:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for r in sorted(traced, key=lambda r: r["lr"]):
                norms = r["telemetry"]["grad_norm"]
                ax.plot(range(1, len(norms) + 1), norms, label=f"lr {r['lr']:.1e}", lw=0.9)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("global gradient norm (before clipping)")
            ax.set_title(f"{mode}: AdamW's gradient norm per step (seed {first_seed})\n{caption}", fontsize=9)
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"grad_norm_trace_{mode}.png"))
    return written
