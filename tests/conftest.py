from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KK_QUIET", "1")  # no progress bars in test logs
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "arena"


@pytest.fixture
def shared_arena() -> Path:
    """The real competition files beside the repo; skip when a clone lacks them."""
    if not (SHARED / "train_sample.csv").exists():
        pytest.skip("../shared/data/arena is not present")
    return SHARED


@pytest.fixture
def synth_train(tmp_path) -> Path:
    from kagglekit.synthetic import make_synthetic

    path = tmp_path / "train.csv"
    make_synthetic(300, seed=3).to_csv(path, index=False)
    return path


def run_cli(*args: str):
    """Invoke `kk` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from kagglekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """Synthetic train/test files, 3 folds and tiny DeBERTa-v2 / Llama backbones, built once."""
    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("project")
    make_synthetic(150, seed=11).to_csv(root / "train.csv", index=False)
    make_synthetic(40, seed=12, with_labels=False).to_csv(root / "test.csv", index=False)
    df, _ = load_train(root / "train.csv")
    make_folds(df, k=3, seed=0).to_csv(root / "folds.csv", index=False)
    build_tiny_model(root / "deberta", "deberta-v2", str(root / "train.csv"), vocab_size=600, hidden=64)
    build_tiny_model(root / "llama", "llama", str(root / "train.csv"), vocab_size=600, hidden=64)
    return root


def tiny_config(project: Path, *overrides: str, arch: str = "deberta"):
    """configs/tiny.yaml at test scale: short sequences, one epoch."""
    from kagglekit.config import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.train={project / 'train.csv'}",
            f"data.folds={project / 'folds.csv'}",
            f"data.test={project / 'test.csv'}",
            f"model.backbone={project / arch}",
            "model.max_length=96",
            "train.epochs=1",
            "train.eval_batch_size=64",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_project, tmp_path_factory):
    """A run with all 3 folds trained (one epoch each)."""
    from kagglekit.train import train_folds

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_folds(tiny_config(tiny_project), "all", run)
    return run


def predict_model(model, fmt, df, cfg, tta=True, batch_size: int | None = None):
    """A model in memory predicting parsed rows through the prediction core (what validation during training runs)."""
    import torch

    from kagglekit.engine import HFEngine
    from kagglekit.inference import predict_tta
    from kagglekit.task import get_task

    if batch_size:
        cfg = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"batch_size": batch_size})})
    engine = HFEngine.live(model, fmt, cfg, next(model.parameters()).device or torch.device("cpu"), None, get_task(cfg.task))
    return predict_tta(engine, None, df, tta)
