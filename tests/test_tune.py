from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.config import load_config
from kagglekit.errors import KKError

optuna = pytest.importorskip("optuna")

FAST = ("train.max_steps=2", "train.eval_every=1")


def _storage(tmp_path):
    return f"sqlite:///{tmp_path / 'tune.db'}"


def test_study_runs_and_resumes(tiny_project, tmp_path):
    from kagglekit.tune import run_tune

    cfg = tiny_config(tiny_project, *FAST)
    study = run_tune(cfg, 0, 3, _storage(tmp_path), "s", runs_root=tmp_path, pruner="none")
    assert len(study.trials) == 3
    study = run_tune(cfg, 0, 2, _storage(tmp_path), "s", runs_root=tmp_path, pruner="none")
    assert len(study.trials) == 5 and sorted(t.number for t in study.trials) == list(range(5))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert (tmp_path / "s" / "trial_4" / "fold_0" / "metrics.json").exists()
    lrs = {t.params["train.lr"] for t in study.trials}
    assert len(lrs) == 5 and all(3e-4 <= lr <= 1e-2 for lr in lrs)


def test_a_bad_trial_is_pruned(tiny_project, tmp_path):
    from kagglekit.tune import run_tune

    cfg = tiny_config(tiny_project, "train.max_steps=3", "train.eval_every=1")
    # Any val log loss above 0.5 is "falling behind": the trial must stop at its first report.
    study = run_tune(cfg, 0, 1, _storage(tmp_path), "p", runs_root=tmp_path, pruner=optuna.pruners.ThresholdPruner(upper=0.5))
    t = study.trials[0]
    assert t.state.name == "PRUNED" and len(t.intermediate_values) == 1


def test_empty_search_space_and_bad_storage(tiny_project, tmp_path):
    from kagglekit.tune import run_tune

    with pytest.raises(KKError, match="empty search space"):
        run_tune(tiny_config(tiny_project, "tune={}"), 0, 1, _storage(tmp_path), runs_root=tmp_path)
    r = run_cli("tune", "--config", REPO / "configs/tiny.yaml", "--storage", "notadb://x", "--n-trials", "1", "--runs", tmp_path)
    assert r.exit_code == 1 and "cannot open storage notadb://x" in r.stderr


def test_direction_clash_is_reported(tiny_project, tmp_path):
    from kagglekit.tune import run_tune

    optuna.create_study(study_name="clash", storage=_storage(tmp_path), direction="maximize")
    with pytest.raises(KKError, match="study 'clash'"):
        run_tune(tiny_config(tiny_project, *FAST), 0, 1, _storage(tmp_path), "clash", runs_root=tmp_path)


def _worker(tiny_project, tmp_path, storage, study):
    env = dict(os.environ, KK_QUIET="1")
    cmd = [sys.executable, "-m", "kagglekit.cli", "tune", "--config", str(REPO / "configs/tiny.yaml"), "--n-trials", "2",
           "--storage", storage, "--study", study, "--runs", str(tmp_path), "--pruner", "none",
           "--train", str(tiny_project / "train.csv"), "--folds", str(tiny_project / "folds.csv"),
           "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96"]
    cmd += [a for s in FAST for a in ("--set", s)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_workers(tiny_project, tmp_path, storage, study):
    procs = [_worker(tiny_project, tmp_path, storage, study) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = optuna.load_study(study_name=study, storage=storage)
    numbers = [t.number for t in s.trials]
    assert len(s.trials) == 4 and sorted(numbers) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in s.trials)


def test_two_workers_share_a_sqlite_study(tiny_project, tmp_path):
    _two_workers(tiny_project, tmp_path, _storage(tmp_path), "shared")


def test_two_workers_share_a_postgres_study(tiny_project, tmp_path):
    url = os.environ.get("KK_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set KK_TEST_POSTGRES_URL (.ci/run starts one)")
    pytest.importorskip("psycopg")
    study = f"pg_{os.getpid()}_{tmp_path.name}"[:60]
    _two_workers(tiny_project, tmp_path, url, study)


def test_best_writes_a_config_that_train_loads(tiny_project, tmp_path):
    from kagglekit.tune import run_tune

    cfg = tiny_config(tiny_project, *FAST)
    study = run_tune(cfg, 0, 2, _storage(tmp_path), "b", runs_root=tmp_path, pruner="none")
    out = tmp_path / "b-best.yaml"
    r = run_cli("tune", "--study", "b", "--best", "--storage", _storage(tmp_path), "--best-out", out)
    assert r.exit_code == 0, r.output
    best = load_config(out)
    assert best.train.lr == pytest.approx(study.best_params["train.lr"]) and best.lora.r == study.best_params["lora.r"]
    assert best.name == "b-best"
    r = run_cli("train", "--fold", "1", "--config", out, "--run", tmp_path / "best_run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "best_run" / "fold_1" / "metrics.json").exists()
