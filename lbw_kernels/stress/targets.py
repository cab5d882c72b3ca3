"""The policy issue's yardstick, computed from a stress report (mean validation loss over seeds).

Per mode: the best AdamW learning rate ``lr*`` of the grid; then per arm
* at ``lr*``: the loss relative to AdamW's (target for a guard: within +1%, "no harm");
* at ``10 lr*`` and ``30 lr*`` (when the grid has them, within 5%): the share of AdamW's excess
  loss over its ``lr*`` loss that the arm removes (target: >= 50%), and whether the arm is no
  worse than ``clip_grad_norm_(1.0)`` there;
* whether the arm is no worse than the published rules at every learning rate of the grid
  (``guard-single_pass`` for a single_pass arm when the grid has it, else ``guard-exact``; the
  target asks it of finetune mode).

A diverged run (final loss non-finite, or above ln 256: worse than guessing bytes uniformly)
counts as ln 256, the divergence ceiling, in these numbers: an AdamW run that ends in NaN is the
most excess there is to remove, not a cell without a number, and one NaN seed does not make its
cell's mean NaN. ``lr*`` is chosen among the AdamW learning rates whose mean loss is finite.
Finite runs below the ceiling count as they are. Each cell records how many seeds diverged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

# The loss of a model that predicts the 256 byte values uniformly: a run whose validation loss
# ends above it has learned nothing, and counts as diverged (run.py, the yardstick below, plots).
LN256 = math.log(256)


def mean_losses(runs: Sequence[dict]) -> Dict[tuple, float]:
    cells = defaultdict(list)
    for r in runs:
        cells[(r["mode"], r["arm"], r["lr"])].append(r["final_val_loss"])
    return {k: sum(v) / len(v) for k, v in cells.items()}


def _diverged(r: dict) -> bool:
    loss = r["final_val_loss"]
    return bool(r.get("diverged")) or not math.isfinite(loss) or loss > LN256


def capped_mean_losses(runs: Sequence[dict]) -> Dict[tuple, float]:
    """Like :func:`mean_losses`, a diverged run's loss counting as ln 256."""
    cells = defaultdict(list)
    for r in runs:
        cells[(r["mode"], r["arm"], r["lr"])].append(LN256 if _diverged(r) else r["final_val_loss"])
    return {k: sum(v) / len(v) for k, v in cells.items()}


def diverged_counts(runs: Sequence[dict]) -> Dict[tuple, int]:
    """(mode, arm, lr) -> how many of its seeds diverged."""
    counts: Dict[tuple, int] = defaultdict(int)
    for r in runs:
        counts[(r["mode"], r["arm"], r["lr"])] += _diverged(r)
    return dict(counts)


def _lr_near(lrs: Sequence[float], target: float) -> Optional[float]:
    close = [lr for lr in lrs if abs(lr / target - 1) < 0.05]
    return close[0] if close else None


def policy_targets(runs: Sequence[dict]) -> List[dict]:
    """One row per (mode, arm): the numbers above; None where the grid lacks what is needed."""
    raw = mean_losses(runs)
    loss = capped_mean_losses(runs)
    div = diverged_counts(runs)
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        lrs = sorted({lr for (m, a, lr) in loss if m == mode and a == "adamw"})
        if not lrs:
            continue
        # lr* among finite means (min() would keep a NaN first: x < nan is always False); when
        # every AdamW mean is non-finite, every capped one is ln 256 and the first LR is kept.
        finite = [lr for lr in lrs if math.isfinite(raw[(mode, "adamw", lr)])] or lrs
        best = min(finite, key=lambda lr: loss[(mode, "adamw", lr)])
        base = loss[(mode, "adamw", best)]
        for arm in dict.fromkeys(a for (m, a, _) in loss if m == mode):
            row = {"mode": mode, "arm": arm, "best_lr": best,
                   "at_best_vs_adamw": loss[(mode, arm, best)] / base - 1 if (mode, arm, best) in loss else None,
                   "at_best_diverged": div.get((mode, arm, best), 0)}
            for mult in (10, 30):
                lr = _lr_near(lrs, mult * best)
                key = f"x{mult}"
                if lr is None or (mode, arm, lr) not in loss:
                    row[key] = None
                    continue
                excess = loss[(mode, "adamw", lr)] - base
                clip = loss.get((mode, "adamw+clip", lr))
                row[key] = {
                    "lr": lr,
                    "loss": raw[(mode, arm, lr)],
                    "diverged": div[(mode, arm, lr)],
                    "adamw_diverged": div[(mode, "adamw", lr)],
                    "excess_removed": (loss[(mode, "adamw", lr)] - loss[(mode, arm, lr)]) / excess if excess > 0 else None,
                    "no_worse_than_clip": None if clip is None else loss[(mode, arm, lr)] <= clip,
                }
            rival = "guard-exact"
            if arm.endswith("single_pass") and any(a == "guard-single_pass" for (m, a, _) in loss if m == mode):
                rival = "guard-single_pass"
            shared = [lr for lr in lrs if (mode, rival, lr) in loss and (mode, arm, lr) in loss]
            row["no_worse_than_published_everywhere"] = (
                all(loss[(mode, arm, lr)] <= loss[(mode, rival, lr)] for lr in shared) if shared else None
            )
            rows.append(row)
    return rows


def format_targets(rows: Sequence[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}%"

    lines = ["targets (mean val loss over seeds): at lr* vs AdamW (<= +1%); share of AdamW's excess "
             "removed at 10x / 30x lr* (>= 50%), c = no worse than clip (? = no clip arm ran); P = no worse than the published rules "
             "(same gate) at every LR; D = the arm diverged there in some seed (a diverged loss counts as ln 256)"]
    lines.append(f"{'mode':<9} {'arm':<20} {'lr*':>8} {'at lr*':>9} {'10x':>11} {'30x':>11}  P")
    for r in rows:
        cells = []
        for key in ("x10", "x30"):
            c = r[key]
            if c is None:
                cells.append(f"{'-':>10} ")
                continue
            mark = "D" if c.get("diverged") else " "
            if c["excess_removed"] is None:
                cells.append(f"{'-':>10}{mark}")
            else:
                flag = {True: "c", False: " ", None: "?"}[c["no_worse_than_clip"]]
                cells.append(f"{100 * c['excess_removed']:>8.0f}%{flag}{mark}")
        p = {True: "yes", False: "no", None: "-"}[r["no_worse_than_published_everywhere"]]
        at_best = pct(r["at_best_vs_adamw"]) + ("D" if r.get("at_best_diverged") else " ")
        lines.append(f"{r['mode']:<9} {r['arm']:<20} {r['best_lr']:8.1e} {at_best:>9} "
                     f"{cells[0]} {cells[1]}  {p}")
    return "\n".join(lines)
