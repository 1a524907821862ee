"""The whole chain on real competition rows (../shared/data/arena): folds, a tiny model whose tokenizer is
trained on the real texts, two training steps, ensemble on Kaggle's own test.csv. Skips without the data."""

from __future__ import annotations

import pandas as pd

from conftest import REPO
from kagglekit.config import load_config
from kagglekit.data import load_train
from kagglekit.ensemble import ensemble
from kagglekit.folds import make_folds
from kagglekit.tiny import build_tiny_model
from kagglekit.train import train_fold


def test_real_rows_end_to_end(shared_arena, tmp_path):
    df, _ = load_train(shared_arena / "train_sample.csv")
    make_folds(df, 3, 42).to_csv(tmp_path / "folds.csv", index=False)
    model = build_tiny_model(tmp_path / "model", "deberta-v2", str(shared_arena / "train_sample.csv"), vocab_size=800)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.train={shared_arena / 'train_sample.csv'}", f"data.folds={tmp_path / 'folds.csv'}",
        f"model.backbone={model}", "model.max_length=512", "train.max_steps=2", "train.batch_size=8",
    ])
    for k in range(3):
        m = train_fold(cfg, k, tmp_path / "run")
        # real texts are long: truncation must have happened and been reported
        assert m["truncation"]["train"]["share_truncated"] > 0.3
        assert 0 < m["truncation"]["train"]["retention"]["response_a"] < 1
    rep = ensemble([tmp_path / "run"], shared_arena / "test.csv", tmp_path / "submission.csv",
                   sample_submission=shared_arena / "sample_submission.csv")
    sub = pd.read_csv(rep["submission"], dtype={"id": str})
    assert sub["id"].tolist() == pd.read_csv(shared_arena / "sample_submission.csv", dtype={"id": str})["id"].tolist()
