"""Probes behind docs/policies.md, "Pretraining: what else was tried". Not part of the package.

Each probe is AdamW plus a host-side rule on the global gradient norm, run on the stress
command's --quick pretraining setup (same model, data, batches and schedule: its AdamW numbers
equal `lbw-kernels stress --mode pretrain`'s). Host-side and syncing on purpose: these decide
whether a rule is worth building into a policy, they are not one.

    python docs/policies/pretrain_probes.py PROBE SEED [LR,LR,...]

PROBE: adamw | clip (clip_grad_norm_(1.0)) | skip (skip calls whose ln(norm) has z > 2.5,
OLMo-style) | slow-start[:START:GROWTH] (scale from START=0.1, xGROWTH=1.1 per calm call, x0.5
on a hot call) | noise
(scale x0.8 while the EMA sd of the step-to-step change of ln(norm) is above 0.5, else x1.02).
"""

import math
import sys

import torch

from lbw_kernels.stress import run as R
from lbw_kernels.stress.corpus import batch_offsets, load_corpus, val_offsets, windows
from lbw_kernels.stress.model import ByteTransformer, ModelConfig


class ZScore:
    """z of ln(norm) against EMA mean/variance (decay 0.9, sd floor 0.25, winsorised at 2.5):
    the statistics of lbw_kernels.policies.ZScorePolicy."""

    def __init__(self, z=2.5, floor=0.25, decay=0.9):
        self.z, self.floor, self.decay, self.mean, self.var = z, floor, decay, None, 0.0

    def hot(self, ln):
        if self.mean is None:
            self.mean = ln
            return False
        sd = max(math.sqrt(self.var), self.floor)
        z = (ln - self.mean) / sd
        d = min(max(ln, self.mean - self.z * sd), self.mean + self.z * sd) - self.mean
        self.mean += (1 - self.decay) * d
        self.var = self.decay * (self.var + (1 - self.decay) * d * d)
        return z > self.z


class NoiseThermostat:
    def __init__(self, threshold=0.5, decay=0.9):
        self.threshold, self.decay, self.prev, self.v, self.n = threshold, decay, None, 0.0, 0

    def hot(self, ln):
        if self.prev is not None:
            self.n += 1
            self.v = self.decay * self.v + (1 - self.decay) * (ln - self.prev) ** 2
        self.prev = ln
        return self.n >= 3 and math.sqrt(self.v / (1 - self.decay**self.n)) > self.threshold


def run(probe, seed, lr):
    probe, *options = probe.split(":")
    start, growth = [float(v) for v in options] + [0.1, 1.1][len(options):]
    P = R.PRESETS["quick"]
    corpus = load_corpus(None, P["max_train_bytes"], P["max_val_bytes"])
    cfg = ModelConfig(P["d_model"], P["layers"], P["heads"], P["ctx"])
    s = R.TrainSettings(steps=P["steps"], batch=P["batch"], warmup=0.05, schedule="cosine", weight_decay=0.01,
                        eval_every=P["eval_every"], spike_factor=2.0, backend="reference")
    torch.manual_seed(seed)
    model = ByteTransformer(cfg)
    offsets = batch_offsets(len(corpus.train), cfg.ctx, s.batch, s.steps, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    detector = NoiseThermostat() if probe == "noise" else ZScore()
    scale, acted = (start if probe == "slow-start" else 1.0), 0
    for step in range(s.steps):
        x, y = windows(corpus.train, offsets[step], cfg.ctx)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.stack([p.grad.double().norm() for p in params]).norm().item()
        hot = norm > 0 and detector.hot(math.log(norm))  # a zero norm: nothing to measure
        acted += hot
        if probe == "slow-start":
            scale = max(0.1, scale * 0.5) if hot else min(1.0, scale * growth)
        elif probe == "noise":
            scale = max(0.1, scale * 0.8) if hot else min(1.0, scale * 1.02)
        elif probe == "clip":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        elif probe == "skip" and hot:
            continue
        for group in opt.param_groups:
            group["lr"] = R.lr_at(step, lr, s) * scale
        opt.step()
    val_offs = val_offsets(len(corpus.val), cfg.ctx, P["val_windows"])
    return R.evaluate(model, corpus.val, val_offs, "cpu", s.batch), acted


if __name__ == "__main__":
    torch.set_num_threads(1)
    probe, seed = sys.argv[1], int(sys.argv[2])
    for lr in (float(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "1e-3,1e-2,3e-2").split(",")):
        val, acted = run(probe, seed, lr)
        print(f"{probe} seed {seed} lr {lr:g}: val {val:.3f}, hot calls {acted}", flush=True)
