"""The winners' loop on CPU: a teacher's calibrated OOF ensemble becomes a student's soft labels, and a
teacher's predictions on extra rows become pseudo-labelled training rows that are never validated on."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_student_on_teacher_soft_labels_reaches_the_teacher(tmp_path):
    from kagglekit.config import load_config
    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model
    from kagglekit.train import train_fold

    make_synthetic(600, seed=1).to_csv(tmp_path / "train.csv", index=False)
    make_synthetic(120, seed=5, with_labels=False).to_csv(tmp_path / "extra.csv", index=False)
    make_folds(load_train(tmp_path / "train.csv")[0], 3, 42).to_csv(tmp_path / "folds.csv", index=False)
    build_tiny_model(tmp_path / "model", "deberta-v2", str(tmp_path / "train.csv"))
    base = [f"data.train={tmp_path / 'train.csv'}", f"data.folds={tmp_path / 'folds.csv'}", f"model.backbone={tmp_path / 'model'}"]

    def cfg(*extra):
        return load_config(REPO / "configs" / "tiny.yaml", [*base, *extra])

    # 1. teacher: every fold; its folds 1 and 2 give OOF for exactly the rows the student trains on
    teacher = {k: train_fold(cfg(), k, tmp_path / "teacher") for k in (0, 1, 2)}
    # 2. soft labels: the calibrated OOF ensemble, and the teacher's predictions on the extra rows
    r = run_cli("ensemble", "--run", tmp_path / "teacher", "--folds", "1,2", "--test", tmp_path / "extra.csv",
                "--out", tmp_path / "extra_soft.csv", "--oof-out", tmp_path / "soft_train.csv")
    assert r.exit_code == 0, r.output
    soft = pd.read_csv(tmp_path / "soft_train.csv", dtype={"id": str})
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"id": str})
    assert set(soft["id"]) == set(folds.loc[folds["fold"] != 0, "id"])
    # 3. student: the same rows and recipe as the teacher's fold 0, but the teacher's probabilities as targets
    student = train_fold(cfg(f"data.soft_labels={tmp_path / 'soft_train.csv'}"), 0, tmp_path / "student")
    assert student["val_log_loss"] < student["prior_log_loss"] - 0.1, student
    assert student["val_log_loss"] < teacher[0]["val_log_loss"] + 0.05, (student["val_log_loss"], teacher[0]["val_log_loss"])
    # 4. and with the pseudo-labelled extra rows: they train, they are never validated on
    pseudo = train_fold(cfg(f"data.soft_labels={tmp_path / 'soft_train.csv'}", "train.max_steps=5",
                            f"data.extra=[{{path: {tmp_path / 'extra.csv'}, soft_labels: {tmp_path / 'extra_soft.csv'}}}]"),
                        0, tmp_path / "pseudo")
    assert pseudo["n_extra"] == 120 and pseudo["n_val"] == int((folds["fold"] == 0).sum())
    oof = pd.read_csv(tmp_path / "pseudo/fold_0/oof.csv", dtype={"id": str})
    assert set(oof["id"]) == set(folds.loc[folds["fold"] == 0, "id"])


def test_extra_rows_need_their_soft_labels(tiny_project, tmp_path):
    from conftest import tiny_config
    from kagglekit.errors import KKError
    from kagglekit.train import train_fold

    extra = pd.read_csv(tiny_project / "test.csv", dtype=str).head(10)
    extra.to_csv(tmp_path / "extra.csv", index=False)
    soft = pd.DataFrame({"id": extra["id"].head(9), "winner_model_a": 0.5, "winner_model_b": 0.3, "winner_tie": 0.2})
    soft.to_csv(tmp_path / "soft.csv", index=False)
    cfg = tiny_config(tiny_project, "train.max_steps=1",
                      f"data.extra=[{{path: {tmp_path / 'extra.csv'}, soft_labels: {tmp_path / 'soft.csv'}}}]")
    with pytest.raises(KKError, match=r"soft.csv: no soft label for train id .* \(1 missing\)"):
        train_fold(cfg, 0, tmp_path / "run")
    soft = pd.concat([soft, soft.head(1).assign(id=extra["id"].iloc[9])])
    soft.to_csv(tmp_path / "soft.csv", index=False)
    m = train_fold(cfg, 0, tmp_path / "run")
    assert m["n_extra"] == 10
    assert json.loads((tmp_path / "run/fold_0/metrics.json").read_text())["n_extra"] == 10
