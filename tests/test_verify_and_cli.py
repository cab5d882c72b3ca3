"""The verify harness catches wrong backends; `info` and `verify` run from the command line."""

import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from lbw_kernels import cli
from lbw_kernels.backends import ReferenceBackend, register_backend, _FACTORIES, _INSTANCES
from lbw_kernels.verify import check_backend, verify_backend


def test_reference_passes_its_own_suite():
    assert verify_backend(ReferenceBackend(), seeds=1) == []


class LrOff(ReferenceBackend):
    name = "lr_off"

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        super().adamw_(groups, scale=scale * 1.0001, skip=skip, grad_factor=grad_factor)


class IgnoresSkip(ReferenceBackend):
    name = "ignores_skip"

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        super().adamw_(groups, scale=scale, skip=None, grad_factor=grad_factor)


class IgnoresMask(ReferenceBackend):
    name = "ignores_mask"

    def adamw_telemetry_(self, groups, *, scale, mask_nonfinite, partials_dtype):
        return super().adamw_telemetry_(groups, scale=scale, mask_nonfinite=False, partials_dtype=partials_dtype)


class LeavesLastElement(ReferenceBackend):
    name = "leaves_last"

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        saved = [(p, p.view(-1)[-1:].clone()) for g in groups for p in g.params if p.numel() > 1]
        super().adamw_(groups, scale=scale, skip=skip, grad_factor=grad_factor)
        for p, last in saved:
            p.view(-1)[-1:] = last


class IgnoresGradFactor(ReferenceBackend):
    name = "ignores_grad_factor"

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        super().adamw_(groups, scale=scale, skip=skip)


class WrongSign(ReferenceBackend):
    name = "wrong_sign"

    def telemetry(self, grads, partials_dtype):
        out = super().telemetry(grads, partials_dtype)
        out[:, 1] = out[:, 1].abs()
        return out


@pytest.mark.parametrize("backend", [LrOff, IgnoresSkip, LeavesLastElement, IgnoresGradFactor, WrongSign])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_harness_catches_wrong_backends(backend, dtype):
    assert check_backend(backend(), dtype=dtype)


def test_harness_catches_an_unmasked_nan():
    assert check_backend(IgnoresMask(), nonfinite_at=(0, 2, float("nan")))


def test_verify_command_fails_on_a_mismatch(capsys):
    register_backend("lr_off", LrOff)
    try:
        assert cli.main(["verify", "--backend", "lr_off", "--seeds", "1"]) == 1
        assert "FAILED" in capsys.readouterr().out
        assert cli.main(["verify", "--backend", "reference", "--seeds", "1"]) == 0
    finally:
        _FACTORIES.pop("lr_off")
        _INSTANCES.pop("lr_off", None)


BAD_ARGUMENTS = [
    (["verify", "--backend", "cpq"], "--backend", "unknown backend 'cpq'"),
    (["verify", "--seeds", "0"], "--seeds", "must be >= 1"),
    (["verify", "--show", "-1"], "--show", "must be >= 0"),
    (["bench", "--backend", "cpq"], "--backend", "invalid choice: 'cpq'"),
    (["bench", "--reps", "0"], "--reps", "must be >= 1"),
    (["bench", "--rounds", "x"], "--rounds", "not a whole number"),
    (["bench", "--budget", "0"], "--budget", "must be > 0"),
    (["bench", "--stats-freq", "0"], "--stats-freq", "must be >= 1"),
    (["bench", "--device", "gpu"], "--device", "not a device: 'gpu'"),
    (["bench", "--device", "mps"], "--device", "unsupported device 'mps'"),
    (["stress", "--steps", "0"], "--steps", "must be >= 1"),
    (["stress", "--lrs", "abc"], "--lrs", "not a number: 'abc'"),
    (["stress", "--lrs", "1e-3,-1"], "--lrs", "must be > 0"),
    (["stress", "--lrs", ","], "--lrs", "needs at least one number"),
    (["stress", "--seeds", "1,x"], "--seeds", "not a whole number: 'x'"),
    (["stress", "--warmup", "2"], "--warmup", "must be in [0, 1]"),
    (["stress", "--backend", "cpq"], "--backend", "unknown backend 'cpq'"),
    (["stress", "--weight-decay", "nan"], "--weight-decay", "must be finite"),
]


@pytest.mark.parametrize("argv,option,message", BAD_ARGUMENTS, ids=[" ".join(a[0]) for a in BAD_ARGUMENTS])
def test_a_value_a_command_cannot_use_is_a_usage_error_naming_the_option(argv, option, message, capsys):
    """Refused by the parser, before the command runs: a typo in a backend name used to time no
    guard row and exit 0, 0 seeds verified nothing and said OK, and others ended in tracebacks."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and message in err, err


def test_the_cli_takes_a_registered_backend_and_cuda_only_where_there_is_one(capsys):
    register_backend("lr_off", LrOff)
    try:
        assert cli.build_parser().parse_args(["verify", "--backend", "lr_off"]).backend == ["lr_off"]
        assert cli.build_parser().parse_args(["stress", "--backend", "auto"]).backend == "auto"
    finally:
        _FACTORIES.pop("lr_off")
        _INSTANCES.pop("lr_off", None)
    if torch.cuda.is_available():
        assert cli.build_parser().parse_args(["bench", "--device", "cuda"]).device == "cuda"
    else:
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "--device", "cuda"])
        assert "no CUDA device is visible here" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["bench", "--device", "cpu"]).device == "cpu"


def test_bench_with_no_named_backend_that_runs_here_times_nothing_and_fails(tmp_path, capsys):
    """Not the baselines alone and exit 0: a tuning script's missing rows must show."""
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA: the cuda backend may run")
    rc = cli.main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "cuda", "--no-plot",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the backends named runs on cpu" in err and "backend cuda left out" in err, err
    assert not (tmp_path / "bench.json").exists()


def test_verify_of_a_named_backend_that_is_not_built_fails(capsys):
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA: the cuda backend may be built")
    assert cli.main(["verify", "--backend", "cuda"]) == 1
    assert "cuda       SKIPPED" in capsys.readouterr().out


def test_info_says_where_triton_runs_on_a_machine_without_cuda():
    """Built is not enough: on CPU, Triton takes tensors only through its interpreter, which
    must be on from the start; info says so rather than 'available' alone."""
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA: Triton runs there")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    off = subprocess.run([sys.executable, "-m", "lbw_kernels", "info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert "triton     available, runs on no device here (Triton runs CPU tensors only through its interpreter" in off
    on = subprocess.run([sys.executable, "-m", "lbw_kernels", "info"], capture_output=True, text=True, check=True,
                        env={**env, "TRITON_INTERPRET": "1"}).stdout
    assert "triton     available, runs on cpu (emulated: by name only, never 'auto')" in on


def test_info_and_verify_from_the_shell():
    info = subprocess.run([sys.executable, "-m", "lbw_kernels", "info"], capture_output=True, text=True, check=True)
    for line in ("torch", "backends:", "reference  available, runs on cpu"):
        assert line in info.stdout
    # setup.py's decision on the extension, and why (an install records it; a checkout run in
    # place has none)
    import lbw_kernels

    recorded = Path(lbw_kernels.__file__).with_name("_build_info.py")
    if recorded.exists():
        namespace: dict = {}
        exec(recorded.read_text(), namespace)
        assert f"build       {namespace['BUILD']}" in info.stdout
    verify = subprocess.run(
        [sys.executable, "-m", "lbw_kernels", "verify", "--backend", "reference", "--seeds", "1"],
        capture_output=True, text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "reference  cpu    OK" in verify.stdout


class TruncatingBf16(ReferenceBackend):
    """Stores bf16 params by truncating the fp32 result instead of rounding it: off by under
    one ulp per step, invisible in a single step, a drift over several."""

    name = "truncating"

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        for group in groups:
            wide = [p.float() for p in group.params]
            narrow = group.params
            group.params = wide
            super().adamw_([group], scale=scale, skip=skip, grad_factor=grad_factor)
            group.params = narrow
            for p, w in zip(narrow, wide):
                p.copy_((w.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))


def test_multi_step_stream_catches_truncating_bf16_stores():
    from lbw_kernels.verify import check_backend, check_optimizer_stream

    register_backend("truncating", TruncatingBf16)
    try:
        assert check_optimizer_stream("reference", torch.bfloat16) == []
        one_step = [m for m in check_backend(TruncatingBf16(), dtype=torch.bfloat16) if "adamw_ skip=0" in m.what]
        assert one_step == []  # a single step stays within one ulp
        mismatches = [m for m in check_optimizer_stream("truncating", torch.bfloat16) if "gate=exact" in m.what]
        assert any("params" in m.what for m in mismatches)
    finally:
        _FACTORIES.pop("truncating")
        _INSTANCES.pop("truncating", None)


def test_the_multi_step_stream_checks_the_zscore_controller_and_catches_a_nan_scale(monkeypatch):
    """verify's multi-step stream runs both policies (the kernel backends decide each in their
    own controller kernel): a zscore controller given a wrong option (a cut of 0.1 per unit of
    z over the threshold, against 0.5) is a mismatch, as is a backend whose telemetry reports a
    NaN scale (``abs(nan - x) > tol`` is False: such a check let it pass)."""
    import dataclasses

    from lbw_kernels import controller_op, optimizer
    from lbw_kernels.policies import ZScorePolicy
    from lbw_kernels.verify import check_optimizer_stream

    assert check_optimizer_stream("cpp", torch.float32, policy="zscore") == []
    real = controller_op.controller_config

    def wrong_cut(cfg):  # (the kernel's config; the reference reads the policy object)
        if isinstance(cfg.policy, ZScorePolicy):
            cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, cut_per_z=0.1))
        return real(cfg)

    monkeypatch.setattr(controller_op, "controller_config", wrong_cut)
    mismatches = check_optimizer_stream("cpp", torch.float32, policy="zscore")
    assert any("policy=zscore" in m.what and "scale" in m.what for m in mismatches), mismatches
    monkeypatch.setattr(controller_op, "controller_config", real)
    telemetry = optimizer.GuardedAdamW.telemetry

    def nan_scale(self):
        out = telemetry(self)
        return {**out, "scale": float("nan")} if self.backend == "cpp" else out

    monkeypatch.setattr(optimizer.GuardedAdamW, "telemetry", nan_scale)
    assert any("scale after call 1" in m.what for m in check_optimizer_stream("cpp", torch.float32))


def test_verify_says_when_a_backend_runs_on_no_device_here():
    """A backend that is built but runs on none of this machine's devices (Triton without its
    interpreter and no GPU) was skipped without a word, and verify exited 0 with nothing
    checked; now it says so, and a named one fails."""
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA: Triton runs there")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "lbw_kernels", "verify", "--backend", "triton", "--seeds", "1"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "triton     SKIPPED   runs on none of this machine's devices (cpu)" in res.stdout
