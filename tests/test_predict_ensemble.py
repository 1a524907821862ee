from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.data import load_test, swap_frame
from kagglekit.ensemble import apply_temperature, check_submission, combine, ensemble, fit_temperature, fit_weights
from kagglekit.errors import KKError
from kagglekit.metrics import log_loss
from kagglekit.predict import FoldModel, Predictor, predict_fold

COLS = ["winner_model_a", "winner_model_b", "winner_tie"]


@pytest.fixture(scope="module")
def fold_model(tiny_run):
    return FoldModel(tiny_run / "fold_0")


def _swap_csv(src, dst):
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df["response_a"], df["response_b"] = df["response_b"].copy(), df["response_a"].copy()
    df.to_csv(dst, index=False)


def test_tta_is_exactly_swap_equivariant(fold_model, tiny_project):
    df, _ = load_test(tiny_project / "test.csv")
    p = fold_model.predict(df, tta=True)["probs"]
    q = fold_model.predict(swap_frame(df), tta=True)["probs"]
    assert np.array_equal(q, p[:, [1, 0, 2]])  # bit for bit, not approximately
    raw = fold_model.predict(df, tta=False)["probs"]
    assert not np.array_equal(raw, p)


def test_tta_on_the_real_test_file(fold_model, shared_arena):
    df, _ = load_test(shared_arena / "test.csv")
    p = fold_model.predict(df, tta=True)["probs"]
    q = fold_model.predict(swap_frame(df), tta=True)["probs"]
    assert np.array_equal(q, p[:, [1, 0, 2]])


def test_length_sorted_batches_match_one_by_one(fold_model, tiny_project):
    df, _ = load_test(tiny_project / "test.csv")
    batched = fold_model.predict(df, tta=False, batch_size=16)["probs"]
    single = np.concatenate([fold_model.predict(df.iloc[[i]], tta=False, batch_size=1)["probs"] for i in range(len(df))])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_predict_fold_writes_and_reuses(tiny_run, tiny_project):
    out = predict_fold(tiny_run, 1, tiny_project / "test.csv")
    path = tiny_run / "fold_1" / "test.csv"
    assert list(out.columns) == ["id", *COLS]
    assert out["id"].tolist() == pd.read_csv(tiny_project / "test.csv", dtype={"id": str})["id"].tolist()
    meta = json.loads((tiny_run / "fold_1" / "test.json").read_text())
    assert meta["tta"] is True and len(meta["sha256"]) == 64
    mtime = path.stat().st_mtime_ns
    predict_fold(tiny_run, 1, tiny_project / "test.csv")
    assert path.stat().st_mtime_ns == mtime  # cached: the model did not run again


def test_predictor_predict_one(tiny_run):
    p = Predictor.from_run(tiny_run, folds="0,1")
    res = p.predict_one("What is 2+2?", "excellent answer: 4", "sorry, unsure")
    assert set(res) == set(COLS) and abs(sum(res.values()) - 1) < 1e-9
    swapped = p.predict_one("What is 2+2?", "sorry, unsure", "excellent answer: 4")
    assert swapped["winner_model_a"] == pytest.approx(res["winner_model_b"], abs=1e-12)
    r = run_cli("predict-one", "--run", tiny_run, "q", "a", "b")
    assert r.exit_code == 0 and "winner_tie" in r.stdout


def _check(sub_path, test_path):
    sub = pd.read_csv(sub_path, dtype={"id": str})
    ids = pd.read_csv(test_path, dtype={"id": str})["id"]
    assert list(sub.columns) == ["id", *COLS]
    assert sub["id"].tolist() == ids.tolist()
    p = sub[COLS].to_numpy()
    assert np.isfinite(p).all() and (p > 0).all() and (p < 1).all()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    return sub


def test_ensemble_writes_a_valid_submission_and_protects_the_old_one(tiny_run, tiny_project, tmp_path):
    out = tmp_path / "submission.csv"
    rep = ensemble([tiny_run], tiny_project / "test.csv", out)
    _check(out, tiny_project / "test.csv")
    assert rep["oof_after"] <= rep["oof_before"]
    first = out.read_bytes()
    ensemble([tiny_run], tiny_project / "test.csv", out, fit=False)
    backups = [p for p in tmp_path.glob("submission.*.csv")]
    assert len(backups) == 1 and backups[0].read_bytes() == first  # kept, renamed with a timestamp
    ensemble([tiny_run], tiny_project / "test.csv", out, force=True, method="geo", folds="0,2")
    assert len(list(tmp_path.glob("submission.*.csv"))) == 1


def test_ensemble_is_swap_equivariant_through_the_cli(tiny_run, tiny_project, tmp_path):
    _swap_csv(tiny_project / "test.csv", tmp_path / "test_swapped.csv")
    r1 = run_cli("ensemble", "--run", tiny_run, "--test", tiny_project / "test.csv", "--out", tmp_path / "a.csv", "--no-fit")
    r2 = run_cli("ensemble", "--run", tiny_run, "--test", tmp_path / "test_swapped.csv", "--out", tmp_path / "b.csv", "--no-fit")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert "out-of-fold log loss" in r1.stdout and "TTA" in r1.stdout
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert np.array_equal(a[COLS].to_numpy(), b[["winner_model_b", "winner_model_a", "winner_tie"]].to_numpy())


def test_ensemble_on_real_test_file_matches_sample_submission(tiny_run, shared_arena, tmp_path):
    out = tmp_path / "sub.csv"
    r = run_cli("ensemble", "--run", tiny_run, "--test", shared_arena / "test.csv", "--out", out,
                "--sample-submission", shared_arena / "sample_submission.csv")
    assert r.exit_code == 0, r.output
    _check(out, shared_arena / "test.csv")
    _swap_csv(shared_arena / "test.csv", tmp_path / "swapped.csv")
    assert run_cli("ensemble", "--run", tiny_run, "--test", tmp_path / "swapped.csv", "--out", tmp_path / "sw.csv", "--no-fit").exit_code == 0
    assert run_cli("ensemble", "--run", tiny_run, "--test", shared_arena / "test.csv", "--out", tmp_path / "nf.csv", "--no-fit").exit_code == 0
    a, b = pd.read_csv(tmp_path / "nf.csv"), pd.read_csv(tmp_path / "sw.csv")
    assert np.array_equal(a[COLS].to_numpy(), b[["winner_model_b", "winner_model_a", "winner_tie"]].to_numpy())


def test_atomic_write_keeps_the_old_submission_on_failure(tiny_run, tiny_project, tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    out.write_text("old contents\n")
    real = pd.DataFrame.to_csv

    def broken(self, path, *a, **kw):
        real(self.head(2), path, *a, **kw)  # half a file on disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    for force in (True, False):
        with pytest.raises(OSError):
            ensemble([tiny_run], tiny_project / "test.csv", out, force=force)
        assert out.read_text() == "old contents\n"
        assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temporary or backup file left behind


# --- calibration on real OOF predictions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_oof():
    from conftest import SHARED

    path = SHARED / "real_model_oof_14k.csv"
    if not path.exists():
        pytest.skip("../shared/data/arena is not present")
    df = pd.read_csv(path)
    return df[COLS].to_numpy(dtype=np.float64), df["label"].to_numpy()


def test_temperature_never_worsens_and_is_deterministic(real_oof):
    p, y = real_oof
    assert log_loss(p, y) == pytest.approx(0.9488, abs=2e-3)  # the README's figure
    t1, t2 = fit_temperature(p, y), fit_temperature(p, y)
    assert t1 == t2
    assert log_loss(apply_temperature(p, t1), y) <= log_loss(p, y)
    sharp = apply_temperature(p, 0.5)  # a miscalibrated model: fitting must undo most of it
    t = fit_temperature(sharp, y)
    assert 1.7 < t < 2.3 and log_loss(apply_temperature(sharp, t), y) < log_loss(sharp, y) - 0.01


def test_weights_favour_the_better_model(real_oof):
    p, y = real_oof
    noise = np.random.default_rng(0).dirichlet([1, 1, 1], size=len(y))
    w = fit_weights([p, noise], y)
    assert w[0] > 0.8 and np.array_equal(w, fit_weights([p, noise], y))
    assert log_loss(combine([p, noise], w), y) <= log_loss(combine([p, noise]), y)


def test_check_submission_rejects_bad_files():
    ids = np.array(["1", "2"])
    good = pd.DataFrame({"id": ids, "winner_model_a": [0.2, 0.3], "winner_model_b": [0.3, 0.3], "winner_tie": [0.5, 0.4]})
    check_submission(good, ids)
    with pytest.raises(KKError, match="NaN"):
        check_submission(good.assign(winner_tie=[np.nan, 0.4]), ids)
    with pytest.raises(KKError, match="ids differ"):
        check_submission(good, np.array(["2", "1"]))
    with pytest.raises(KKError, match="header"):
        check_submission(good.rename(columns={"winner_tie": "tie"}), ids)


def test_ensemble_errors(tiny_run, tiny_project, tmp_path):
    r = run_cli("ensemble", "--run", tmp_path / "nope", "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv")
    assert r.exit_code == 1 and "run folder" in r.stderr and "does not exist" in r.stderr
    r = run_cli("ensemble", "--run", tiny_run, "--folds", "0,9", "--test", tiny_project / "test.csv", "--out", tmp_path / "s.csv")
    assert r.exit_code == 1 and "fold 9" in r.stderr
    bad = pd.read_csv(tiny_project / "test.csv").drop(columns=["response_b"])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    r = run_cli("ensemble", "--run", tiny_run, "--test", tmp_path / "bad.csv", "--out", tmp_path / "s.csv")
    assert r.exit_code == 1 and "missing column response_b" in r.stderr
    assert "Traceback" not in r.output


def test_nan_fold_predictions_are_named(tiny_run, tiny_project, tmp_path, monkeypatch):
    import shutil

    from kagglekit import passes

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in run.glob("fold_*/test.*"):
        f.unlink()
    real = passes.predict_order

    def nan_predict(engine, fold, df, *a, **k):  # fold 0's first pass: one row NaN
        p = real(engine, fold, df, *a, **k)
        if fold.index == 0 and len(p) == len(df):
            p[3, 2] = np.nan
        return p

    monkeypatch.setattr(passes, "predict_order", nan_predict)
    with pytest.raises(KKError, match="fold 0 of .* predicted NaN"):
        ensemble([run], tiny_project / "test.csv", tmp_path / "s.csv")
    assert not (run / "fold_0" / "test.csv").exists()


def test_demo_completes(tmp_path):
    r = run_cli("demo", "--out", tmp_path / "demo", "--n", "90", "--epochs", "1")
    assert r.exit_code == 0, r.output
    _check(tmp_path / "demo" / "submissions" / "submission.csv", tmp_path / "demo" / "data" / "test.csv")
    # the demo also packaged the kernel and dry-ran it offline
    assert (tmp_path / "demo" / "kernels" / "kagglekit-demo" / "kernel" / "kagglekit-demo.ipynb").exists()
    _check(tmp_path / "demo" / "kernels" / "dry-run" / "kaggle" / "working" / "submission.csv", tmp_path / "demo" / "data" / "test.csv")


def test_rows_that_overflow_in_half_precision_are_recomputed_in_fp32():
    """A stub model whose fp16 logits are inf for some rows: those rows come back finite (fp32), counted."""
    import torch

    from kagglekit.engine import infer_logits

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids, attention_mask):
            logits = input_ids[:, :1].float() * self.w
            if torch.is_autocast_enabled("cpu"):
                logits = torch.where(input_ids[:, :1] == 7, torch.full_like(logits, float("inf")), logits)
            return Out(logits)

    seqs = [[1, 2], [7, 1, 1], [3], [7], [5, 5, 5, 5]]
    counts = {}
    out = infer_logits(Stub(), seqs, 0, batch_size=2, device=torch.device("cpu"), autocast_dtype=torch.float16, counts=counts)
    assert np.isfinite(out).all() and counts["fp32_rows"] == 2
    np.testing.assert_allclose(out[:, 0], [1, 7, 3, 7, 5])
    plain = infer_logits(Stub(), seqs, 0, batch_size=2, device=torch.device("cpu"), autocast_dtype=None, counts=(c := {}))
    np.testing.assert_allclose(plain, out)
    assert not c  # nothing recomputed in fp32 without half precision


def test_folds_sharing_a_tokenizer_tokenize_the_test_set_once(tiny_run, tiny_project, monkeypatch):
    from kagglekit.data import load_test
    from kagglekit.formatting import Formatter
    from kagglekit.predict import FoldModel

    df, _ = load_test(tiny_project / "test.csv")
    models = [FoldModel(tiny_run / f"fold_{k}") for k in range(3)]
    assert len({m.formatter.signature() for m in models}) == 1
    calls = {"n": 0}
    real = Formatter.encode_rows

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Formatter, "encode_rows", counting)
    from kagglekit.inference import TokenCache

    cache = TokenCache()
    cached = [m.predict(df, cache=cache)["probs"] for m in models]
    assert calls["n"] == 1
    fresh = [m.predict(df)["probs"] for m in models]
    for a, b in zip(cached, fresh):
        np.testing.assert_array_equal(a, b)


def test_calibration_is_kept_only_if_it_generalises(real_oof):
    """On the real LLM's OOF (log loss 0.9488) a temperature fitted in-sample looks better on the rows it was
    fitted on, yet does not generalise to held-out folds: cross-fitting refuses it. On an overconfident
    version of the same predictions it generalises, and is kept."""
    from kagglekit.ensemble import calibrate

    p, y = real_oof
    w, t, cal, rep = calibrate([p], y)
    assert rep["in_sample"] < rep["uncalibrated"]  # the in-sample rule would accept it
    assert rep["folds"] == 5 and rep["mean_gain"] <= rep["gain_se"]
    assert not rep["kept"] and t == 1.0 and np.allclose(cal, p / p.sum(1, keepdims=True))
    sharp = apply_temperature(p, 0.5)
    w, t, cal, rep = calibrate([sharp], y)
    assert rep["kept"] and 1.7 < t < 2.3
    assert rep["cross_fitted"] < rep["uncalibrated"] - 0.01 and log_loss(cal, y) == pytest.approx(rep["in_sample"])
    # two runs: the weights are cross-fitted too; folds given by the caller are the ones used
    folds = np.arange(len(y)) % 3
    w, t, cal, rep = calibrate([p, np.full_like(p, 1 / 3)], y, folds=folds)
    assert rep["folds"] == 3 and rep["kept"] and w[0] > 0.8
