"""`lbw-kernels bench` smoke test, the layouts, and the published-procedure baseline."""

import json
import math

import pytest
import torch

from lbw_kernels import GuardedAdamW, bench
from lbw_kernels.bench import LAYOUTS, build_rows, layout_numel, usable_backends
from lbw_kernels.cli import main
from lbw_kernels.published import PublishedGuardAdamW


def test_layouts_have_the_real_tensor_counts():
    tiny_llama, gpt2 = LAYOUTS["tinyllama-1.1b"](), LAYOUTS["gpt2-124m"]()
    assert len(tiny_llama) == 201 and 1.09e9 < layout_numel(tiny_llama) < 1.11e9
    assert len(gpt2) == 148 and 124.0e6 < layout_numel(gpt2) < 124.7e6
    assert LAYOUTS["2000x65536"]() == [(65536,)] * 2000
    assert len(LAYOUTS["gpt2-30m"]()) == 148 and 25e6 < layout_numel(LAYOUTS["gpt2-30m"]()) < 35e6


def test_rows_cover_baselines_and_every_backend_gate_and_stats_freq():
    names = [r.name for r in build_rows(["reference", "cpp"])]
    for base in ("torch AdamW foreach", "torch AdamW fused", "clip_grad_norm_ + fused", "published sf=1"):
        assert base in names
    for backend in ("reference", "cpp"):
        for gate, floor in (("exact", 32), ("single_pass", 28)):
            for sf in (1, 10):
                row = next(r for r in build_rows([backend]) if r.name == f"guard {backend} {gate} sf={sf}")
                assert row.bytes_per_param == floor
        # exact without the finite check: AdamW alone between telemetry calls (28 B)
        row = next(r for r in build_rows([backend]) if r.name == f"guard {backend} exact sf=10 skip_nonfinite=False")
        assert row.bytes_per_param == 28
        # clip_grad_norm_ inside the step: the exact gate's 32 B, beside clip_grad_norm_ + fused
        row = next(r for r in build_rows([backend]) if r.name == f"guard {backend} exact sf=1 max_grad_norm=1")
        assert row.bytes_per_param == 32


def test_graph_rows_are_the_kernel_backends_steps_captured_beside_captured_fused_adamw():
    """bench --graphs: "add" puts the captured twins (same name plus GRAPH_SUFFIX, graph=True,
    same bytes) of torch fused AdamW and of the kernel backends' guard rows after the eager
    rows; "only" keeps eager torch fused AdamW (what capture saves) and the captured rows; the
    reference backend is not captured; another mode is refused naming the parameter."""
    from lbw_kernels.bench import GRAPH_SUFFIX

    eager = build_rows(["reference", "cuda", "triton"], stats_freqs=(1,))
    added = build_rows(["reference", "cuda", "triton"], stats_freqs=(1,), graphs="add")
    assert [r.name for r in added[: len(eager)]] == [r.name for r in eager] and not any(r.graph for r in eager)
    captured = added[len(eager):]
    assert all(r.graph for r in captured)
    by_name = {r.name: r for r in eager}
    assert [r.name for r in captured] == ["torch AdamW fused" + GRAPH_SUFFIX] + [
        f"guard {b} {g} sf=1" + GRAPH_SUFFIX for b in ("cuda", "triton") for g in ("exact", "single_pass")]
    for r in captured:
        twin = by_name[r.name[: -len(GRAPH_SUFFIX)]]
        assert (r.kind, r.bytes_per_param, r.backend, r.gate, r.stats_freq) == (
            twin.kind, twin.bytes_per_param, twin.backend, twin.gate, twin.stats_freq)
    only = build_rows(["reference", "cuda"], stats_freqs=(1,), graphs="only")
    assert [(r.name, r.graph) for r in only] == [("torch AdamW fused", False)] + [
        (r.name, True) for r in captured if " triton " not in r.name]
    with pytest.raises(ValueError, match="graphs must be one of off, add, only, got 'all'"):
        build_rows(["cuda"], graphs="all")


def test_graphs_are_refused_without_a_cuda_device(tmp_path, capsys):
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--graphs", "add", "--out", str(tmp_path / "b")])
    assert rc == 2 and "--graphs add needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b" / "bench.json").exists()
    with pytest.raises(ValueError, match="graphs='only'"):
        bench.run_bench(["tiny"], torch.device("cpu"), graphs="only")


def test_captured_rows_are_set_beside_captured_fused_adamw(monkeypatch):
    """A captured row's vs fused is against torch fused AdamW captured the same way, an eager
    row's against the eager one (rows marked graph=True with CPU steps stand in: the marking,
    not the capture, picks the baseline)."""
    from lbw_kernels.bench import GRAPH_SUFFIX, Row

    times = {"torch AdamW fused": 4.0, "torch AdamW fused" + GRAPH_SUFFIX: 2.0, "guard": 3.0, "guard" + GRAPH_SUFFIX: 1.0}
    current = []

    def run_row(row, *args):
        current.append(row.name)
        return real_run_row(row, *args)

    real_run_row = bench.run_row
    monkeypatch.setattr(bench, "run_row", run_row)
    # (the copy bandwidth, timed before any row, gets 0.01 ms)
    monkeypatch.setattr(bench, "time_fn",
                        lambda fn, device, warmup, reps, budget_s: [times[current[-1]] if current else 0.01] * 3)
    noop = lambda params: (lambda: None)  # noqa: E731
    rows = [Row(name, "baseline" if "fused" in name else "guard", 28, noop, graph=name.endswith(GRAPH_SUFFIX))
            for name in times]
    table = bench.bench_layout("tiny", torch.device("cpu"), rows, warmup=0, reps=3, budget_s=1.0)
    got = {r["name"]: (r["graph"], r["vs_fused"]) for r in table["rows"]}
    assert got == {"torch AdamW fused": (False, 1.0), "torch AdamW fused" + GRAPH_SUFFIX: (True, 1.0),
                   "guard": (False, 0.75), "guard" + GRAPH_SUFFIX: (True, 0.5)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_captured_rows_time_the_eager_step_replayed(backend):
    """On CUDA: the captured rows of a small layout time without error, and a row's replay is
    its eager step: after make (3 eager warm-up steps) and one replay, the params equal those
    of an eager twin after 4 steps (torch fused AdamW's captured row too)."""
    from lbw_kernels.bench import _guarded, _torch_adamw, graph_rows

    device = torch.device("cuda")
    if backend not in usable_backends(device, [backend])[0]:
        pytest.skip(f"backend {backend} is not usable here")
    rows = graph_rows([backend], ("exact", "single_pass"), (1,))
    table = bench.bench_layout("tiny", device, rows, warmup=1, reps=3, budget_s=1.0)
    assert all(r["error"] is None and r["ms"] > 0 and r["graph"] for r in table["rows"]), table["rows"]
    eager = [_torch_adamw(True, False, capturable=True)] + [_guarded(backend, g, 1) for g in ("exact", "single_pass")]
    for row, make_eager in zip(rows, eager):
        params, twin = (bench.make_params(LAYOUTS["tiny"](), device) for _ in range(2))
        replay, step = row.make(params), make_eager(twin)
        replay()
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        for a, b in zip(params, twin):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{row.name}: {m}")
        assert any(not torch.equal(a, b) for a, b in zip(params, bench.make_params(LAYOUTS["tiny"](), device))
                   if a.numel()), f"{row.name}: the params did not move"


def test_triton_not_timed_through_the_interpreter_on_cpu():
    names, skipped = usable_backends(torch.device("cpu"))
    assert "reference" in names and "triton" not in names


def test_bench_command_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference",
               "--warmup", "1", "--reps", "3", "--budget", "0.2", "--rounds", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    env = report["environment"]
    for key in ("device_name", "torch", "triton", "git_commit", "date"):
        assert key in env
    (table,) = report["tables"]
    assert table["layout"] == "tiny" and table["copy_gbps"] > 0
    rows = {r["name"]: r for r in table["rows"]}
    # torch baselines, published x stats_freq, gate x stats_freq, exact sf=10 without finite check,
    # exact sf=1 with max_grad_norm
    assert len(table["rows"]) == len(rows) == 3 + 2 + 4 + 1 + 1
    for r in rows.values():
        assert r["error"] is None, r
        assert len(r["ms_all"]) >= 6 and r["ms_min"] <= r["ms"]  # two rounds pooled
        assert r["ms"] > 0 and r["gbps"] > 0 and r["x_floor"] > 0 and math.isfinite(r["vs_fused"])
    assert rows["torch AdamW fused"]["vs_fused"] == 1.0
    assert "guard reference single_pass sf=10" in rows
    assert (out / "bench.png").stat().st_size > 1000
    assert "x floor" in capsys.readouterr().out


def test_a_row_that_fails_in_any_round_is_reported_failed_and_the_others_timed(tmp_path, monkeypatch, capsys):
    """One broken backend must not cost the other rows, nor pass for timed: here the
    single_pass sf=10 row raises in the second round only; its first round's samples are not
    reported as a timing. The command writes the JSON and the plot and exits 1 naming it."""
    rounds_seen = []
    real_step = GuardedAdamW.step

    def step(self, closure=None):
        if self.gate == "single_pass" and self.guard_config.stats_freq == 10 and len(rounds_seen) > 1:
            raise RuntimeError("injected failure")
        return real_step(self, closure)

    monkeypatch.setattr(GuardedAdamW, "step", step)
    real_run_row = bench.run_row

    def run_row(row, *args):  # counts rounds by the first row coming round again
        if not rounds_seen or row.name == rounds_seen[0]:
            rounds_seen.append(row.name)
        return real_run_row(row, *args)

    monkeypatch.setattr(bench, "run_row", run_row)
    out = tmp_path / "b"
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference", "--warmup", "1",
               "--reps", "2", "--budget", "0.1", "--rounds", "2", "--out", str(out)])
    assert rc == 1 and len(rounds_seen) == 2
    rows = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["tables"][0]["rows"]}
    broken = rows.pop("guard reference single_pass sf=10")
    assert broken["ms"] is None and broken["x_floor"] is None and "injected failure" in broken["error"]
    assert all(r["error"] is None and r["ms"] > 0 for r in rows.values())
    printed = capsys.readouterr().out
    assert "guard reference single_pass sf=10" in printed and "ERROR RuntimeError: injected failure" in printed
    assert "rows that failed: guard reference single_pass sf=10" in printed
    assert (out / "bench.png").stat().st_size > 1000


def test_bench_fails_when_a_named_backend_is_left_out_after_writing_the_json(tmp_path, monkeypatch, capsys):
    """A GPU run whose Triton failed to import times cuda alone: the command still writes the
    JSON (the rows it did time) and says why, but exits 1, so a device check does not record
    the phase "ok". (usable_backends stands in for that machine.)"""
    left_out = {"triton": "import failed: no module named triton"}
    monkeypatch.setattr(bench, "usable_backends", lambda device, include=None: (["reference"], left_out))
    out = tmp_path / "b"
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference", "--backend", "triton",
               "--gate", "exact", "--stats-freq", "1", "--warmup", "0", "--reps", "3", "--budget", "0.1",
               "--rounds", "1", "--no-plot", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    report = json.loads((out / "bench.json").read_text())
    assert report["backends"] == ["reference"] and "triton" in report["skipped_backends"]
    assert all(r["error"] is None for r in report["tables"][0]["rows"])
    assert "backend triton left out: import failed" in printed
    assert "backends named but not timed: triton" in printed
    # every backend named was timed: 0, as before
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference", "--gate", "exact",
               "--stats-freq", "1", "--warmup", "0", "--reps", "3", "--budget", "0.1", "--rounds", "1",
               "--no-plot", "--out", str(out)])
    assert rc == 0


def test_bench_without_matplotlib_writes_the_json_and_says_the_png_is_left_out(tmp_path, monkeypatch, capsys):
    """matplotlib is an extra: its absence costs the PNG only, not the command's exit status."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (import matplotlib raises ModuleNotFoundError)
    out = tmp_path / "b"
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference", "--gate", "exact",
               "--stats-freq", "1", "--warmup", "0", "--reps", "3", "--budget", "0.1", "--rounds", "1",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert (out / "bench.json").exists() and not (out / "bench.png").exists()
    assert f"{out / 'bench.png'} not written: matplotlib is not installed" in printed


def test_environment_records_a_modified_tree_and_the_switches_that_change_timings(monkeypatch):
    """git_dirty: whether ``git status --porcelain`` lists anything (None where LBW_COMMIT names
    the commit, or git cannot tell); lbw_env: every LBW_* and TRITON_* variable as set."""
    import subprocess

    cpu = torch.device("cpu")
    monkeypatch.delenv("LBW_COMMIT", raising=False)
    monkeypatch.setenv("LBW_EARLY_TELEMETRY", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LBWX_NOT_OURS", "1")
    env = bench.environment(cpu)
    assert env["lbw_env"]["LBW_EARLY_TELEMETRY"] == "0" and env["lbw_env"]["TRITON_INTERPRET"] == "1"
    assert "LBWX_NOT_OURS" not in env["lbw_env"]
    assert env["git_dirty"] in (True, False, None)

    real_run = subprocess.run

    def git_state(listing, rc=0):
        """git as a checkout whose status lists ``listing`` (rc 128: not a checkout) would answer."""
        def run(cmd, **kwargs):
            if cmd[0] != "git":
                return real_run(cmd, **kwargs)
            out = "0123456789abcdef\n" if cmd[1] == "rev-parse" else listing
            return subprocess.CompletedProcess(cmd, rc, stdout=out if rc == 0 else "", stderr="")

        monkeypatch.setattr(subprocess, "run", run)
        env = bench.environment(cpu)
        return env["git_commit"], env["git_dirty"]

    assert git_state(" M lbw_kernels/bench.py\n") == ("0123456789abcdef", True)
    assert git_state("") == ("0123456789abcdef", False)
    assert git_state("", rc=128) == (None, None)
    monkeypatch.setenv("LBW_COMMIT", "feedface")
    assert git_state(" M x\n") == ("feedface", None)


@pytest.mark.parametrize("copy_ms, add_ms", [(2.0, 1.0), (1.0, 2.0)])
def test_cpu_copy_bandwidth_is_the_faster_of_copy_and_in_place_add(monkeypatch, copy_ms, add_ms):
    """On CPU a copy into a separate buffer also reads each destination line (write-allocate),
    so the floor's rate is the higher of copy_ counted at 8 B per element and an in-place add_
    at 12 B. A stand-in timer gives each its time (told apart by the bytes it is counted at):
    no timing threshold to flake."""
    numel = 1024
    ms_of = {8 * numel: copy_ms, 12 * numel: add_ms}
    counted = []

    def fastest_rate(fn, nbytes, device, warmup, reps):
        fn()  # (runs on the real tensors)
        counted.append(nbytes)
        return nbytes / (ms_of[nbytes] * 1e-3)

    monkeypatch.setattr(bench, "_fastest_rate", fastest_rate)
    rate = bench.copy_bandwidth(torch.device("cpu"), numel)
    assert sorted(counted) == [8 * numel, 12 * numel]
    assert rate == max(8 * numel / (copy_ms * 1e-3), 12 * numel / (add_ms * 1e-3))


def test_cpu_copy_bandwidth_is_at_least_the_copy_alone(monkeypatch):
    """The real measurement: positive, finite, and never below what its own copy_ reached (the
    same call's parts: a separately timed copy can land anywhere on a shared machine)."""
    rates = []
    real = bench._fastest_rate

    def fastest_rate(fn, nbytes, device, warmup, reps):
        rates.append((nbytes, real(fn, nbytes, device, warmup, reps)))
        return rates[-1][1]

    monkeypatch.setattr(bench, "_fastest_rate", fastest_rate)
    numel = 1 << 20
    rate = bench.copy_bandwidth(torch.device("cpu"), numel, warmup=1, reps=3)
    copy_rate = dict(rates)[8 * numel]
    assert math.isfinite(rate) and rate >= copy_rate > 0 and rate == max(r for _, r in rates)


def test_loop_timings_are_pooled_over_rounds_and_set_beside_the_alone_ones(tmp_path, monkeypatch, capsys):
    """On CUDA each row is also timed back to back (bench.time_loop; None on CPU, where a step
    is synchronous). With a stand-in loop timer on CPU: each row's loop samples of every round
    are pooled, and its median, x floor and ratio to torch fused's loop median are computed
    from them, not copied from the alone columns; the printed table grows the loop columns."""
    # torch fused 1.0 ms each round; the guard 2.0 ms in round 1, 2.5 ms in round 2 (+- 0.25)
    rounds_of = {}

    def time_loop(fn, device, steps):
        fn()
        row = run_row_names[-1]
        round_ = rounds_of[row] = rounds_of.get(row, 0) + 1
        base = 1.0 if row == "torch AdamW fused" else 1.5 + 0.5 * round_
        return [base, base + 0.25, base - 0.25]

    run_row_names = []
    real_run_row = bench.run_row

    def run_row(row, *args):
        run_row_names.append(row.name)
        return real_run_row(row, *args)

    monkeypatch.setattr(bench, "time_loop", time_loop)
    monkeypatch.setattr(bench, "run_row", run_row)
    out = tmp_path / "b"
    rc = main(["bench", "--layout", "tiny", "--device", "cpu", "--backend", "reference", "--stats-freq", "1",
               "--gate", "exact", "--warmup", "1", "--reps", "3", "--budget", "0.2", "--rounds", "2",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    (table,) = json.loads((out / "bench.json").read_text())["tables"]
    rows = {r["name"]: r for r in table["rows"]}
    fused = rows["torch AdamW fused"]
    assert sorted(fused["ms_loop_all"]) == [0.75, 0.75, 1.0, 1.0, 1.25, 1.25] and fused["ms_loop"] == 1.0
    guard = rows["guard reference exact sf=1"]
    # round 1: 2.0 +- 0.25, round 2: 2.5 +- 0.25 -> median of the six samples
    assert sorted(guard["ms_loop_all"]) == [1.75, 2.0, 2.25, 2.25, 2.5, 2.75]
    assert guard["ms_loop"] == 2.25 and guard["vs_fused_loop"] == 2.25
    assert math.isclose(guard["x_floor_loop"], 2.25 / guard["floor_ms"])
    assert guard["ms"] != guard["ms_loop"] and len(guard["ms_all"]) >= 2  # the alone timings are their own
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("row "))
    assert "loop ms" in header


def test_loop_timing_is_left_out_on_cpu():
    calls = []
    assert bench.time_loop(lambda: calls.append(1), torch.device("cpu"), 5) is None and not calls


@pytest.mark.gpu
def test_loop_timing_times_each_of_the_steps_run_back_to_back_on_cuda():
    calls = []

    def step():  # ~0.1 ms of device work a call, queued without waiting
        calls.append(1)
        torch.cuda._sleep(100_000)

    times = bench.time_loop(step, torch.device("cuda"), 7)
    # one untimed call first (its work still queued when the first timed call's host work runs)
    assert len(calls) == 8 and len(times) == 7 and all(t > 0 for t in times)


def _grads(shapes, k, gen):
    gs = [torch.randn(s, generator=gen) + (0.3 if k % 3 == 0 else -0.2) for s in shapes]
    if k in (5, 6):  # a burst: spike, then oscillation
        gs = [g * 10 for g in gs]
    if k == 12:
        gs[3][7] = float("nan")  # a skipped call
    return gs


def test_published_procedure_equals_guard_reference_exact_sf1():
    """Same guard, computed the slow way: decisions and parameters agree step by step."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3,), (17, 5), (0,), (4097,), (1,)]
    pa = [torch.randn(s, generator=gen) for s in shapes]
    pb = [p.clone() for p in pa]
    pub = PublishedGuardAdamW(pa, lr=1e-2, weight_decay=0.1, stats_freq=1)
    ours = GuardedAdamW(pb, lr=1e-2, weight_decay=0.1, stats_freq=1, gate="exact", backend="reference")
    regimes = set()
    for k in range(30):
        for p, q, g in zip(pa, pb, _grads(shapes, k, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        pub.step()
        ours.step()
        t = ours.telemetry()
        regimes.add(t["regime"])
        assert pub.regime == t["regime"], (k, pub.regime, t)
        assert math.isclose(pub.scale, t["scale"], rel_tol=1e-12)
        assert pub.skipped_steps == t["skipped_steps"]
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert {"calm", "spike", "oscillation", "nonfinite"} <= regimes


def test_device_check_script_parses_and_its_geometry_candidates_exist():
    """A lent GPU's minutes are few: bench/device_check.sh must parse, and every launch
    geometry it times by default must be one the kernels accept (a typo would cost a phase)."""
    import subprocess

    from gpu_checks import DEVICE_CHECK, device_check_candidates, device_check_entries

    subprocess.run(["bash", "-n", str(DEVICE_CHECK)], check=True)
    assert "${LBW_CHECK_TUNE-$TUNE_DEFAULT}" in DEVICE_CHECK.read_text()
    entries = device_check_entries()
    assert {e.split(":", 1)[0] for e in entries} <= {"cuda", "triton"} and len(entries) >= 2  # (the regex found them)
    switches = [e.split(":", 1)[1] for e in entries if e not in device_check_candidates()]
    assert set(switches) <= {"LBW_EARLY_TELEMETRY=0"}, switches  # (the switches the package reads)
    for entry in device_check_candidates():
        backend, spec = entry.split(":", 1)
        if backend == "triton":
            from lbw_kernels.triton_kernels.config import GPU, _overridden

            _overridden(GPU, spec)
            continue
        pytest.importorskip("lbw_kernels._C", reason="the C++ extension is not built")
        from lbw_kernels.cpp_backend import CUDA_GEOMETRY_FIELDS, cuda_geometry
        from lbw_kernels.validation import parse_int_overrides

        with cuda_geometry(**parse_int_overrides("LBW_CUDA_GEOMETRY", spec, CUDA_GEOMETRY_FIELDS)):
            pass  # (ValueError for a geometry without kernels)


def _device_check(out, **env):
    """bench/device_check.sh into ``out`` with ``env`` over a copy of this environment whose own
    LBW_CHECK_* settings are dropped; the finished process."""
    import os
    import subprocess
    import sys

    from gpu_checks import DEVICE_CHECK

    base = {k: v for k, v in os.environ.items() if not k.startswith("LBW_CHECK_")}
    return subprocess.run(["bash", str(DEVICE_CHECK), str(out)], env=dict(base, PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("budget", ["450s", "7.5", "abc", "-5"])
def test_device_check_refuses_a_budget_that_is_not_whole_seconds(tmp_path, budget):
    """Inside a phase such a budget was an arithmetic error that skipped every phase without a
    line and exited 0: refused before anything runs, exit 2, naming the variable."""
    done = _device_check(tmp_path / "dc", LBW_CHECK_BUDGET=budget, LBW_CHECK_SKIP_INSTALL="1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"LBW_CHECK_BUDGET must be whole seconds, got '{budget}'" in done.stderr
    assert not (tmp_path / "dc").exists()  # (no phase ran, nothing written)


def test_device_check_targets_phase_fails_without_bench_json(tmp_path):
    """A second run on a fresh folder with the bench phases skipped has no tables to judge: the
    targets phase says so and fails (it was "ok" beside an empty targets.md). Every other phase
    is skipped, the patterns split over spaces and newlines alike (a newline ended the list)."""
    skip = ("info extension_errors bench_*\ntests_* timeline_* profile_host_*\n"
            "host_stub tune_*  csrc_cuda_*\tmemory_floor verify")
    out = tmp_path / "dc"
    done = _device_check(out, LBW_CHECK_SKIP_INSTALL="1", LBW_CHECK_LAYOUTS="gpt2-quick",
                         LBW_CHECK_BENCH_BACKENDS="cpp", LBW_CHECK_TUNE="", LBW_CHECK_SKIP=skip)
    summary = (out / "summary.txt").read_text().splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    ran = [line for line in summary if "SKIPPED" not in line and not line.startswith("total ")]
    assert len(ran) == 1 and ran[0].startswith("targets FAILED rc=1"), summary
    assert "verify SKIPPED (LBW_CHECK_SKIP)" in summary and "host_stub SKIPPED (LBW_CHECK_SKIP)" in summary
    assert "no bench JSON" in (out / "targets.log").read_text()
    assert (out / "targets.md").read_text() == ""


def test_triton_registers_reports_every_kernel_of_a_geometry():
    """bench/triton_registers.py (registers and occupancy of the Triton kernels, no GPU):
    compiles for sm_90 and reads ptxas's count; needs the CUDA toolkit's ptxas."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("ptxas") is None:
        pytest.skip("ptxas (CUDA toolkit) not on PATH")
    script = Path(__file__).resolve().parents[1] / "bench" / "triton_registers.py"
    out = subprocess.run([sys.executable, str(script), "--geometry", "block=512,num_warps=4",
                          "--geometry", "block=512,num_warps=4,maxnreg=40"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if "fp32" in line or "bf16" in line]
    assert len(rows) == 15  # 5 kernels x (default, the two asked for)
    for row in rows:
        regs, spilled, programs, threads = int(row[-7]), int(row[-6]), int(row[-2]), int(row[-1])
        assert 16 <= regs <= 255 and spilled >= 0 and programs >= 1 and threads == programs * 128  # (4 warps)
    capped = [row for row in rows[10:] if "(single_pass)" in row]  # the one kernel maxnreg caps
    assert len(capped) == 2 and all(int(row[-7]) <= 40 for row in capped)


def test_launch_overhead_script_imports_and_says_what_it_needs():
    """bench/launch_overhead.py (device_check's per-launch host times) imports, and without a
    GPU stops with the reason instead of timing anything."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU, device_check runs it for real")
    script = Path(__file__).resolve().parents[1] / "bench" / "launch_overhead.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 1 and "needs a CUDA device" in done.stderr


def test_tune_table_puts_each_candidate_beside_the_default(tmp_path):
    """bench/tune_table.py reads a device_check folder: the default geometry's rows (the full
    bench) and each tune-N's, with the ratio to the fused baseline of the same process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def report(fused_ms, rows):
        base = [dict(name="torch AdamW fused", kind="baseline", backend=None, ms=fused_ms, x_floor=1.3, error=None)]
        guard = [dict(name=n, kind="guard", backend=b, ms=ms, x_floor=xf, error=None) for n, b, ms, xf in rows]
        return json.dumps({"tables": [{"layout": "tinyllama-1.1b", "rows": base + guard}]})

    (tmp_path / "bench-tinyllama-1.1b").mkdir()
    (tmp_path / "bench-tinyllama-1.1b" / "bench.json").write_text(
        report(10.0, [("guard cuda exact sf=1", "cuda", 9.0, 1.08), ("guard triton exact sf=1", "triton", 9.5, 1.1)]))
    (tmp_path / "tune-1").mkdir()
    (tmp_path / "tune-1" / "bench.json").write_text(report(10.2, [("guard cuda exact sf=1", "cuda", 8.8, 1.05)]))
    (tmp_path / "tune-3").mkdir()
    (tmp_path / "tune-3" / "bench.json").write_text(report(9.9, [("guard cuda exact sf=1", "cuda", 9.1, 1.09)]))
    (tmp_path / "tune.txt").write_text("tune_1 cuda LBW_CUDA_GEOMETRY=warp_partials=1\n"
                                       "tune_2 cuda LBW_CUDA_GEOMETRY=chunk=8192\n"
                                       "tune_3 cuda LBW_EARLY_TELEMETRY=0\n")
    script = Path(__file__).resolve().parents[1] / "bench" / "tune_table.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "| cuda | guard cuda exact sf=1 | default | 9.000 | 1.080 | 0.900 |" in lines
    assert "| cuda | guard cuda exact sf=1 | warp_partials=1 | 8.800 | 1.050 | 0.863 |" in lines
    assert "| cuda | guard cuda exact sf=1 | chunk=8192 (no result) | - | - | - |" in lines
    assert "| cuda | guard cuda exact sf=1 | LBW_EARLY_TELEMETRY=0 | 9.100 | 1.090 | 0.919 |" in lines
    assert not any("triton" in line for line in lines)  # only the tuned backends


def test_tune_table_shows_no_ratio_where_fused_adamw_failed_and_fails_on_unreadable_input(tmp_path):
    """A process whose torch fused AdamW failed (ms None) or is missing gives "-" for its
    ratios, not a crash; a bench JSON or tune.txt that cannot be read exits 1 naming it."""
    import subprocess
    import sys
    from pathlib import Path

    def report(fused, guard_ms):
        rows = [dict(name="guard cuda exact sf=1", kind="guard", backend="cuda", ms=guard_ms, x_floor=1.1, error=None)]
        if fused is not None:
            rows.insert(0, dict(name="torch AdamW fused", kind="baseline", backend=None, **fused))
        return json.dumps({"tables": [{"layout": "tinyllama-1.1b", "rows": rows}]})

    script = Path(__file__).resolve().parents[1] / "bench" / "tune_table.py"
    (tmp_path / "bench-tinyllama-1.1b").mkdir()
    (tmp_path / "bench-tinyllama-1.1b" / "bench.json").write_text(
        report(dict(ms=None, x_floor=None, error="RuntimeError: boom"), 9.0))
    (tmp_path / "tune-1").mkdir()
    (tmp_path / "tune-1" / "bench.json").write_text(report(None, 8.8))
    (tmp_path / "tune-2").mkdir()
    (tmp_path / "tune-2" / "bench.json").write_text(report(dict(ms=10.0, x_floor=1.3, error=None), 8.0))
    (tmp_path / "tune.txt").write_text("tune_1 cuda LBW_CUDA_GEOMETRY=chunk=8192\ntune_2 cuda LBW_EARLY_TELEMETRY=0\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| cuda | guard cuda exact sf=1 | default | 9.000 | 1.100 | - |" in lines
    assert "| cuda | guard cuda exact sf=1 | chunk=8192 | 8.800 | 1.100 | - |" in lines
    assert "| cuda | guard cuda exact sf=1 | LBW_EARLY_TELEMETRY=0 | 8.000 | 1.100 | 0.800 |" in lines
    (tmp_path / "tune-2" / "bench.json").write_text('{"tables": ')
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "tune-2/bench.json: not a readable bench report" in done.stderr, done.stderr
    (tmp_path / "tune.txt").write_text("tune_1 cuda\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "tune.txt: line 1: expected 'tune_N BACKEND VARIABLE=VALUE'" in done.stderr


def test_profile_step_measures_the_triton_host_path_without_launching():
    """bench/profile_step.py --stub-triton-kernels (host time of a Triton step on a CPU-only
    machine): both gates are profiled, no kernel runs (the stubs replace every launch), and
    when each launch is issued is reported, in the order the step issues them (the exact gate
    with its early telemetry pass and without)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(script), "--stub-triton-kernels", "--layout", "tiny", "--steps", "3",
                          "--top", "40"], capture_output=True, text=True, check=True, env=env).stdout
    heads = re.findall(r"=== tiny triton (\w+) sf=1: host [\d.]+ ms/step, \d+ aten ops and 0 kernel launches", out)
    assert heads == ["exact", "single_pass"], out
    assert "lbw::summarize_decide_" in out or "summarize_decide_" in out  # the step ran up to its decision
    assert "interpreter.py" not in out  # no kernel went through Triton's interpreter
    issued = re.findall(r"launches issued at \(from step start, median\): (early telemetry \w+: )?(.*)", out)
    # The exact gate twice, with its early telemetry pass and without (steps interleaved)
    assert [label for label, _ in issued] == ["early telemetry on: ", "early telemetry off: ", ""], out
    names = [[item.split()[0] for item in line.split(", ")] for _, line in issued]
    exact = ["telemetry", "coefficients", "update", "return"]
    assert names == [exact, exact, ["coefficients", "update", "return"]], out
    times = [[float(item.split()[1]) for item in line.split(", ")] for _, line in issued]
    assert all(t == sorted(t) and t[0] > 0 for t in times), out


def test_step_timeline_splits_each_step_into_prefix_busy_and_gaps():
    """bench/step_timeline.py: device spans go to the step they start in (steps synchronised
    one by one); overlapping device spans count once as busy; idle time between the first and
    last kernel is gaps; kernels are listed per name."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import step_timeline as st
    finally:
        sys.path.pop(0)
    S = st.Span
    steps = [S("Optimizer.step#X.step", 0.0, 50.0), S("Optimizer.step#X.step", 1000.0, 1040.0)]
    device = [
        S("telemetry", 20.0, 120.0), S("update", 110.0, 400.0), S("update", 450.0, 500.0),  # step 1
        S("update", 1030.0, 1330.0),  # step 2
    ]
    # launch calls: step 1's first at 8 (the one at 45 is later); none inside step 2's host call
    # (one before it, one after it ended)
    launches = [S("cuLaunchKernelEx", 45.0, 47.0), S("cudaLaunchKernel", 8.0, 12.0),
                S("cudaLaunchKernel", 990.0, 995.0), S("cudaLaunchKernel", 1041.0, 1045.0)]
    one, two = st.split_steps(steps, device, launches)
    assert (one.host, one.prefix, one.busy, one.gaps, one.span) == (50.0, 20.0, 430.0, 50.0, 500.0)
    assert (one.launch, two.launch) == (8.0, None)
    assert [st.is_launch_call(n) for n in ("cuLaunchKernelEx", "cudaLaunchKernel", "cudaMemcpyAsync",
                                           "cudaStreamIsCapturing", "aten::empty")] == [True, True, True, False, False]
    assert one.kernels == {"telemetry": 100.0, "update": 340.0}
    assert (two.prefix, two.busy, two.gaps, two.span, two.kernels) == (30.0, 300.0, 0.0, 330.0, {"update": 300.0})
    assert one.prefix + one.busy + one.gaps == one.span
    med = st.median_split([one, two, one])
    assert (med.prefix, med.busy, med.kernels["telemetry"], med.kernels["update"]) == (20.0, 430.0, 100.0, 340.0)
    assert med.launch == 8.0  # (over the steps that launched)
    # A step without device work (CPU) is host time only.
    (cpu,) = st.split_steps([S("Optimizer.step#X.step", 5.0, 9.0)], [])
    assert (cpu.host, cpu.prefix, cpu.busy, cpu.span) == (4.0, 0.0, 0.0, 4.0)


def test_step_timeline_runs_on_cpu(tmp_path):
    """The script itself end to end without a GPU: one JSON line per row, steps found in the
    profiler's trace (the torch.optim step annotation), no device time."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with a GPU, device_check runs it for real")
    script = Path(__file__).resolve().parents[1] / "bench" / "step_timeline.py"
    out = tmp_path / "t.jsonl"
    done = subprocess.run([sys.executable, str(script), "--layout", "tiny", "--steps", "2", "--backend", "reference",
                           "--gate", "exact", "--stats-freq", "1", "--stats-freq", "10", "--json", str(out)],
                          capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["torch AdamW fused", "guard reference exact sf=1",
                                        "guard reference exact sf=10"], done.stdout
    assert all(r["host"] > 0 and r["busy"] == 0 and r["span"] == r["host"] and r["launch"] is None for r in rows)
    assert all(r["loop_us"] > 0 and r["loop_steps"] == 20 for r in rows)
    assert "guard reference exact sf=1" in done.stdout


def _run_targets(*paths) -> list:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "targets.py"
    done = subprocess.run([sys.executable, str(script), *map(str, paths)], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_targets_judge_each_row_alone_and_back_to_back(tmp_path):
    """bench/targets.py: the issues' GPU targets on each kernel backend's rows, the ratio taken
    from the steps timed alone and from those run back to back; a row the run lacks or that
    failed is said to be so, not judged."""

    def row(name, ms, x_floor, ms_loop=None, x_floor_loop=None, error=None):
        return dict(name=name, ms=ms, x_floor=x_floor, vs_fused=ms / 10.0, ms_loop=ms_loop, x_floor_loop=x_floor_loop,
                    vs_fused_loop=None if ms_loop is None else ms_loop / 9.0, error=error)

    tiny = [row("torch AdamW fused", 10.0, 1.36, 9.0, 1.22),
            row("guard cuda exact sf=1", 8.9, 1.055, 8.5, 1.006),  # over alone, within back to back
            row("guard cuda single_pass sf=1", 7.7, 1.04, 7.5, 1.01),
            row("guard triton exact sf=1", 9.4, 1.10, 9.2, 1.09, error="RuntimeError: boom")]
    many = [row("torch AdamW fused", 8.0, 9.0, 6.0, 6.0),
            row("guard cuda exact sf=1", 2.1, 2.0, 1.1, 1.05),  # 3.8x alone, 5.5x back to back
            row("guard cuda single_pass sf=1", 1.6, 1.8, 1.0, 1.0)]
    env = dict(device="cuda", device_name="NVIDIA H200", git_commit="0123456789abcdef", date="2026-11-28T00:00:00")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(environment=env, backends=["cuda", "triton"], tables=[
        dict(layout="tinyllama-1.1b", rows=tiny), dict(layout="2000x65536", rows=many)])))
    lines = _run_targets(path)
    assert lines[0] == "### bench.json: NVIDIA H200, commit 0123456789, 2026-11-28"
    assert "| target | row | alone | met | loop | met |" in lines
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.055 x | **no** | 1.006 x | yes |" in lines
    assert "| exact faster than torch fused | guard cuda exact sf=1 | 0.890 x fused | yes | 0.944 x fused | yes |" in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard cuda single_pass sf=1 | 1.040 x | yes | 1.010 x | yes |" in lines
    assert "| exact <= 1.05x floor (32 B) | guard triton exact sf=1 | failed |  | failed |  |" in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard triton single_pass sf=1 | not run |  | not run |  |" in lines
    assert "met: 2 of 6 timed alone, 3 of 6 back to back" in lines
    assert "| exact >= 4x faster than torch fused | guard cuda exact sf=1 | 3.810 x faster | **no** | 5.455 x faster | yes |" \
        in lines
    assert "| single_pass >= 4x faster than torch fused | guard cuda single_pass sf=1 | 5.000 x faster | yes | 6.000 x faster | yes |" \
        in lines
    # (the file's backends are judged on every layout: triton's rows missing there are said so)
    assert "| exact >= 4x faster than torch fused | guard triton exact sf=1 | not run |  | not run |  |" in lines
    assert "met: 1 of 4 timed alone, 2 of 4 back to back" in lines
    env_cpu = dict(env, device="cpu", device_name="AMD EPYC")
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(dict(environment=env_cpu, backends=["reference", "cpp"], tables=[dict(
        layout="gpt2-30m", rows=[row("torch AdamW fused", 20.0, 0.8), row("published sf=1", 180.0, 6.0),
                                 row("guard cpp exact sf=1", 23.0, 0.9), row("guard cpp single_pass sf=1", 18.0, 0.7),
                                 row("guard cpp exact sf=10", 25.0, 0.9)])])))
    lines = _run_targets(cpu)
    assert "| target | row | alone | met |" in lines  # no loop columns on CPU
    assert "| exact <= 1.15x torch fused | guard cpp exact sf=1 | 2.300 x fused | **no** |" in lines
    assert "| exact >= 4x faster than published sf=1 | guard cpp exact sf=1 | 7.826 x faster | yes |" in lines
    assert "met: 2 of 5 timed alone" in lines


def test_targets_judge_captured_rows_against_captured_fused_adamw(tmp_path):
    """Rows captured in a CUDA graph (bench --graphs) get a column of their own; their speed-up
    is over captured torch fused AdamW; a table of captured rows alone (--graphs only) shows
    that column alone."""
    from lbw_kernels.bench import GRAPH_SUFFIX

    def row(name, ms, x_floor, ms_loop=None, graph=False):
        return dict(name=name, ms=ms, x_floor=x_floor, vs_fused=None, ms_loop=ms_loop, x_floor_loop=ms_loop and x_floor,
                    vs_fused_loop=None, error=None, graph=graph)

    g = GRAPH_SUFFIX
    tiny = [row("torch AdamW fused", 10.0, 1.36, 9.0), row("guard cuda exact sf=1", 8.9, 1.055, 8.5),
            row("torch AdamW fused" + g, 9.0, 1.2, 9.0, True), row("guard cuda exact sf=1" + g, 8.4, 1.004, 8.4, True)]
    many = [row("torch AdamW fused", 8.0, 9.0), row("torch AdamW fused" + g, 2.4, 2.6, graph=True),
            row("guard cuda exact sf=1" + g, 1.1, 1.05, graph=True),
            row("guard cuda single_pass sf=1" + g, 0.5, 0.5, graph=True)]
    env = dict(device="cuda", device_name="NVIDIA H100", git_commit="0123456789abcdef", date="2026-11-28T00:00:00")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(environment=env, backends=["cuda"], tables=[
        dict(layout="tinyllama-1.1b", rows=tiny), dict(layout="2000x65536", rows=many)])))
    lines = _run_targets(path)
    assert "| target | row | alone | met | loop | met | captured | met |" in lines
    assert ("| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.055 x | **no** | 1.055 x | **no** | "
            "1.004 x | yes |") in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard cuda single_pass sf=1 | not run |  | not run |  | not run |  |" \
        in lines
    # (triton, not in the file's backends, is judged too: left out, not met)
    assert "met: 0 of 6 timed alone, 0 of 6 back to back, 1 of 6 captured in a CUDA graph" in lines
    assert "| target | row | captured | met |" in lines  # the graph-only table
    assert "| exact >= 4x faster than torch fused | guard cuda exact sf=1 | 2.182 x faster | **no** |" in lines
    assert "| single_pass >= 4x faster than torch fused | guard cuda single_pass sf=1 | 4.800 x faster | yes |" in lines
    assert "met: 1 of 4 captured in a CUDA graph" in lines


def test_targets_of_the_h200_run_on_record():
    """The verdicts the README quotes for the H200 run of 2026-11-27, read off its JSON."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    lines = _run_targets(results / "nvidia-h200-tinyllama-1.1b-20261127.json",
                         results / "nvidia-h200-2000x65536-20261127.json")
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.055 x | **no** |" in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard triton single_pass sf=1 | 1.106 x | **no** |" in lines
    assert "| exact >= 4x faster than torch fused | guard cuda exact sf=1 | 3.693 x faster | **no** |" in lines
    assert "| exact >= 4x faster than torch fused | guard triton exact sf=1 | 4.571 x faster | yes |" in lines
    assert lines.count("met: 2 of 6 timed alone") == 1 and lines.count("met: 2 of 4 timed alone") == 1
    # (the geometry summaries beside them in bench/results/ are not bench reports: said so)
    lines = _run_targets(results / "nvidia-h200-geometry-20261127.json")
    assert lines[0] == "### nvidia-h200-geometry-20261127.json: not a bench report (lbw-kernels bench --out writes those)"


def _bench_json(path, rows, layout="tinyllama-1.1b", device="cuda", backends=("cuda", "triton"), skipped=None):
    """A bench report of one table for bench/targets.py; ``rows``: (name, ms, x_floor, vs_fused)."""
    env = dict(device=device, device_name="NVIDIA H200", git_commit="0123456789abcdef", date="2026-11-28T00:00:00")
    path.write_text(json.dumps(dict(
        environment=env, backends=list(backends), skipped_backends=skipped or {}, tables=[dict(layout=layout, rows=[
            dict(name=n, ms=ms, x_floor=xf, vs_fused=vf, error=None) for n, ms, xf, vf in rows])])))
    return path


def test_targets_faster_than_fused_is_not_met_at_a_tie(tmp_path):
    """The target "exact faster than torch fused": 1.000x the fused time is as fast, not faster."""
    rows = [("torch AdamW fused", 10.0, 1.36, 1.0), ("guard cuda exact sf=1", 10.0, 1.04, 1.0),
            ("guard triton exact sf=1", 9.99, 1.04, 0.999)]
    lines = _run_targets(_bench_json(tmp_path / "tie.json", rows))
    assert "| exact faster than torch fused | guard cuda exact sf=1 | 1.000 x fused | **no** |" in lines
    assert "| exact faster than torch fused | guard triton exact sf=1 | 0.999 x fused | yes |" in lines
    # (the floor targets keep their <=: 1.05x exactly is met)
    rows = [("torch AdamW fused", 10.0, 1.36, 1.0), ("guard cuda exact sf=1", 9.0, 1.05, 0.9)]
    lines = _run_targets(_bench_json(tmp_path / "floor.json", rows))
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.050 x | yes |" in lines


def test_targets_call_a_ratio_no_timing_can_give_invalid(tmp_path):
    """NaN, infinite, zero or negative ratios are "invalid", never met (-inf passed a <= limit);
    a row timed at 0 ms is invalid too, not a ZeroDivisionError."""
    rows = [("torch AdamW fused", 10.0, 1.36, 1.0), ("guard cuda exact sf=1", float("nan"), float("nan"), float("nan")),
            ("guard cuda single_pass sf=1", 8.0, float("-inf"), 0.8), ("guard triton exact sf=1", 9.0, 0.0, 0.9),
            ("guard triton single_pass sf=1", 9.0, float("inf"), 0.9)]
    lines = _run_targets(_bench_json(tmp_path / "bad.json", rows))
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | nan x | invalid |" in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard cuda single_pass sf=1 | -inf x | invalid |" in lines
    assert "| exact <= 1.05x floor (32 B) | guard triton exact sf=1 | 0.000 x | invalid |" in lines
    assert "| single_pass <= 1.05x floor (28 B) | guard triton single_pass sf=1 | inf x | invalid |" in lines
    assert "met: 1 of 6 timed alone" in lines  # (triton exact's 0.9 x fused alone)
    rows = [("torch AdamW fused", 8.0, 9.0, 1.0), ("guard cuda exact sf=1", 0.0, 0.0, 0.0),
            ("guard cuda single_pass sf=1", 1.0, 1.0, 0.125), ("guard triton exact sf=1", -2.0, 1.0, 0.125)]
    lines = _run_targets(_bench_json(tmp_path / "zero.json", rows, layout="2000x65536"))
    assert "| exact >= 4x faster than torch fused | guard cuda exact sf=1 | nan x faster | invalid |" in lines
    assert "| exact >= 4x faster than torch fused | guard triton exact sf=1 | nan x faster | invalid |" in lines
    assert "| single_pass >= 4x faster than torch fused | guard cuda single_pass sf=1 | 8.000 x faster | yes |" in lines


def test_targets_read_a_device_with_an_index_as_its_type(tmp_path):
    """bench --device cuda:0 records "cuda:0": the CUDA targets all the same."""
    rows = [("torch AdamW fused", 10.0, 1.36, 1.0), ("guard cuda exact sf=1", 9.0, 1.04, 0.9)]
    lines = _run_targets(_bench_json(tmp_path / "cuda0.json", rows, device="cuda:0"))
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.040 x | yes |" in lines
    assert not any(line.startswith("(no targets") for line in lines)


def test_targets_judge_the_expected_backends_the_run_left_out(tmp_path):
    """On CUDA both kernel backends are judged whatever the file timed: one left out (Triton
    that failed to import) is "not run" with the file's reason, and counts as not met; on CPU
    the cpp backend likewise."""
    rows = [("torch AdamW fused", 10.0, 1.36, 1.0), ("guard cuda exact sf=1", 9.0, 1.04, 0.9),
            ("guard cuda single_pass sf=1", 8.0, 1.04, 0.8)]
    path = _bench_json(tmp_path / "no_triton.json", rows, backends=["cuda"],
                       skipped={"triton": "import failed: a|b"})
    lines = _run_targets(path)
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.040 x | yes |" in lines
    assert ("| exact faster than torch fused | guard triton exact sf=1 | not run (left out: import failed: a\\|b) |  |"
            in lines)
    assert "met: 3 of 6 timed alone" in lines
    # No reason in the file: said left out all the same.
    lines = _run_targets(_bench_json(tmp_path / "no_reason.json", rows, backends=["cuda"]))
    assert "| single_pass <= 1.05x floor (28 B) | guard triton single_pass sf=1 | not run (left out) |  |" in lines
    cpu_rows = [("torch AdamW fused", 20.0, 0.8, 1.0), ("published sf=1", 180.0, 6.0, 9.0)]
    path = _bench_json(tmp_path / "no_cpp.json", cpu_rows, layout="gpt2-30m", device="cpu", backends=["reference"],
                       skipped={"cpp": "the C++ extension is not built"})
    lines = _run_targets(path)
    assert ("| exact <= 1.15x torch fused | guard cpp exact sf=1 | "
            "not run (left out: the C++ extension is not built) |  |") in lines
    assert "met: 0 of 5 timed alone" in lines


def test_targets_exit_non_zero_on_a_file_it_cannot_read_and_judge_the_others(tmp_path):
    """A missing or broken file (device_check's glob matched nothing, a truncated JSON) is said
    to be so and fails the exit status; the readable files are still judged; no file at all is
    a usage error."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "targets.py"
    good = _bench_json(tmp_path / "good.json", [("torch AdamW fused", 10.0, 1.36, 1.0),
                                                ("guard cuda exact sf=1", 9.0, 1.04, 0.9)])
    broken = tmp_path / "broken.json"
    broken.write_text('{"environment": ')
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.json"), str(broken), str(good)],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("### missing.json: cannot be read (FileNotFoundError") for line in lines)
    assert any(line.startswith("### broken.json: cannot be read (JSONDecodeError") for line in lines)
    assert "| exact <= 1.05x floor (32 B) | guard cuda exact sf=1 | 1.040 x | yes |" in lines
    assert "missing.json" in done.stderr and "broken.json" in done.stderr
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "reports" in done.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_passes_times_each_pass_beside_fused_adamw(dtype):
    """bench/cpu_passes.py: the exact step (stats_freq 1 and 10), its two passes alone, fused
    AdamW and torch's own streaming ops, one line each with ms, GB/s and the ratio to fused
    AdamW (1.000x for it); in fp32 and with bf16 params and grads."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_passes.py"
    out = subprocess.run([sys.executable, str(script), "--layout", "tiny", "--calls", "2", "--dtype", dtype],
                         capture_output=True, text=True, check=True).stdout
    assert f" {dtype} parameters" in out, out
    rows = dict(re.findall(r"^(\S.*?)\s+([\d.]+\s+[\d.]+\s+[\d.]+)x$", out, flags=re.M))
    assert set(rows) == {"torch AdamW fused step", "guard cpp exact step", "guard cpp exact step sf=10",
                         "lbw update op (adamw_)", "lbw telemetry pass", "torch sum() of the grads",
                         "torch mul_", "torch add_", "torch addcmul_"}, out
    assert rows["torch AdamW fused step"].split()[-1] == "1.000"
    # (ms > 0; GB/s and the ratio as printed may round to 0 on a loaded machine: fused AdamW took
    # 15 ms a step on this layout while another test run shared the 2 cores)
    assert all(float(cols.split()[0]) > 0 and min(map(float, cols.split())) >= 0 for cols in rows.values()), out
