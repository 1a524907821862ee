"""Issue 28: one prediction path. The kernel's submission equals kk ensemble's on the same rows with the same settings
(full and uncertain TTA, one run and several); a task's metric, declared once, is what early stopping, kk tune,
reports and metrics.json follow; rows are tokenized once per formatter, across folds, passes and evaluations."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from kernel_fakes import make_fake_run

from conftest import tiny_config
from kagglekit.task import LMSYS, TASKS, Metric


@pytest.fixture(scope="module")
def two_runs(tiny_run, tiny_project, tmp_path_factory):
    """The trained tiny DeBERTa run, and a Llama run of 3 fake folds with OOF predictions of their own (so the blend
    has weights to fit: the second run's OOF is noise)."""
    root = tmp_path_factory.mktemp("path")
    llama = make_fake_run(tiny_project, root / "llama", (0, 1, 2), "llama")
    folds = pd.read_csv(tiny_project / "folds.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    for k in range(3):
        ids = folds.loc[folds["fold"] == k, "id"]
        LMSYS.prob_frame(ids.to_numpy(), rng.dirichlet([4, 4, 4], len(ids))).to_csv(llama / f"fold_{k}" / "oof.csv", index=False)
    return tiny_run, llama


@pytest.mark.slow
@pytest.mark.parametrize("tta", [True, "uncertain"])
@pytest.mark.parametrize("several", [False, True])
def test_the_kernels_submission_is_kk_ensembles(two_runs, tiny_project, tmp_path, tta, several):
    """kk ensemble and the kernel's notebook function (run_offline, the dry run's code) on the same test rows: the
    same probabilities, bit for bit. Before the one path, uncertain TTA chose its rows per fold in kk ensemble and by
    the fold mean in the kernel (up to 0.095 apart)."""
    from kagglekit.ensemble import ensemble
    from kagglekit.kernel import build_kernel
    from kagglekit.kernel.offline import run_offline

    runs = list(two_runs) if several else [two_runs[0]]
    sets = [] if tta is True else ["predict.tta=uncertain"]
    rep = ensemble(runs, tiny_project / "test.csv", tmp_path / "ens.csv", tta=tta, overrides=sets or None)
    kernel = build_kernel(runs, "equal-test", tmp_path / "k", user="alice", overrides=sets or None)
    art = kernel / "datasets" / "equal-test-artifacts"
    manifest = json.loads((art / "kk_manifest.json").read_text())
    assert np.allclose(manifest["weights"], rep["weights"]) and manifest["temperature"] == rep["temperature"]
    out = tmp_path / "work" / "submission.csv"
    k = run_offline(art, tiny_project / "test.csv", out, devices=["cpu"])
    assert k["submission_from"] == "pass 2"
    a, b = pd.read_csv(tmp_path / "ens.csv", dtype={"id": str}), pd.read_csv(out, dtype={"id": str})
    assert a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)
    if several:
        assert len(rep["weights"]) == 2


@pytest.mark.slow
def test_the_dry_run_submission_is_kk_ensembles(two_runs, tiny_project, tmp_path):
    """The notebook itself, executed offline: two runs, uncertain TTA."""
    from kagglekit.ensemble import ensemble
    from kagglekit.kernel import build_kernel, dry_run

    sets = ["predict.tta=uncertain"]
    ensemble(list(two_runs), tiny_project / "test.csv", tmp_path / "ens.csv", tta="uncertain", overrides=sets)
    kernel = build_kernel(list(two_runs), "equal-dry", tmp_path / "k", user="alice", overrides=sets)
    res = dry_run(kernel, tiny_project / "test.csv")
    a, b = pd.read_csv(tmp_path / "ens.csv", dtype={"id": str}), pd.read_csv(res["submission"], dtype={"id": str})
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)


# --- the metric, declared once -------------------------------------------------------------------------------------


@pytest.fixture
def upside_down(monkeypatch):
    """A throwaway task: LMSYS scored by its log loss with the direction turned (higher is better), so following it
    means keeping the evaluation with the WORST log loss, which nothing that hard-codes log loss would do."""
    from kagglekit.metrics import log_loss

    task = replace(LMSYS, name="upside", metric=Metric("upside_loss", log_loss, higher_is_better=True))
    monkeypatch.setitem(TASKS, "upside", task)
    return task


@pytest.mark.slow
def test_a_declared_metric_drives_early_stopping_metrics_json_tune_and_report(upside_down, tiny_project, tmp_path):
    from kagglekit.report import build_report
    from kagglekit.train import train_fold
    from kagglekit.tune import open_study, run_tune

    cfg = tiny_config(tiny_project, "task=upside", "train.max_steps=8", "train.eval_every=2", "train.patience=0", "train.lr=3e-3")
    m = train_fold(cfg, 0, tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "fold_0" / "train_log.csv").dropna(subset=["val_loss"])
    assert "val_upside_loss" in log.columns and len(log) >= 3 and log["val_loss"].nunique() > 1
    worst = log.loc[log["val_upside_loss"].idxmax()]
    assert m["best_step"] == worst["step"] and m["best_step"] != log.loc[log["val_loss"].idxmin(), "step"]
    assert m["metric"] == "upside_loss" and m["val_upside_loss"] == pytest.approx(worst["val_upside_loss"], abs=1e-9)
    on_disk = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert on_disk["val_upside_loss"] == m["val_upside_loss"] and on_disk["task"] == "upside"

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    tcfg = tiny_config(tiny_project, "task=upside", "train.max_steps=2", "train.eval_every=1", "name=up")
    tcfg = type(tcfg).model_validate({**tcfg.model_dump(), "tune": {"train.lr": {"low": 1e-4, "high": 1e-3, "log": True}}})
    run_tune(tcfg, 0, n_trials=1, storage=storage, study_name="up", runs_root=tmp_path / "trials")
    study = open_study("up", storage, create=False, task=upside_down)
    assert study.direction.name == "MAXIMIZE"
    trial_metrics = json.loads(next((tmp_path / "trials").rglob("metrics.json")).read_text())
    assert study.best_value == pytest.approx(trial_metrics["val_upside_loss"])

    html = build_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert "metric: upside loss (higher is better)" in html and "upside loss (the task&#x27;s metric)" in html


# --- tokenized once ----------------------------------------------------------------------------------------------------


def _count_encodes(monkeypatch) -> list:
    from kagglekit.formatting import Formatter

    calls, real = [], Formatter.encode_rows
    monkeypatch.setattr(Formatter, "encode_rows", lambda self, df, *a, **k: calls.append(len(df)) or real(self, df, *a, **k))
    return calls


@pytest.mark.slow
def test_rows_are_tokenized_once(tiny_run, tiny_project, tmp_path, monkeypatch):
    """Training with four evaluations: the training rows once, the validation rows once (they were tokenized three
    times per evaluation). kk ensemble over 3 folds with a cold cache: the test rows once (were 3 x 3)."""
    import shutil

    from kagglekit.data import load_train
    from kagglekit.ensemble import ensemble
    from kagglekit.folds import load_folds
    from kagglekit.train import train_fold

    calls = _count_encodes(monkeypatch)
    m = train_fold(tiny_config(tiny_project, "train.epochs=2", "train.eval_every=1", "train.max_steps=4"), 0, tmp_path / "run")
    df, _ = load_train(tiny_project / "train.csv")
    n_val = int((load_folds(tiny_project / "folds.csv", df["id"])["fold"] == 0).sum())
    assert m["steps"] == 4 and sorted(calls) == sorted([len(df) - n_val, n_val]), calls

    run = tmp_path / "cold"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("test.*"))
    calls.clear()
    ensemble([run], tiny_project / "test.csv", tmp_path / "sub.csv")
    assert calls == [40]  # the 40 test rows, once for 3 folds and both orders
    calls.clear()
    ensemble([run], tiny_project / "test.csv", tmp_path / "sub2.csv")  # every fold cached: no model, no tokenizer
    assert calls == []
