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
