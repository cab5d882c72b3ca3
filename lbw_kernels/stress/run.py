"""``lbw-kernels stress``: does the guard keep a small language model trainable at high learning rates?

Trains a byte-level transformer (:mod:`.model`) on a corpus (:mod:`.corpus`) once per optimizer
arm and learning rate, with the same initial weights, seed and batch order in every arm, and
reports per arm and LR: final validation loss and perplexity, whether it diverged
(non-finite, or validation loss above ln 256: worse than guessing bytes uniformly), training
loss spikes, wall time, and for the guard arms the regimes it saw and its scale over time.

Modes: ``pretrain`` trains from scratch at each LR; ``finetune`` trains a base model once at
``--base-lr`` (cached under ``--out``, keyed by its config) and continues from it at each LR,
as in the paper's setting (fine-tuning a pretrained model). Learning rates follow the same
schedule in every arm: linear warm-up over ``--warmup`` of the steps, then cosine decay to
10% (``--schedule constant`` keeps the peak).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..policies import ZScorePolicy
from .corpus import Corpus, batch_offsets, load_corpus, val_offsets, windows
from .model import ByteTransformer, ModelConfig
from .targets import LN256, format_targets, policy_targets
from .zclip import ZClip

# Arm name -> (optimizer kind, options). All guard arms read telemetry every call
# (stats_freq=1) but the one named -sf10, which runs the published default. guard-* arms run
# the published rules (policy "lbw"), zscore-* arms lbw_kernels.policies.ZScorePolicy;
# adamw+clip is clip_grad_norm_(1.0), adamw+zclip the adaptive clipping of zclip.py; the
# +clip guard arms clip by 1.0 inside the step.
ARMS: Dict[str, dict] = {
    "adamw": {"kind": "adamw", "clip": None},
    "adamw+clip": {"kind": "adamw", "clip": 1.0},
    "adamw+zclip": {"kind": "adamw", "zclip": True},
    "guard-exact": {"kind": "guard", "gate": "exact", "stats_freq": 1},
    "guard-single_pass": {"kind": "guard", "gate": "single_pass", "stats_freq": 1},
    "guard-exact-sf10": {"kind": "guard", "gate": "exact", "stats_freq": 10},
    "zscore-exact": {"kind": "guard", "gate": "exact", "stats_freq": 1, "policy": "zscore"},
    "zscore-single_pass": {"kind": "guard", "gate": "single_pass", "stats_freq": 1, "policy": "zscore"},
    # window=0: acts on the first hot call, uncorroborated (the trade-off in docs/policies.md)
    "zscore-exact-w0": {"kind": "guard", "gate": "exact", "stats_freq": 1, "policy": ZScorePolicy(window=0)},
    # clip_grad_norm_(1.0) inside the guarded step (max_grad_norm); the guard reads the
    # gradients before clipping
    "guard-exact+clip": {"kind": "guard", "gate": "exact", "stats_freq": 1, "max_grad_norm": 1.0},
    "zscore-exact+clip": {"kind": "guard", "gate": "exact", "stats_freq": 1, "policy": "zscore",
                          "max_grad_norm": 1.0},
}
DEFAULT_ARMS = ("adamw", "adamw+clip", "guard-exact", "guard-single_pass", "guard-exact-sf10", "zscore-exact")

# Presets: --quick (the default) fits 5 minutes on 2 CPU cores with margin; --full is larger.
PRESETS = {
    "quick": dict(d_model=96, layers=2, heads=4, ctx=64, batch=16, steps=200, base_steps=400,
                  max_train_bytes=2_000_000, max_val_bytes=200_000, val_windows=64, eval_every=50),
    "full": dict(d_model=256, layers=4, heads=8, ctx=128, batch=32, steps=1000, base_steps=2000,
                 max_train_bytes=20_000_000, max_val_bytes=1_000_000, val_windows=256, eval_every=100),
}
DEFAULT_BASE_LR = 1e-3
DEFAULT_LR_MULTS = (1, 3, 10, 30)


@dataclass
class TrainSettings:
    steps: int
    batch: int
    warmup: float
    schedule: str
    weight_decay: float
    eval_every: int
    spike_factor: float
    backend: str
    trace: bool = False


@dataclass
class RunResult:
    mode: str
    arm: str
    lr: float
    seed: int
    final_val_loss: float
    val_ppl: float
    diverged: bool
    spikes: int
    max_train_loss: float  # the worst training loss seen: how far a run blew up before recovering
    wall_s: float
    steps_done: int
    train_loss: List[float]
    val_curve: List[List[float]]  # [step, val loss]
    guard_backend: Optional[str] = None
    regimes: Dict[str, int] = field(default_factory=dict)
    scale: List[float] = field(default_factory=list)
    min_scale_seen: Optional[float] = None
    skipped_steps: int = 0
    # --trace: the raw gradients' telemetry every step (before any clipping), whatever the arm:
    # grad_ms (max over tensors of mean g^2), signed_mean, grad_norm; the input policies are
    # designed from.
    telemetry: Dict[str, List[float]] = field(default_factory=dict)


def lr_at(step: int, peak: float, s: TrainSettings) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine to 10% (or constant)."""
    warm = max(1, int(s.warmup * s.steps))
    if step < warm:
        return peak * (step + 1) / warm
    if s.schedule == "constant":
        return peak
    progress = (step - warm) / max(1, s.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(arm: str, params, lr: float, s: TrainSettings):
    spec = ARMS[arm]
    if spec["kind"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    from ..optimizer import GuardedAdamW

    return GuardedAdamW(
        params, lr=lr, weight_decay=s.weight_decay, gate=spec["gate"],
        stats_freq=spec["stats_freq"], backend=s.backend, policy=spec.get("policy", "lbw"),
        max_grad_norm=spec.get("max_grad_norm"),
    )


@torch.no_grad()
def record_telemetry(params, out: Dict[str, List[float]]) -> None:
    """Append this step's gradient telemetry (the reference's sums, float64) to ``out``."""
    from .. import reference as ref

    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
    partials = ref.telemetry_partials([g.double() for g in grads], torch.float64)
    x, signed_mean, grad_norm, _ = ref.summarize(partials, numels, use_max_rms=True).tolist()
    for key, value in (("grad_ms", x), ("signed_mean", signed_mean), ("grad_norm", grad_norm)):
        out.setdefault(key, []).append(value)


@torch.no_grad()
def evaluate(model: ByteTransformer, data: torch.Tensor, offsets: torch.Tensor, device, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(offsets), batch):
        x, y = windows(data, offsets[i : i + batch], model.cfg.ctx)
        loss = model.loss(x.to(device), y.to(device))
        total += loss.item() * len(x)
        count += len(x)
    model.train()
    return total / count


def count_spikes(losses: Sequence[float], factor: float, window: int = 20, min_history: int = 5) -> int:
    """Steps whose training loss is non-finite or above ``factor`` x the median of the previous
    ``window`` steps (fewer at the start, but at least ``min_history``: a fine-tuning run that
    blows up in its first steps must count, and that is where high learning rates hit)."""
    spikes = 0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            spikes += 1
        elif i >= min_history:
            prev = sorted(x for x in losses[max(0, i - window) : i] if math.isfinite(x))
            if prev and loss > factor * prev[len(prev) // 2]:
                spikes += 1
    return spikes


def train(
    model: ByteTransformer,
    arm: str,
    peak_lr: float,
    corpus: Corpus,
    offsets: torch.Tensor,
    val_offs: torch.Tensor,
    s: TrainSettings,
    device: torch.device,
    mode: str,
    seed: int = 0,
    bar=None,
) -> RunResult:
    """Train ``model`` in place with one arm at one peak LR; stop early once it has diverged."""
    spec = ARMS[arm]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(arm, params, peak_lr, s)
    zclip = ZClip() if spec.get("zclip") else None
    is_guard = spec["kind"] == "guard"
    guard_backend = None
    if is_guard:
        from ..backends import select_backend

        guard_backend = select_backend(s.backend, device).name
    train_loss: List[float] = []
    val_curve: List[List[float]] = []
    scale: List[float] = []
    regimes: Dict[str, int] = {}
    telemetry: Dict[str, List[float]] = {}
    skipped = 0
    bad_streak = 0
    start = time.perf_counter()
    step = 0
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak_lr, s)
        x, y = windows(corpus.train, offsets[step], model.cfg.ctx)
        loss = model.loss(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.trace:
            record_telemetry(params, telemetry)
        if spec.get("clip"):
            torch.nn.utils.clip_grad_norm_(params, spec["clip"])
        if zclip is not None:
            zclip.clip_(params)
        opt.step()
        value = loss.item()
        train_loss.append(value)
        if is_guard:
            t = opt.telemetry()  # syncs; fine here, this loop syncs on the loss anyway
            scale.append(t["scale"])
            if t["skipped_steps"] > skipped or opt.guard_config.is_telemetry_call(step + 1):
                regimes[t["regime"]] = regimes.get(t["regime"], 0) + 1
            skipped = t["skipped_steps"]
        if bar is not None:
            bar.update(1)
        bad_streak = bad_streak + 1 if not math.isfinite(value) else 0
        if bad_streak >= 10:  # parameters are non-finite: nothing more to learn from this run
            if bar is not None:
                bar.update(s.steps - step - 1)
            break
        if (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
            val_curve.append([step + 1, evaluate(model, corpus.val, val_offs, device, s.batch)])
    final = evaluate(model, corpus.val, val_offs, device, s.batch)
    val_curve.append([step + 1, final])
    wall = time.perf_counter() - start
    diverged = not math.isfinite(final) or final > LN256
    return RunResult(
        mode=mode, arm=arm, lr=peak_lr, seed=seed,
        final_val_loss=final,
        val_ppl=math.exp(final) if math.isfinite(final) and final < 700 else float("inf"),
        diverged=diverged,
        spikes=count_spikes(train_loss, s.spike_factor),
        max_train_loss=max((x for x in train_loss if math.isfinite(x)), default=float("nan")),
        wall_s=wall, steps_done=step + 1, train_loss=train_loss, val_curve=val_curve,
        guard_backend=guard_backend, regimes=regimes, scale=scale,
        min_scale_seen=min(scale) if scale else None, skipped_steps=skipped, telemetry=telemetry,
    )


# ---------------------------------------------------------------------------------------
# Base model for finetune mode, cached by config
# ---------------------------------------------------------------------------------------
def base_model(
    cfg: ModelConfig, corpus: Corpus, s: TrainSettings, base_lr: float, seed: int,
    device: torch.device, out: Path, bar=None,
) -> tuple:
    """Train (or load from ``out``) the base model: AdamW at ``base_lr`` for ``s.steps`` steps."""
    key_src = json.dumps(
        {"model": asdict(cfg), "corpus": corpus.fingerprint, "steps": s.steps, "batch": s.batch,
         "lr": base_lr, "seed": seed, "wd": s.weight_decay, "schedule": s.schedule,
         "warmup": s.warmup},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = out / f"base-{key}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if bar is not None:
            bar.update(s.steps)
        return saved["state_dict"], {"cached": True, "path": str(path), "seed": seed, **saved["info"]}
    torch.manual_seed(seed)
    model = ByteTransformer(cfg).to(device)
    offsets = batch_offsets(len(corpus.train), cfg.ctx, s.batch, s.steps, seed + 1000)
    val_offs = val_offsets(len(corpus.val), cfg.ctx, 64)
    res = train(model, "adamw", base_lr, corpus, offsets, val_offs, s, device, "base", seed, bar)
    info = {"lr": base_lr, "steps": s.steps, "seed": seed, "val_loss": res.final_val_loss, "wall_s": res.wall_s, "key": key}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "info": info}, path)
    return state, {"cached": False, "path": str(path), **info}


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------
def format_table(runs: Sequence[RunResult]) -> str:
    lines = [f"{'mode':<9} {'arm':<18} {'lr':>8} {'seed':>4} {'val loss':>9} {'val ppl':>9} {'div':>4} "
             f"{'spikes':>6} {'max loss':>8} {'wall s':>7} {'min scale':>9}  regimes"]
    for r in runs:
        ms = f"{r.min_scale_seen:9.3f}" if r.min_scale_seen is not None else f"{'-':>9}"
        reg = " ".join(f"{k}={v}" for k, v in sorted(r.regimes.items())) or "-"
        lines.append(
            f"{r.mode:<9} {r.arm:<18} {r.lr:8.1e} {r.seed:4d} {r.final_val_loss:9.4f} {r.val_ppl:9.3f} "
            f"{'YES' if r.diverged else 'no':>4} {r.spikes:6d} {r.max_train_loss:8.3f} {r.wall_s:7.1f} {ms}  {reg}"
        )
    return "\n".join(lines)


def _ppl(value: float, decimals: int) -> str:
    # (a diverged run's perplexity, exp of a loss up to 700, would print ~300 digits)
    return f"{value:.{decimals}f}" if value < 1e5 else f"{value:.1e}"


def format_pivot(runs: Sequence[RunResult]) -> str:
    """Validation perplexity, arms x learning rates, per mode: the mean over seeds (with the
    spread, max - min, when there are several); D = diverged in at least one seed."""
    out = []
    n_seeds = len({r.seed for r in runs})
    for mode in dict.fromkeys(r.mode for r in runs):
        rs = [r for r in runs if r.mode == mode]
        lrs = sorted({r.lr for r in rs})
        what = f"mean over {n_seeds} seeds (spread)" if n_seeds > 1 else "one seed"
        out.append(f"[{mode}] validation perplexity, {what}; D = diverged")
        width = 18 if n_seeds > 1 else 12
        out.append(f"{'arm':<18}" + "".join(f"{lr:>{width}.1e}" for lr in lrs))
        for arm in dict.fromkeys(r.arm for r in rs):
            cells = []
            for lr in lrs:
                cell = [x for x in rs if x.arm == arm and x.lr == lr]
                if not cell:
                    cells.append(" " * width)
                    continue
                ppl = [x.val_ppl for x in cell]
                text = _ppl(sum(ppl) / len(ppl), 3)
                if n_seeds > 1:
                    text += f" ({_ppl(max(ppl) - min(ppl), 2)})"
                cells.append(f"{text:>{width - 1}}{'D' if any(x.diverged for x in cell) else ' '}")
            out.append(f"{arm:<18}" + "".join(cells))
    return "\n".join(out)


def add_parser(subparsers) -> None:
    from .. import cli_args

    p = subparsers.add_parser(
        "stress",
        help="train a small byte-level transformer at rising learning rates: AdamW, clipping and the guard",
        description=__doc__.split("\n\n")[0],
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="the default: a model and run count that finish in ~5 minutes on 2 CPU cores")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="a larger model, more steps and data (GPU or patience)")
    p.set_defaults(preset="quick")
    p.add_argument("--mode", choices=["pretrain", "finetune", "both"], default="finetune",
                   help="finetune (default: the paper's setting), pretrain from scratch, or both")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--lrs", type=cli_args.positive_floats, default=None,
                   help=f"comma list of distinct peak learning rates (default: base-lr x {DEFAULT_LR_MULTS})")
    p.add_argument("--base-lr", type=cli_args.positive_float, default=DEFAULT_BASE_LR,
                   help="a good LR: the grid's first point and the finetune base model's LR")
    for name in ("d_model", "layers", "heads", "ctx", "batch", "steps", "base_steps",
                 "max_train_bytes", "max_val_bytes", "val_windows", "eval_every"):
        p.add_argument("--" + name.replace("_", "-"), type=cli_args.int_at_least(1), default=None,
                       help="overrides the preset")
    p.add_argument("--warmup", type=cli_args.fraction, default=0.05, help="fraction of steps of linear warm-up")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--weight-decay", type=cli_args.non_negative_float, default=0.01,
                   help="every arm (the guard's default)")
    p.add_argument("--spike-factor", type=cli_args.positive_float, default=1.2,
                   help="a spike: train loss above this x the median of the previous 20 steps")
    p.add_argument("--backend", type=cli_args.backend_or_auto, default="auto",
                   help="GuardedAdamW backend for the guard arms")
    p.add_argument("--seeds", type=cli_args.seeds, default=[0],
                   help="comma list of distinct seeds in [0, 2**63 - 1000); each seeds the init, the base model and the batch order (default 0)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: the Python stdlib's sources)")
    p.add_argument("--device", type=cli_args.device, default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--threads", type=cli_args.int_at_least(1), default=None,
                   help="torch CPU threads (default: 1 for --quick on CPU, else torch's default)")
    p.add_argument("--out", default="lbw-runs/stress", help="folder for stress.json, PNGs and the cached base model")
    p.add_argument("--trace", action="store_true",
                   help="record every arm's gradient telemetry each step (grad_ms, signed_mean, grad_norm) in stress.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


class _NoBar:
    """What the loop asks of a tqdm bar, doing nothing: --no-progress, or tqdm (an extra) missing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, disable: bool):
    """A tqdm bar, or a :class:`_NoBar` when disabled or when tqdm (the ``[plots]`` extra) is not
    installed: the command runs without it."""
    if disable:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "tqdm":
            raise
        print("no progress bar: tqdm is not installed (pip install tqdm)")
        return _NoBar()
    return tqdm(total=total, desc="stress", unit="step", dynamic_ncols=True)


def _plots(report: Dict, out: Path) -> None:
    """The PNGs of the report. matplotlib is an extra: without it they are said to be left out and
    the command goes on (stress.json, already written, holds every number), as bench does."""
    from .plots import plot_all

    try:
        paths = plot_all(report, out)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        print(f"PNGs not written to {out}: matplotlib is not installed (pip install matplotlib)")
        return
    for path in paths:
        print(f"wrote {path}")


def main(args: argparse.Namespace) -> int:
    from ..bench import environment

    preset = dict(PRESETS[args.preset])
    for name in preset:
        if getattr(args, name, None) is not None:
            preset[name] = getattr(args, name)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not arms:
        raise SystemExit(f"--arms: needs at least one arm; choose from {list(ARMS)}")
    if preset["d_model"] % preset["heads"]:
        raise SystemExit(f"--d-model ({preset['d_model']}) must be a multiple of --heads ({preset['heads']})")
    seeds = args.seeds
    lrs = args.lrs or [args.base_lr * m for m in DEFAULT_LR_MULTS]
    modes = ["pretrain", "finetune"] if args.mode == "both" else [args.mode]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads
    if threads is None and device.type == "cpu" and args.preset == "quick":
        # The quick model is too small to gain from intra-op threads, and on a shared machine
        # each parallel op waits for a descheduled thread: measured on 2 busy cores, 1 thread
        # took 146-169 s for the quick grid, 2 threads 711 s.
        threads = 1
    if any(ARMS[a]["kind"] == "guard" for a in arms):
        # train() selects it per guard run; one that cannot run here must stop the command
        # now, not after the base model and the AdamW arms have trained.
        from ..backends import select_backend

        try:
            select_backend(args.backend, device)
        except (ValueError, RuntimeError) as err:
            raise SystemExit(f"--backend {args.backend}: {err}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        corpus = load_corpus(args.corpus, preset["max_train_bytes"], preset["max_val_bytes"])
    except FileNotFoundError as err:
        raise SystemExit(f"lbw-kernels stress: {err}")
    except ValueError as err:
        raise SystemExit(f"--corpus {args.corpus}: {err}")
    for split, data in (("training", corpus.train), ("validation", corpus.val)):
        if len(data) <= preset["ctx"] + 1:
            raise SystemExit(f"--corpus {corpus.source}: its {split} split has {len(data)} bytes, "
                             f"needs more than --ctx + 1 = {preset['ctx'] + 1}")

    cfg = ModelConfig(preset["d_model"], preset["layers"], preset["heads"], preset["ctx"])
    settings = TrainSettings(
        steps=preset["steps"], batch=preset["batch"], warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, eval_every=preset["eval_every"],
        spike_factor=args.spike_factor, backend=args.backend, trace=args.trace,
    )
    base_settings = TrainSettings(**{**asdict(settings), "steps": preset["base_steps"], "trace": False})
    val_offs = val_offsets(len(corpus.val), cfg.ctx, preset["val_windows"])
    n_params = ByteTransformer(cfg).num_params()
    print(f"stress: {n_params / 1e6:.2f}M-param byte transformer {asdict(cfg)} on {device}; "
          f"corpus {corpus.source}: {len(corpus.train) / 1e6:.2f} MB train, {len(corpus.val) / 1e6:.2f} MB val "
          f"(disjoint files); arms {arms}; peak LRs {lrs}; {settings.steps} steps of {settings.batch}x{cfg.ctx} bytes")

    total = len(modes) * len(seeds) * len(arms) * len(lrs) * settings.steps
    if "finetune" in modes:
        total += len(seeds) * base_settings.steps
    bar = _progress_bar(total, args.no_progress)
    runs: List[RunResult] = []
    started = time.perf_counter()
    base_infos = []
    for mode in modes:
        for seed in seeds:
            if mode == "finetune":
                bar.set_postfix_str(f"base model seed {seed}")
                init_state, info = base_model(cfg, corpus, base_settings, args.base_lr, seed, device, out, bar)
                # Its loss on this run's validation windows, as every run's (the base model's own
                # record uses 64, and a cached one may come from a run with other settings).
                base = ByteTransformer(cfg)
                base.load_state_dict(init_state)
                info["val_loss"] = evaluate(base.to(device), corpus.val, val_offs, device, settings.batch)
                base_infos.append(info)
            else:
                torch.manual_seed(seed)
                init_state = {k: v.clone() for k, v in ByteTransformer(cfg).state_dict().items()}
            offsets = batch_offsets(len(corpus.train), cfg.ctx, settings.batch, settings.steps, seed)
            for lr in lrs:
                for arm in arms:
                    bar.set_postfix_str(f"{mode} seed {seed} {arm} lr={lr:.1e}")
                    model = ByteTransformer(cfg)
                    model.load_state_dict(init_state)
                    model.to(device)
                    torch.manual_seed(seed)  # dropout-free, but keeps any randomness aligned
                    runs.append(train(model, arm, lr, corpus, offsets, val_offs, settings, device, mode, seed, bar))
    bar.close()
    elapsed = time.perf_counter() - started

    report = {
        "environment": environment(device),
        "command_args": {k: v for k, v in vars(args).items() if k != "func"},
        "model": {**asdict(cfg), "params": n_params},
        "cpu_threads": torch.get_num_threads(),
        "settings": {**asdict(settings), "base_steps": base_settings.steps, "base_lr": args.base_lr,
                     "lrs": lrs, "arms": arms, "modes": modes, "seeds": seeds,
                     "val_windows": len(val_offs), "diverged_if_val_loss_above": LN256},
        "corpus": {"source": corpus.source, "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
                   "train_files": len(corpus.train_files), "val_files": len(corpus.val_files),
                   "fingerprint": corpus.fingerprint},
        "base_models": base_infos,
        "total_wall_s": elapsed,
        "runs": [asdict(r) for r in runs],
    }
    print()
    for info in base_infos:
        print(f"finetune base model (seed {info['seed']}): AdamW lr={info['lr']:.1e}, {info['steps']} steps, "
              f"val loss {info['val_loss']:.4f} ({'cached' if info['cached'] else 'trained'}: {info['path']})")
    print(format_table(runs))
    print()
    print(format_pivot(runs))
    targets = policy_targets(report["runs"])
    report["targets"] = targets
    print()
    print(format_targets(targets))
    json_path = out / "stress.json"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=True))
    print(f"\ntotal {elapsed:.0f} s; wrote {json_path}")
    if not args.no_plot:
        _plots(report, out)
    return 0
