"""The stress report's policy yardstick (lbw_kernels/stress/targets.py) on hand-made runs, and
the ZClip baseline's clipping rule."""

import math

import pytest
import torch

from lbw_kernels.stress.targets import format_targets, policy_targets
from lbw_kernels.stress.zclip import ZClip


def runs_from(table, mode="finetune", seeds=(0, 1)):
    """{arm: {lr: loss}} -> stress runs; seed s gets loss + 0.01*(s - mean seed) (mean unchanged)."""
    out = []
    for arm, row in table.items():
        for lr, loss in row.items():
            for s in seeds:
                out.append({"mode": mode, "arm": arm, "lr": lr, "seed": s,
                            "final_val_loss": loss + 0.01 * (s - sum(seeds) / len(seeds))})
    return out


def test_targets_from_hand_made_runs():
    table = {
        "adamw":       {1e-3: 2.20, 3e-3: 2.10, 3e-2: 2.70, 9e-2: 3.10},
        "adamw+clip":  {1e-3: 2.20, 3e-3: 2.10, 3e-2: 2.60, 9e-2: 3.00},
        "guard-exact": {1e-3: 2.30, 3e-3: 2.20, 3e-2: 2.40, 9e-2: 2.90},
        "zscore-exact": {1e-3: 2.21, 3e-3: 2.11, 3e-2: 2.30, 9e-2: 3.05},
    }
    rows = {r["arm"]: r for r in policy_targets(runs_from(table))}
    z = rows["zscore-exact"]
    assert z["best_lr"] == 3e-3
    assert z["at_best_vs_adamw"] == pytest.approx(2.11 / 2.10 - 1)
    assert z["x10"]["lr"] == 3e-2 and z["x10"]["excess_removed"] == pytest.approx(0.4 / 0.6)
    assert z["x10"]["no_worse_than_clip"] is True
    assert z["x30"]["excess_removed"] == pytest.approx(0.05 / 1.0) and z["x30"]["no_worse_than_clip"] is False
    assert z["no_worse_than_published_everywhere"] is False  # 3.05 > 2.90 at 9e-2
    assert rows["guard-exact"]["no_worse_than_published_everywhere"] is True
    text = format_targets(policy_targets(runs_from(table)))
    assert "zscore-exact" in text and "67%c" in text


def test_targets_without_10x_in_the_grid_are_none():
    rows = policy_targets(runs_from({"adamw": {1e-3: 2.0, 3e-3: 2.1}, "zscore-exact": {1e-3: 2.0, 3e-3: 2.2}}))
    assert all(r["x10"] is None and r["x30"] is None for r in rows)


def test_zclip_leaves_ordinary_gradients_and_clips_an_outlier():
    p = torch.zeros(4)
    clip = ZClip(alpha=0.9, z_thresh=2.5, warmup=5)
    norms = [1.0, 1.2, 0.8, 1.1, 0.9]  # warm-up: mean 1.0, variance 0.02
    for n in norms:
        p.grad = torch.full((4,), n / 2)  # norm n
        assert clip.clip_([p]) == pytest.approx(n)
    assert clip.mean == pytest.approx(1.0) and clip.var == pytest.approx(0.02)
    p.grad = torch.full((4,), 1.05 / 2)
    assert clip.clip_([p]) == pytest.approx(1.05) and torch.linalg.vector_norm(p.grad) == pytest.approx(1.05)
    mean, sd = clip.mean, math.sqrt(clip.var)
    p.grad = torch.full((4,), 10.0 / 2)
    z = (10.0 - mean) / sd
    want = mean + 2.5**2 / z * sd
    assert clip.clip_([p]) == pytest.approx(want)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(want, rel=1e-6)
