"""`lbw-kernels stress` smoke tests: tiny model, a few steps, a corpus written here."""

import json
import math

import pytest

from lbw_kernels.cli import main

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--ctx", "16", "--batch", "4",
        "--val-windows", "4", "--eval-every", "3", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2 + 1\n" * 200)
    return path


def read_report(out):
    return json.loads((out / "stress.json").read_text())


def test_finetune_writes_json_pngs_and_flags_divergence(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    argv = ["stress", "--corpus", str(corpus), "--steps", "6", "--base-steps", "4",
            "--lrs", "1e-3,1e4", "--arms", "adamw,adamw+clip,guard-exact,guard-single_pass",
            "--out", str(out), *TINY]
    assert main(argv) == 0
    report = read_report(out)
    for key in ("environment", "model", "settings", "corpus", "base_models", "runs"):
        assert key in report
    assert report["environment"]["device_name"] and report["environment"]["torch"]
    runs = {(r["arm"], r["lr"]): r for r in report["runs"]}
    assert len(runs) == 8
    for r in report["runs"]:
        for key in ("final_val_loss", "val_ppl", "diverged", "spikes", "max_train_loss", "wall_s", "train_loss", "regimes", "scale"):
            assert key in r
    # An absurd learning rate must be flagged, a sane one not.
    for arm in ("adamw", "adamw+clip", "guard-exact", "guard-single_pass"):
        assert runs[(arm, 1e4)]["diverged"], arm
        assert not runs[(arm, 1e-3)]["diverged"], arm
        assert math.isfinite(runs[(arm, 1e-3)]["final_val_loss"])
    guard = runs[("guard-exact", 1e-3)]
    assert len(guard["scale"]) == guard["steps_done"] == 6
    assert sum(guard["regimes"].values()) == 6 and guard["guard_backend"]
    assert runs[("adamw", 1e-3)]["scale"] == []
    for name in ("val_loss_vs_lr_finetune", "loss_curves_finetune", "guard_scale_finetune"):
        assert (out / f"{name}.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "validation perplexity" in text and "YES" in text
    assert [b["cached"] for b in report["base_models"]] == [False]

    # A second run with the same base config reuses the cached base model.
    assert main(argv[:-len(TINY)] + TINY + ["--no-plot"]) == 0
    assert [b["cached"] for b in read_report(out)["base_models"]] == [True]
    # The base model's loss is measured on the run's own validation windows (4 here), as every
    # run's is; it used 64 whatever --val-windows said.
    assert report["base_models"][0]["val_loss"] == _val_loss_of(report, report["base_models"][0]["path"], corpus)


def _val_loss_of(report, state_path, corpus_path):
    import torch

    from lbw_kernels.stress.corpus import load_corpus, val_offsets
    from lbw_kernels.stress.model import ByteTransformer, ModelConfig
    from lbw_kernels.stress.run import evaluate

    m = report["model"]
    model = ByteTransformer(ModelConfig(m["d_model"], m["layers"], m["heads"], m["ctx"]))
    model.load_state_dict(torch.load(state_path, weights_only=True)["state_dict"])
    corpus = load_corpus(str(corpus_path), report["corpus"]["train_bytes"], report["corpus"]["val_bytes"])
    windows = val_offsets(len(corpus.val), m["ctx"], report["settings"]["val_windows"])
    assert report["settings"]["val_windows"] == 4
    return evaluate(model, corpus.val, windows, torch.device("cpu"), report["settings"]["batch"])


def test_the_perplexity_table_of_a_diverged_run_stays_readable():
    """exp() of a diverged loss (up to 700) printed in full was a ~60-300 digit cell."""
    from lbw_kernels.stress.run import RunResult, format_pivot

    def run(arm, loss, seed=0):
        return RunResult(mode="pretrain", arm=arm, lr=1e-3, seed=seed, final_val_loss=loss, val_ppl=math.exp(loss),
                         diverged=loss > math.log(256), spikes=0, max_train_loss=loss, wall_s=1.0, steps_done=1,
                         train_loss=[loss], val_curve=[[1, loss]])

    text = format_pivot([run("adamw", 138.0), run("guard-exact", 1.5), run("adamw", 139.0, seed=1),
                         run("guard-exact", 1.6, seed=1)])
    assert all(len(line) < 60 for line in text.splitlines()[1:]), text  # (the rows, under their title)
    assert "1.6e+60 (1.5e+60)D" in text and "4.717 (0.47) " in text


def test_pretrain_mode_two_seeds(tmp_path, corpus, capsys):
    out = tmp_path / "pre"
    argv = ["stress", "--mode", "pretrain", "--corpus", str(corpus), "--steps", "3", "--seeds", "0,1",
            "--lrs", "1e-3", "--arms", "adamw,guard-exact-sf10", "--out", str(out), *TINY]
    assert main(argv) == 0
    report = read_report(out)
    assert report["base_models"] == []
    assert {r["mode"] for r in report["runs"]} == {"pretrain"}
    assert (out / "val_loss_vs_lr_pretrain.png").exists()
    assert len(report["runs"]) == 4 and {r["seed"] for r in report["runs"]} == {0, 1}
    sf10 = next(r for r in report["runs"] if r["arm"] == "guard-exact-sf10")
    assert sum(sf10["regimes"].values()) == 1  # telemetry on call 1 only, within 3 steps
    assert "mean over 2 seeds" in capsys.readouterr().out


def test_missing_corpus_names_path(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(SystemExit, match="no-such-corpus"):
        main(["stress", "--corpus", str(missing), "--out", str(tmp_path / "o"), *TINY])


def test_unknown_arm_is_an_error(tmp_path, corpus):
    with pytest.raises(SystemExit, match="nope"):
        main(["stress", "--corpus", str(corpus), "--arms", "adamw,nope", "--out", str(tmp_path / "o"), *TINY])


def test_trace_policy_arms_and_targets(tmp_path, corpus, capsys):
    out = tmp_path / "tr"
    arms = "adamw,adamw+clip,adamw+zclip,guard-exact,zscore-exact,zscore-single_pass"
    argv = ["stress", "--mode", "pretrain", "--corpus", str(corpus), "--steps", "4", "--lrs", "1e-3,1e-2,3e-2",
            "--arms", arms, "--trace", "--out", str(out), *TINY]
    assert main(argv) == 0
    report = read_report(out)
    for r in report["runs"]:
        tel = r["telemetry"]
        assert sorted(tel) == ["grad_ms", "grad_norm", "signed_mean"]
        assert all(len(v) == r["steps_done"] == 4 for v in tel.values())
        assert all(math.isfinite(x) and x > 0 for x in tel["grad_norm"] + tel["grad_ms"])
        if r["arm"].startswith("zscore"):
            assert set(r["regimes"]) <= {"calm", "stress", "spike"} and r["scale"]
    # Every arm starts from the same weights and batch: the first step's gradient is the same.
    firsts = {r["telemetry"]["grad_norm"][0] for r in report["runs"]}
    assert max(firsts) == pytest.approx(min(firsts), rel=1e-12)
    assert {t["arm"] for t in report["targets"]} == set(arms.split(","))
    assert (out / "grad_norm_trace_pretrain.png").stat().st_size > 1000
    assert "targets (mean val loss over seeds)" in capsys.readouterr().out


# --- refusals before any training (review items 4-8) ----------------------------------------
def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_an_empty_arm_list_is_an_error(tmp_path, corpus):
    out = tmp_path / "o"
    for arms in (",", ""):
        with pytest.raises(SystemExit, match="--arms: needs at least one arm"):
            main(["stress", "--corpus", str(corpus), "--arms", arms, "--out", str(out), *TINY])
    assert not list(out.glob("base-*.pt"))  # the base model was not trained first


def test_duplicate_seeds_and_lrs_are_refused(tmp_path, corpus, capsys):
    common = ["stress", "--corpus", str(corpus), "--out", str(tmp_path / "o"), *TINY]
    err = _usage_error(capsys, common + ["--seeds", "0,1,0"])
    assert "--seeds" in err and "duplicate value 0" in err
    err = _usage_error(capsys, common + ["--lrs", "1e-3, 0.001"])
    assert "--lrs" in err and "duplicate value 0.001" in err


def test_seeds_out_of_range_are_refused(tmp_path, corpus, capsys):
    common = ["stress", "--corpus", str(corpus), "--out", str(tmp_path / "o"), *TINY]
    for bad in ("99999999999999999999999", str(2**63 - 1000), "-1"):
        err = _usage_error(capsys, common + [f"--seeds={bad}"])
        assert "--seeds" in err and "2**63 - 1000" in err
    from lbw_kernels import cli_args

    assert cli_args.seeds(f"0,{2**63 - 1001}") == [0, 2**63 - 1001]


def test_stress_runs_without_tqdm(monkeypatch, capsys):
    import sys

    from lbw_kernels.stress import run

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ModuleNotFoundError
    for disable in (True, False):
        bar = run._progress_bar(10, disable)
        bar.set_postfix_str("x")
        bar.update(3)
        bar.close()
    assert "tqdm is not installed" in capsys.readouterr().out


def test_stress_skips_pngs_without_matplotlib(monkeypatch, tmp_path, capsys):
    import sys

    from lbw_kernels.stress import plots, run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run._plots({"runs": [], "environment": {}, "model": {}}, tmp_path)
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())

    def broken(report, out):
        raise ModuleNotFoundError("No module named 'PIL'", name="PIL")

    monkeypatch.setattr(plots, "plot_all", broken)
    with pytest.raises(ModuleNotFoundError):  # other plotting errors still fail
        run._plots({}, tmp_path)


def test_a_backend_that_cannot_run_here_is_refused_before_training(tmp_path, corpus):
    import torch

    from lbw_kernels.backends import registered_names, select_backend

    unusable = []
    for name in registered_names():
        try:
            select_backend(name, torch.device("cpu"))
        except (ValueError, RuntimeError):
            unusable.append(name)
    if not unusable:
        pytest.skip("every registered backend runs on cpu here")
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match=f"--backend {unusable[0]}"):
        main(["stress", "--corpus", str(corpus), "--device", "cpu", "--backend", unusable[0],
              "--arms", "adamw,guard-exact", "--lrs", "1e-3", "--steps", "2", "--base-steps", "2",
              "--out", str(out), *TINY])
    assert not list(out.glob("base-*.pt"))


def test_model_and_corpus_errors_name_the_options(tmp_path, corpus):
    out = ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"--d-model \(16\) must be a multiple of --heads \(3\)"):
        main(["stress", "--corpus", str(corpus), *out, *TINY, "--heads", "3"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="--corpus .*no files found"):
        main(["stress", "--corpus", str(empty), *out, *TINY])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x" * 40)  # a 4-byte validation split, ctx 16
    with pytest.raises(SystemExit, match=r"--corpus .*validation split has 4 bytes.*--ctx \+ 1 = 17"):
        main(["stress", "--corpus", str(tiny), *out, *TINY])


# --- the yardstick when AdamW diverges to a non-finite loss (review item 4) -----------------
NAN = float("nan")


def _runs(table, seeds=(0,)):
    return [{"mode": "finetune", "arm": a, "lr": lr, "seed": s, "final_val_loss": v}
            for a, row in table.items() for lr, v in row.items() for s in seeds]


def test_targets_credit_a_rescue_when_adamw_is_nan():
    from lbw_kernels.stress.targets import LN256, format_targets, policy_targets

    table = {"adamw": {1e-3: 2.2, 1e-2: NAN, 3e-2: NAN},
             "adamw+clip": {1e-3: 2.2, 1e-2: 2.6, 3e-2: 3.0},
             "guard-exact": {1e-3: 2.3, 1e-2: 2.35, 3e-2: NAN}}
    rows = {r["arm"]: r for r in policy_targets(_runs(table))}
    g = rows["guard-exact"]
    assert g["x10"]["excess_removed"] == pytest.approx((LN256 - 2.35) / (LN256 - 2.2))
    assert g["x10"]["no_worse_than_clip"] is True and g["x10"]["adamw_diverged"] == 1
    assert g["x30"]["excess_removed"] == pytest.approx(0.0) and g["x30"]["diverged"] == 1
    assert g["x30"]["no_worse_than_clip"] is False
    # A loss above ln 256 is diverged too, and counts as ln 256.
    above = policy_targets(_runs({**table, "adamw": {1e-3: 2.2, 1e-2: 50.0, 3e-2: NAN}}))
    assert [r for r in above if r["arm"] == "guard-exact"][0]["x10"]["excess_removed"] == pytest.approx(
        g["x10"]["excess_removed"])
    text = format_targets(list(rows.values()))
    line = next(x for x in text.splitlines() if x.startswith("finetune  guard-exact"))
    assert "96%c" in line and line.endswith(" 0% D  yes")  # the diverged 30x cell keeps its mark


def test_targets_choose_lr_star_among_finite_means_and_survive_one_nan_seed():
    from lbw_kernels.stress.targets import LN256, policy_targets

    rows = policy_targets(_runs({"adamw": {1e-4: NAN, 1e-3: 2.2, 1e-2: 2.8},
                                 "guard-exact": {1e-4: 2.9, 1e-3: 2.3, 1e-2: 2.4}}))
    assert rows[0]["best_lr"] == 1e-3
    assert rows[1]["at_best_vs_adamw"] == pytest.approx(2.3 / 2.2 - 1)
    # One NaN seed of two: the cell counts it as ln 256 instead of becoming NaN.
    runs = _runs({"adamw": {1e-3: 2.2, 1e-2: 3.0}, "guard-exact": {1e-3: 2.2, 1e-2: 2.4}}, seeds=(0, 1))
    next(r for r in runs if r["arm"] == "adamw" and r["lr"] == 1e-2 and r["seed"] == 1)["final_val_loss"] = NAN
    g = policy_targets(runs)[1]["x10"]
    assert g["adamw_diverged"] == 1 and g["diverged"] == 0
    assert g["excess_removed"] == pytest.approx(((3.0 + LN256) / 2 - 2.4) / ((3.0 + LN256) / 2 - 2.2))
