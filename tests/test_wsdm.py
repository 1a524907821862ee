"""The WSDM Cup 2025 Multilingual Chatbot Arena end to end, through the CLI, on a tiny model: synthetic
parquet -> folds stratified by label and language -> 2 folds trained (2 classes, A<->B swap) -> predict
with TTA -> ensemble (weights on log loss, id,winner labels checked against a sample submission) ->
report (accuracy per language) -> kernel and its offline dry run (finding test.parquet) -> tune (maximises
accuracy). The same code trains LMSYS (tests/test_train.py and the others)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli
from kagglekit.task import WSDM


def _ok(*args):
    r = run_cli(*args)
    assert r.exit_code == 0, (args, r.output)
    return r


def _sets(root):
    return ["task=wsdm", f"data.train={root / 'train.parquet'}", f"data.test={root / 'test.parquet'}",
            f"data.folds={root / 'folds.csv'}", f"model.backbone={root / 'tiny'}", "model.max_length=64",
            "train.epochs=1", "train.eval_every=2", "train.eval_batch_size=64"]


@pytest.fixture(scope="module")
def wsdm(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsdm")
    _ok("synth", "--task", "wsdm", "--n", "80", "--seed", "1", "--out", root / "train.parquet")
    _ok("synth", "--task", "wsdm", "--n", "24", "--seed", "2", "--test", "--out", root / "test.parquet")
    _ok("tiny-model", root / "tiny", "--task", "wsdm", "--train", root / "train.parquet", "--vocab-size", "500", "--hidden", "32")
    _ok("make-folds", "--task", "wsdm", "--train", root / "train.parquet", "--k", "2", "--stratify-language",
        "--out", root / "folds.csv")
    sets = [a for s in _sets(root) for a in ("--set", s)]
    _ok("train", "--fold", "all", "--config", REPO / "configs" / "tiny.yaml", "--run", root / "run", *sets)
    test = pd.read_parquet(root / "test.parquet")
    pd.DataFrame({"id": test["id"], "winner": "model_a"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def test_training_is_two_class_and_chooses_by_accuracy(wsdm):
    for k in (0, 1):
        fold = wsdm / "run" / f"fold_{k}"
        assert "task: wsdm" in (fold / "config.yaml").read_text()
        m = json.loads((fold / "metrics.json").read_text())
        assert m["task"] == "wsdm" and m["metric"] == "accuracy" and set(m["val_per_class_accuracy"]) == {"A", "B"}
        assert m["val_log_loss"] > 0 and 0 <= m["val_accuracy"] <= 1  # log loss reported beside accuracy
        oof = pd.read_csv(fold / "oof.csv")
        assert list(oof.columns) == ["id", "winner_model_a", "winner_model_b"]
        assert np.allclose(oof[["winner_model_a", "winner_model_b"]].sum(axis=1), 1)
        log = pd.read_csv(fold / "train_log.csv").dropna(subset=["val_loss"])
        assert "val_accuracy" in log.columns and len(log) >= 2  # several evaluations to choose from
        # the kept step is the best accuracy (ties: the lower log loss), not the best log loss
        best = log.sort_values(["val_accuracy", "val_loss"], ascending=[False, True]).iloc[0]
        assert m["best_step"] == int(best["step"]) and m["val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_tta_maps_a_and_b_back_exactly(wsdm):
    from kagglekit.data import load_test, swap_frame
    from kagglekit.predict import FoldModel

    fm = FoldModel(wsdm / "run" / "fold_0")
    assert fm.task is WSDM and fm.model.config.num_labels == 2
    df, _ = load_test(wsdm / "test.parquet", task=WSDM)
    p = fm.predict(df)["probs"]
    assert p.shape == (len(df), 2)
    assert np.array_equal(fm.predict(swap_frame(df, WSDM))["probs"], p[:, [1, 0]])  # bit for bit


def test_predict_ensemble_and_report(wsdm):
    from kagglekit.ensemble import ensemble

    r = _ok("predict", "--run", wsdm / "run", "--fold", "0", "--test", wsdm / "test.parquet")
    assert "winner_model_b" in r.stdout and "winner_tie" not in r.stdout
    assert list(pd.read_csv(wsdm / "run" / "fold_0" / "test.csv").columns) == ["id", "winner_model_a", "winner_model_b"]
    _ok("ensemble", "--run", wsdm / "run", "--test", wsdm / "test.parquet", "--sample-submission",
        wsdm / "sample_submission.csv", "--out", wsdm / "sub.csv")
    sub = pd.read_csv(wsdm / "sub.csv", dtype=str)
    test = pd.read_parquet(wsdm / "test.parquet")
    assert list(sub.columns) == ["id", "winner"] and sub["id"].tolist() == test["id"].tolist()
    # the labels are the argmax of the calibrated ensemble's probabilities
    rep = ensemble([wsdm / "run"], wsdm / "test.parquet", wsdm / "sub2.csv")
    assert rep["task"] == "wsdm" and rep["test_probs"].shape == (len(test), 2)
    assert sub["winner"].tolist() == [WSDM.label_values[j] for j in rep["test_probs"].argmax(1)]
    # a sample submission of the other competition is refused, naming the mismatch
    pd.DataFrame({"id": test["id"], "winner_model_a": 0.3, "winner_model_b": 0.3, "winner_tie": 0.4}).to_csv(
        wsdm / "lmsys_sample.csv", index=False)
    r = run_cli("ensemble", "--run", wsdm / "run", "--test", wsdm / "test.parquet", "--sample-submission",
                wsdm / "lmsys_sample.csv", "--out", wsdm / "sub3.csv")
    assert r.exit_code == 1 and "differ from the submission's" in r.stderr

    _ok("report", "--run", wsdm / "run", "--out", wsdm / "report.html")
    page = (wsdm / "report.html").read_text()
    assert "task: wsdm" in page and "Accuracy per language" in page and "<td>English</td>" in page


def test_kernel_dry_run_finds_test_parquet(wsdm):
    from kagglekit.kernel import build_kernel, dry_run

    kdir = build_kernel([wsdm / "run"], "wsdm-tiny", wsdm / "kernel", user="alice")
    meta = json.loads((kdir / "kernel" / "kernel-metadata.json").read_text())
    assert meta["competition_sources"] == ["wsdm-cup-multilingual-chatbot-arena"]
    manifest = json.loads((kdir / "datasets" / "wsdm-tiny-artifacts" / "kk_manifest.json").read_text())
    assert manifest["task"] == "wsdm"
    res = dry_run(kdir, wsdm / "test.parquet", keep=str(wsdm / "dry"))
    comp = wsdm / "dry" / "kaggle" / "input" / "competitions" / "wsdm-cup-multilingual-chatbot-arena"
    assert sorted(p.name for p in comp.iterdir()) == ["sample_submission.csv", "test.parquet"]
    sub = pd.read_csv(res["submission"], dtype=str)
    assert res["task"] == "wsdm" and list(sub.columns) == ["id", "winner"] and len(sub) == 24
    assert set(sub["winner"]) <= {"model_a", "model_b"}


def test_tune_maximises_validation_accuracy(wsdm):
    optuna = pytest.importorskip("optuna")
    from kagglekit.config import load_config
    from kagglekit.tune import run_tune

    cfg = load_config(REPO / "configs" / "tiny.yaml", [*_sets(wsdm), "train.max_steps=2", "train.eval_every=1"])
    study = run_tune(cfg, 0, 1, f"sqlite:///{wsdm / 'tune.db'}", "w", runs_root=wsdm / "tune", pruner="none")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    m = json.loads((wsdm / "tune" / "w" / "trial_0" / "fold_0" / "metrics.json").read_text())
    assert study.trials[0].value == m["val_accuracy"]
