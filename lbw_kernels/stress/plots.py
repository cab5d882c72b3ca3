"""PNGs of a stress report: validation loss vs LR per arm, loss curves at the highest LR, the
guard's scale over time at the highest LR, and (with ``--trace``) AdamW's gradient norm over
time at every LR: the traces the guard policies were designed from. One set per mode."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

from .targets import LN256


def _smooth(xs: List[float], k: int = 10) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x if math.isfinite(x) else float("nan"))
        acc = acc[-k:]
        finite = [a for a in acc if math.isfinite(a)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, title, legend; then save and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
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
    # One colour per arm in every figure (by the order arms first appear in the report): the
    # loss curves and the guard's scale plot fewer arms than the LR sweep.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {arm: palette[i % len(palette)] for i, arm in enumerate(dict.fromkeys(r["arm"] for r in runs))}
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
            line, = ax.plot(lrs, ys, marker="o", label=arm, color=color[arm])
            if len({r["seed"] for r in mine}) > 1:
                ax.scatter([r["lr"] for r in mine], [clipped(r["final_val_loss"]) for r in mine],
                           s=12, alpha=0.35, color=line.get_color())
            div = [(r["lr"], clipped(r["final_val_loss"])) for r in mine if r["diverged"]]
            if div:
                ax.scatter(*zip(*div), marker="x", s=80, color=line.get_color(), zorder=3)
        if any(r["diverged"] or r["final_val_loss"] > 0.8 * LN256 for r in rs):
            ax.axhline(LN256, color="k", ls=":", lw=1, label="ln 256 (diverged above)")
        ax.set_xscale("log")
        written.append(_finish(fig, ax, "peak learning rate", "final validation loss (nats/byte; shown at most 2 ln 256)",
                               f"{mode}: validation loss vs LR (x = diverged)\n{caption}",
                               out / f"val_loss_vs_lr_{mode}.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in at_top:
            ax.plot(range(1, len(r["train_loss"]) + 1), _smooth(r["train_loss"]), label=r["arm"], lw=1.2,
                    color=color[r["arm"]])
        written.append(_finish(fig, ax, "step", "training loss (10-step mean)",
                               f"{mode}: loss curves at peak LR {top:.1e} (seed {first_seed})\n{caption}",
                               out / f"loss_curves_{mode}.png"))

        guard = [r for r in at_top if r["scale"]]
        if guard:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for r in guard:
                ax.plot(range(1, len(r["scale"]) + 1), r["scale"], label=r["arm"], lw=1.2, color=color[r["arm"]])
            ax.set_ylim(0, 1.05)
            written.append(_finish(fig, ax, "step", "guard scale (LR multiplier)",
                                   f"{mode}: guard scale over time at peak LR {top:.1e} (seed {first_seed})\n{caption}",
                                   out / f"guard_scale_{mode}.png"))

        traced = [r for r in rs if r["arm"] == "adamw" and r["seed"] == first_seed and r.get("telemetry")]
        if traced:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for r in sorted(traced, key=lambda r: r["lr"]):
                norms = r["telemetry"]["grad_norm"]
                ax.plot(range(1, len(norms) + 1), norms, label=f"lr {r['lr']:.1e}", lw=0.9)
            ax.set_yscale("log")
            written.append(_finish(fig, ax, "step", "global gradient norm (before clipping)",
                                   f"{mode}: AdamW's gradient norm per step (seed {first_seed})\n{caption}",
                                   out / f"grad_norm_trace_{mode}.png"))
    return written
