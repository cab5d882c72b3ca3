"""Guard policies of ours, beside the published rules (``reference.LBWPolicy``, ``policy="lbw"``).

A policy is controller math only: it reads one finite telemetry reading (``x``, the signed
mean, the global gradient norm) and the guard state, and returns the slots it changes and a
regime. It runs as branch-free tensor ops on the device like the published rules, is bounded
the same way (scale in ``[min_scale, 1]``, a bounded change per call), and changes no kernel.
Rule 1 (with ``skip_nonfinite``, a non-finite call is skipped and, when ``auto_enabled``, cuts the
scale to ``max(min_scale, 0.7 * scale)``) is the same for every policy.

Why another policy: measured with ``lbw-kernels stress --trace`` (docs/policies.md), the
published rules act on a quarter to a half of all calls of a healthy run. Their statistic, the
max over tensors of a per-batch mean square, exceeds 1.1x its own EMA on ~30% of calls at a
good learning rate, and the sign of the mean gradient flips on 10-40% of calls, so the scale
sits near ``min_scale`` whatever the learning rate: the guard rescues high learning rates by
dividing every learning rate by ~7, and costs 4.5% (fine-tuning) to 14% (pretraining) of
validation loss at a good one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from . import reference as ref
from .validation import _number, check_count

# ZScorePolicy's own slots, appended to the shared ones.
LOG_NORM_MEAN = ref.STATE_SIZE  # EMA of ln(grad norm)
LOG_NORM_VAR = ref.STATE_SIZE + 1  # EMA variance of ln(grad norm)
Z = ref.STATE_SIZE + 2  # the latest analysed call's z-score
LAST_HOT = ref.STATE_SIZE + 3  # analysed-call number (from 1) of the latest hot call; 0: none yet
SEEN = ref.STATE_SIZE + 4  # non-zero norms the statistics have seen


@dataclass(frozen=True)
class ZScorePolicy:
    """Act on corroborated gradient-norm outliers, measured against the run's own noise
    (``policy="zscore"``).

    Per telemetry call, with ``s = ln(global gradient norm)`` and an EMA mean and variance of
    ``s`` over earlier calls (``ema_decay``), ``z = (s - mean) / max(sd, sd_floor)``. A call with
    ``z > z_threshold`` is *hot*. Then:

    * hot, and another hot call within the last ``window`` calls (``window=0``: always), or
      (``stay_alert``) the scale is still below 1 -> ``"spike"``: the scale is cut by
      ``exp(-cut_per_z * (z - z_threshold))``, by at most ``max_cut`` per call (the further
      out, the harder);
    * hot, uncorroborated -> ``"stress"``: the scale holds;
    * otherwise -> ``"calm"``: the scale grows by ``(1 + growth)``, capped at 1;

    never below ``min_scale``. "Calls" are telemetry calls (every ``stats_freq``-th step); the
    policy was designed and evaluated with ``stats_freq=1``. Why each piece (the evidence is
    in docs/policies.md):

    * ``ln`` of the norm: spikes are multiplicative, and a z-score of ``ln`` does not depend on
      the model's size or the loss's scale.
    * ``window=1`` (two hot calls in a row): fine-tuning at a good learning rate, lone spikes of
      7x the usual norm happen and are harmless (AdamW recovers by itself); at 10-30x the
      learning rate the norm stays high for several calls. Acting on the first hot call cost
      1-3% loss at a good LR on one of two tuning seeds; wider windows, the same.
    * ``stay_alert``: once the policy has cut (or rule 1 has), a lone hot call is evidence
      enough until the scale is back at 1: hysteresis. It cannot act in a run that never had a
      corroborated outlier, so it costs nothing at a good learning rate, and it keeps the scale
      down when fine-tuning at 30x (seed 5: 2.812 -> 2.639 validation loss).
    * winsorising: the statistics see ``s`` clipped to ``mean +- z_threshold * sd``, so a spike
      does not teach them that spikes are normal, nor a near-zero norm that noise is huge; a
      zero norm (a fully masked batch) is not seen at all, and holds the scale.
    * ``sd_floor`` (in nats of the norm: 0.25 is a 28% change) keeps the first calls, whose
      variance estimate is still ~0, from reading ordinary noise as an outlier.
    * multiplicative growth: from ``min_scale=0.1`` back to 1 in ~230 calls, unless the norm
      says otherwise on the way.
    * The sign of the mean gradient is not used: it flips on 25-40% of calls of a healthy run.
    """

    ema_decay: float = 0.9
    z_threshold: float = 2.5
    sd_floor: float = 0.25
    window: int = 1
    cut_per_z: float = 0.5
    max_cut: float = 0.25
    growth: float = 0.01
    stay_alert: bool = True

    name = "zscore"
    extra_slots = ("log_norm_mean", "log_norm_var", "z", "last_hot_call", "norms_seen")

    def __post_init__(self):
        def number(name):
            return _number(f"ZScorePolicy.{name}", getattr(self, name))

        # numpy numbers (a config read with numpy) become Python ones, as GuardedAdamW's own
        # arguments do: the fields ride in every checkpoint, which torch.load(weights_only=True)
        # refuses to unpickle with numpy scalars in it.
        for name in ("ema_decay", "z_threshold", "sd_floor", "cut_per_z", "max_cut", "growth"):
            object.__setattr__(self, name, number(name))
        if isinstance(self.window, numbers.Integral) and not isinstance(self.window, bool):
            object.__setattr__(self, "window", int(self.window))
        if not 0.0 < number("ema_decay") < 1.0:
            raise ValueError(f"ZScorePolicy.ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("z_threshold", "sd_floor", "cut_per_z"):
            if not 0.0 < number(name) < math.inf:
                raise ValueError(f"ZScorePolicy.{name} must be a positive finite number, got {getattr(self, name)}")
        if not 0.0 < number("max_cut") <= 1.0:
            raise ValueError(f"ZScorePolicy.max_cut must be in (0, 1], got {self.max_cut}")
        if not 0.0 <= number("growth") < math.inf:
            raise ValueError(f"ZScorePolicy.growth must be a finite number >= 0, got {self.growth}")
        if not isinstance(self.stay_alert, bool):
            raise TypeError(f"ZScorePolicy.stay_alert must be a bool, got {type(self.stay_alert).__name__}")
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise TypeError(f"ZScorePolicy.window must be an int, got {type(self.window).__name__}")
        if self.window < 0:
            raise ValueError(f"ZScorePolicy.window must be >= 0, got {self.window}")

    def check_slots(self, values: Sequence[float], where: str) -> None:
        """A loaded state's own slots are ones a run can reach (validation.check_guard_values):
        a variance that is not negative (a negative one made sd and every later z NaN: the
        policy never cut again), and the latest hot call's number and the norms seen whole,
        among the analysed calls. (The statistics may be inf or NaN: with skip_nonfinite=False
        an Inf norm reaches them. z is shown, never read.)"""
        analysed = values[ref.ANALYZED]
        var = values[LOG_NORM_VAR]
        if var < 0:
            raise ValueError(f"{where} holds a log_norm_var of {var!r}: a variance is not negative")
        check_count(values[LAST_HOT], "last_hot_call", where, analysed, "analysed-call count")
        check_count(values[SEEN], "norms_seen", where, analysed, "analysed-call count")

    def telemetry(self, state: Tensor) -> dict:
        mean, var, z, last_hot, _ = state[LOG_NORM_MEAN:].tolist()
        return {"z": z, "log_norm_mean": mean, "log_norm_sd": math.sqrt(max(var, 0.0)), "last_hot_call": int(last_hot)}

    def analyze(self, state: Sequence[Tensor], x: Tensor, sign: Tensor, norm: Tensor, cfg: ref.GuardConfig):
        """One finite telemetry reading -> ({slot: new value}, regime code)."""
        scale, mean, var, seen = state[ref.SCALE], state[LOG_NORM_MEAN], state[LOG_NORM_VAR], state[SEEN]
        # A zero gradient (a fully masked batch, a frozen phase) says nothing about the noise:
        # it leaves the statistics and the scale alone (ln 0 would wreck the variance).
        usable = norm > 0
        first = usable & (seen == 0)  # starts the statistics, decides nothing
        s = torch.log(torch.where(usable, norm, torch.ones_like(norm)))
        sd = var.sqrt().clamp_min(self.sd_floor)
        z = torch.where(usable & (seen > 0), (s - mean) / sd, torch.zeros_like(s))
        hot = z > self.z_threshold
        call = state[ref.ANALYZED] + 1
        last_hot = state[LAST_HOT]
        # Corroborated: another hot call within the last `window` calls (window 0: act at once).
        act = hot & ((last_hot > 0) & (call - last_hot <= self.window) | (self.window == 0))
        if self.stay_alert:  # once cut and not yet recovered, a lone hot call is evidence enough
            act = act | (hot & (scale < 1.0))
        new_last_hot = torch.where(hot, call, last_hot)
        cut = torch.exp(-self.cut_per_z * (z - self.z_threshold)).clamp_min(self.max_cut)
        grown = torch.where(usable, (scale * (1 + self.growth)).clamp_max(1.0), scale)
        decided_scale = torch.where(act, (cut * scale).clamp_min(cfg.min_scale), torch.where(hot, scale, grown))
        regime = torch.where(act, ref.SPIKE, torch.where(hot, ref.STRESS, ref.CALM)).to(x.dtype)
        # Winsorised at z = +-z_threshold on both sides: one outlier, high or low, moves the
        # statistics by a bounded amount.
        d = self.ema_decay
        band = self.z_threshold * sd
        delta = torch.minimum(torch.maximum(s, mean - band), mean + band) - mean
        new_mean = torch.where(first, s, torch.where(usable, mean + (1 - d) * delta, mean))
        new_var = torch.where(first | ~usable, var, d * (var + (1 - d) * delta * delta))
        new_seen = seen + usable.to(seen.dtype)
        slots = {LOG_NORM_MEAN: new_mean, LOG_NORM_VAR: new_var, Z: z, LAST_HOT: new_last_hot, SEEN: new_seen,
                 ref.SCALE: decided_scale}
        return slots, regime


POLICIES = {"lbw": ref.LBWPolicy, "zscore": ZScorePolicy}
Policy = Union[ref.LBWPolicy, ZScorePolicy]


def resolve_policy(policy: Union[str, Policy]) -> Policy:
    """``"lbw"``, ``"zscore"`` (their defaults) or a policy instance -> a policy instance."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)} or a policy instance, got {policy!r}")
        return POLICIES[policy]()
    if isinstance(policy, tuple(POLICIES.values())):
        return policy
    raise TypeError(f"policy must be a str or a policy instance, got {type(policy).__name__}")
