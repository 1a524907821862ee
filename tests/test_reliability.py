"""Nothing lost, nothing executed: regression tests for the promises of protected outputs,
exact resume, preemption and one clear line per error. Each failed on the code before its fix."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.errors import KKError
from kagglekit.train import Interrupted, train_fold

QUICK = ("train.max_steps=2", "train.eval_every=1")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def trained_fold(tiny_project, tmp_path):
    run = tmp_path / "run"
    train_fold(tiny_config(tiny_project, *QUICK), 0, run)
    return run


# --- 1. --force never deletes a trained fold before its replacement is complete ------------------------------------

def test_force_with_a_bad_backbone_keeps_the_trained_fold(trained_fold, tiny_project):
    before = _snapshot(trained_fold / "fold_0")
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", trained_fold, "--force",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={tiny_project / 'tiny-debreta'}")
    assert r.exit_code == 1 and "does not exist" in r.stderr and "Traceback" not in r.output
    assert _snapshot(trained_fold / "fold_0") == before
    assert not (trained_fold / "fold_0.retrain").exists() or not any((trained_fold / "fold_0.retrain").iterdir())


def test_force_interrupted_keeps_the_old_fold_and_resumes(trained_fold, tiny_project):
    before = _snapshot(trained_fold / "fold_0")
    cfg = tiny_config(tiny_project, "train.max_steps=4", "train.eval_every=2", "train.lr=1e-3")

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume --force"):
        train_fold(cfg, 0, trained_fold, force=True, on_step=stop)
    assert _snapshot(trained_fold / "fold_0") == before  # untouched while the retrain is unfinished
    assert (trained_fold / "fold_0.retrain" / "checkpoint" / "state.pt").exists()
    m = train_fold(cfg, 0, trained_fold, force=True, resume=True)
    assert m["steps"] == 4 and not (trained_fold / "fold_0.retrain").exists()
    assert json.loads((trained_fold / "fold_0" / "metrics.json").read_text())["steps"] == 4
    assert not list(trained_fold.glob(".fold_0.old-*"))


# --- 2. one training per fold folder -------------------------------------------------------------------------------

def test_a_second_training_of_the_same_fold_is_refused(tiny_project, tmp_path):
    from kagglekit.io import file_lock

    run = tmp_path / "run"
    run.mkdir()
    with file_lock(run / ".fold_1.lock", "held by the test"):
        with pytest.raises(KKError, match=r"in use by pid \d+"):
            train_fold(tiny_config(tiny_project, *QUICK), 1, run)
    assert not (run / "fold_1" / "metrics.json").exists()
    # a lock file left by a dead process is not a lock
    (run / ".fold_1.lock").write_text("pid 999999")
    assert train_fold(tiny_config(tiny_project, *QUICK), 1, run)["steps"] == 2


def test_two_processes_training_one_fold(tiny_project, tmp_path):
    """Two `kk train` of the same fold at once: one trains, the other is refused with one line."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "kagglekit.cli", "train", "--fold", "2", "--config", str(REPO / "configs/tiny.yaml"),
            "--run", str(run), "--train", str(tiny_project / "train.csv"), "--folds", str(tiny_project / "folds.csv"),
            "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96", "--set", "train.max_steps=3"]
    env = dict(os.environ, KK_QUIET="1")
    procs = [subprocess.Popen(args + ["--set", f"train.lr={lr}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for lr in (1e-3, 2e-3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 1], results
    refused = next(err for _, err, rc in results if rc == 1)
    assert "in use by pid" in refused and "Traceback" not in refused
    cfg = (run / "fold_2" / "config.yaml").read_text()
    winner_lr = next(lr for (_, _, rc), lr in zip(results, (1e-3, 2e-3)) if rc == 0)
    assert f"lr: {winner_lr}" in cfg  # the folder holds the one run that trained, unmixed


# --- 3. concurrent submission writers lose nothing -----------------------------------------------------------------

def test_concurrent_submission_writers_keep_every_file(tmp_path):
    sub = tmp_path / "submission.csv"
    ids = np.array(["1", "2", "3"])
    sub.write_text("id,winner_model_a,winner_model_b,winner_tie\n1,0.1,0.2,0.7\n2,0.1,0.2,0.7\n3,0.1,0.2,0.7\n")
    original = sub.read_bytes()
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from kagglekit.ensemble import write_submission
        k = int(sys.argv[1])
        p = np.tile([0.2, 0.3, 0.5], (3, 1)); p[:, 0] += k / 1000; p /= p.sum(1, keepdims=True)
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        write_submission(np.array({list(ids)}), p, {str(sub)!r})
    """)
    import time

    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k), str(start)], stderr=subprocess.PIPE, text=True) for k in range(6)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    contents = [f.read_bytes() for f in tmp_path.glob("submission*.csv")]
    assert original in contents  # the original survived
    assert len(contents) == 7 and len(set(contents)) == 7  # and every writer's file too


def _interrupt_on_call(fn, n: int):
    """``fn``, except that its n-th call raises KeyboardInterrupt (Ctrl-C at that exact point)."""
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return fn(*a, **k)

    return wrapped


# --- 4./6. exact resume after Ctrl-C mid-step, after SIGTERM; time-based checkpoints ---------------------------------

def test_resume_after_ctrl_c_in_the_middle_of_an_optimizer_step_is_exact(tiny_project, tmp_path, monkeypatch):
    import kagglekit.engine as inference

    cfg = tiny_config(tiny_project, "train.epochs=2", "train.grad_accum=2", "train.batch_size=8", "lora.dropout=0.3")
    full = train_fold(cfg, 1, tmp_path / "full")
    real = inference.pad_batch
    # the 2nd micro-batch of step 3: the 1st one has drawn its dropout masks
    monkeypatch.setattr(inference, "pad_batch", _interrupt_on_call(real, 6))
    with pytest.raises(Interrupted):
        train_fold(cfg, 1, tmp_path / "cut")
    monkeypatch.setattr(inference, "pad_batch", real)
    resumed = train_fold(cfg, 1, tmp_path / "cut", resume=True)
    assert resumed["val_log_loss"] == full["val_log_loss"]
    assert (tmp_path / "cut/fold_1/oof.csv").read_bytes() == (tmp_path / "full/fold_1/oof.csv").read_bytes()
    log = pd.read_csv(tmp_path / "cut/fold_1/train_log.csv")
    assert log["step"].tolist() == list(range(1, full["steps"] + 1))


def test_sigterm_checkpoints_and_resumes_exactly(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "train.epochs=2", "lora.dropout=0.2")
    train_fold(cfg, 2, tmp_path / "full")

    def preempt(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train_fold(cfg, 2, tmp_path / "cut", on_step=preempt)
    assert (tmp_path / "cut/fold_2/checkpoint/state.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    train_fold(cfg, 2, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut/fold_2/oof.csv").read_bytes() == (tmp_path / "full/fold_2/oof.csv").read_bytes()


def test_time_based_checkpoint_between_evaluations(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "train.max_steps=3", "train.eval_every=100", "train.checkpoint_minutes=0.00001")
    seen = []
    train_fold(cfg, 0, tmp_path / "r", on_step=lambda step: seen.append((tmp_path / "r/fold_0/checkpoint/state.pt").exists()))
    assert seen[:2] == [True, True]  # checkpointed after steps 1 and 2, before any evaluation


def test_ctrl_c_during_an_evaluation_keeps_the_step_and_its_log_row(tiny_project, tmp_path, monkeypatch):
    import kagglekit.train as train

    cfg = tiny_config(tiny_project, "train.epochs=2", "train.eval_every=3")
    full = train_fold(cfg, 0, tmp_path / "full")
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", _interrupt_on_call(real, 2))
    with pytest.raises(Interrupted):
        train_fold(cfg, 0, tmp_path / "cut")
    monkeypatch.setattr(train, "evaluate", real)
    train_fold(cfg, 0, tmp_path / "cut", resume=True)
    a = pd.read_csv(tmp_path / "cut/fold_0/train_log.csv")
    b = pd.read_csv(tmp_path / "full/fold_0/train_log.csv")
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "cut/fold_0/oof.csv").read_bytes() == (tmp_path / "full/fold_0/oof.csv").read_bytes()
    assert full["steps"] == int(a["step"].max())


# --- 5. nothing loaded executes code -----------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_not_executed(tiny_project, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "fold_0" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save({"model": _Evil(marker)}, ckpt / "state.pt")
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run", "--resume",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96")
    assert r.exit_code == 1 and "not a usable kagglekit checkpoint" in r.stderr and "Traceback" not in r.output
    assert not marker.exists()
    (ckpt / "state.pt").write_bytes(b"\x00garbage" * 10)  # a corrupt one: the same one line
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run", "--resume",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96")
    assert r.exit_code == 1 and "state.pt: not a usable kagglekit checkpoint" in r.stderr


# --- 7. Ctrl-C stops kk tune --------------------------------------------------------------------------------------

def test_ctrl_c_stops_the_tune_worker(tiny_project, tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    import kagglekit.train as train

    def interrupted(*a, **k):
        raise Interrupted("interrupted at step 1 of fold 0")

    monkeypatch.setattr(train, "train_fold", interrupted)
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    r = run_cli("tune", "--config", REPO / "configs/tiny.yaml", "--n-trials", "3", "--storage", storage, "--study", "s",
                "--runs", tmp_path, "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv")
    assert r.exit_code == 130
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL"]  # one trial, marked failed; no second trial started


# --- 8. OS errors are one line ---------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_the_old_file_survives(synth_train, tmp_path, monkeypatch):
    out = tmp_path / "folds.csv"
    out.write_text("id,fold\n")
    before = out.read_bytes()

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    r = run_cli("make-folds", "--train", synth_train, "--out", out, "--force")
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {out}: No space left on device"]
    assert out.read_bytes() == before and not list(tmp_path.glob(".folds.csv.*"))


def test_unwritable_outputs_are_one_line(synth_train, tiny_run, tiny_project, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("make-folds", "--train", synth_train, "--out", blocker / "folds.csv")
    assert r.exit_code == 1 and str(blocker) in r.stderr and "Traceback" not in r.output
    # the ensemble refuses before predicting anything
    r = run_cli("ensemble", "--run", tiny_run, "--test", tiny_project / "test.csv", "--out", blocker / "sub.csv")
    assert r.exit_code == 1 and "not a folder" in r.stderr and "Traceback" not in r.output


def test_sample_submission_is_checked_before_predicting(tiny_run, tiny_project, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in run.glob("fold_*/test.*"):
        f.unlink()
    for bad, msg in ((tmp_path / "missing.csv", "does not exist"), (tmp_path, "is a folder")):
        r = run_cli("ensemble", "--run", run, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv", "--sample-submission", bad)
        assert r.exit_code == 1 and msg in r.stderr and "Traceback" not in r.output
    assert not list(run.glob("fold_*/test.csv"))  # nothing was predicted


def test_config_that_is_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    r = run_cli("config", p)
    assert r.exit_code == 1 and "not UTF-8" in r.stderr and "Traceback" not in r.output


def test_corrupt_caches_and_oof(tiny_run, tiny_project, tmp_path):
    from kagglekit.predict import predict_fold

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first = predict_fold(run, 0, tiny_project / "test.csv")
    (run / "fold_0" / "test.json").write_text("{not json")
    again = predict_fold(run, 0, tiny_project / "test.csv")  # a corrupt cache is a cache miss
    pd.testing.assert_frame_equal(first, again)
    # test.csv replaced without its test.json (a kill between the two renames): detected, predicted again
    t = pd.read_csv(run / "fold_0" / "test.csv", dtype={"id": str})
    t.loc[0, "winner_tie"] = 0.999
    t.to_csv(run / "fold_0" / "test.csv", index=False)
    pd.testing.assert_frame_equal(predict_fold(run, 0, tiny_project / "test.csv"), first)
    (run / "fold_1" / "oof.csv").write_bytes(b"\xff\xfe\x00garbage\n\x00\x01")
    r = run_cli("ensemble", "--run", run, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv")
    assert r.exit_code == 1 and "oof.csv" in r.stderr and "Traceback" not in r.output


# --- 9. smaller defects --------------------------------------------------------------------------------------------

def test_outputs_get_the_normal_file_mode(tmp_path):
    from kagglekit.io import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_train_file_error_in_ensemble_suggests_an_option_it_has(tiny_run, tiny_project, tmp_path):
    bad = pd.read_csv(tiny_project / "train.csv", dtype=str)
    bad.loc[0, "winner_tie"] = "1"  # two winners
    bad.to_csv(tmp_path / "train.csv", index=False)
    r = run_cli("ensemble", "--run", tiny_run, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv",
                "--train", tmp_path / "train.csv")
    assert r.exit_code == 1 and "--bad-rows skip" in r.stderr
    r = run_cli("ensemble", "--run", tiny_run, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv",
                "--train", tmp_path / "train.csv", "--bad-rows", "skip")
    assert r.exit_code == 0, r.output
    assert "skipped 1 bad row" in r.stderr


def test_missing_folds_are_named(tiny_run, tiny_project, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "fold_1")
    r = run_cli("ensemble", "--run", run, "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv")
    assert r.exit_code == 0, r.output
    assert "fold 1 not trained" in r.stderr


def test_tune_best_does_not_overwrite_without_force(tiny_project, tmp_path):
    pytest.importorskip("optuna")
    from kagglekit.tune import run_tune, write_best_config

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    run_tune(tiny_config(tiny_project, *QUICK), 0, 1, storage, "b", runs_root=tmp_path, pruner="none")
    out = tmp_path / "best.yaml"
    write_best_config("b", storage, out)
    out.write_text("# mine\n")
    with pytest.raises(KKError, match="already exists; pass --force"):
        write_best_config("b", storage, out)
    assert out.read_text() == "# mine\n"
    write_best_config("b", storage, out, force=True)
    assert "Best of study b" in out.read_text()


# --- 10. logs when nobody watches ----------------------------------------------------------------------------------

def test_plain_progress_lines_when_not_a_terminal(monkeypatch):
    import io

    from kagglekit import ui

    buf = io.StringIO()
    p = ui.PlainProgress(every=0.0, stream=buf)
    with p:
        t = p.add_task("fold 0", total=10, status="")
        p.update(t, completed=4, status="loss 0.9000 12.0 samples/s")
    lines = buf.getvalue().splitlines()
    assert any("fold 0: 4/10 (40%)" in ln and "loss 0.9000" in ln and "ETA" in ln for ln in lines), lines
    monkeypatch.delenv("KK_QUIET", raising=False)
    assert isinstance(ui.progress(), ui.PlainProgress)  # pytest's stderr is not a terminal
    monkeypatch.setenv("KK_QUIET", "1")
    assert not isinstance(ui.progress(), ui.PlainProgress)
