"""`kk ensemble`: fold and run averaging, OOF-fitted weights and temperature, submission.csv.

Out-of-fold predictions are the currency: each run's folds together predict every
training row once, so weights and a temperature can be fitted on them honestly.
A calibration is applied only when it lowers the OOF log loss. Weights and temperature
are fitted on log loss whatever the task's metric (accuracy is flat almost everywhere);
the submission is what the task scores: the probabilities (LMSYS), or the argmax
class's label (WSDM: ``id,winner``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import KKError
from .metrics import accuracy, log_loss
from .task import LMSYS, Task

CLIP = 1e-7


def combine(probs: list[np.ndarray], weights=None, method: str = "mean") -> np.ndarray:
    """Weighted arithmetic mean, or geometric mean (mean of logs, renormalised)."""
    w = np.ones(len(probs)) / len(probs) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    stack = np.stack(probs)
    if method == "geo":
        logp = np.log(np.clip(stack, 1e-15, 1.0))
        out = np.exp(np.tensordot(w, logp, axes=1))
    elif method == "mean":
        out = np.tensordot(w, stack, axes=1)
    else:
        raise KKError(f"--method must be mean or geo (got {method!r})")
    return out / out.sum(axis=1, keepdims=True)


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Soften (t > 1) or sharpen (t < 1): softmax(log p / t)."""
    z = np.log(np.clip(probs, 1e-15, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_weights(oofs: list[np.ndarray], labels: np.ndarray, method: str = "mean") -> np.ndarray:
    """Weights (on the simplex) minimising OOF log loss; deterministic (fixed start, L-BFGS-B)."""
    from scipy.optimize import minimize

    if len(oofs) == 1:
        return np.ones(1)

    def loss(theta):
        w = np.exp(theta - theta.max())
        return log_loss(combine(oofs, w, method), labels)

    res = minimize(loss, np.zeros(len(oofs)), method="L-BFGS-B")
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda t: log_loss(apply_temperature(probs, t), labels), bounds=(0.2, 5.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(res.x)


def _fit_calibration(oofs: list[np.ndarray], y: np.ndarray, method: str) -> tuple[np.ndarray, float]:
    """Weights, then a temperature, fitted on these rows; each kept only if it lowers their log loss."""
    weights = np.ones(len(oofs)) / len(oofs)
    calibrated = combine(oofs, weights, method)
    w = fit_weights(oofs, y, method)
    cand = combine(oofs, w, method)
    if log_loss(cand, y) < log_loss(calibrated, y):
        weights, calibrated = w, cand
    t = fit_temperature(calibrated, y)
    if log_loss(apply_temperature(calibrated, t), y) >= log_loss(calibrated, y):
        t = 1.0
    return weights, t


def _apply_calibration(oofs, weights, t, method) -> np.ndarray:
    return apply_temperature(combine(oofs, weights, method), t)


def crossfit_folds(n: int, folds=None, k: int = 5, seed: int = 0) -> np.ndarray:
    """The folds cross-fitting uses: the rows' training folds when known, else k seeded random parts."""
    if folds is not None and len(np.unique(folds)) > 1:
        return np.asarray(folds)
    return np.random.default_rng(seed).permutation(n) % k


def calibrate(oofs: list[np.ndarray], y: np.ndarray, method: str = "mean", folds=None, seed: int = 0):
    """(weights, temperature, calibrated OOF, report): a calibration that generalises, or none.

    Fitting weights and a temperature on the OOF rows and judging them on the same rows always looks
    good. So it is cross-fitted: for each fold, fit on the other folds' OOF and apply to this one; the
    calibration (refitted on all rows) is kept only if the cross-fitted log loss beats the uncalibrated
    one, and by more than the standard error of the per-fold gains. ``report`` holds the uncalibrated,
    in-sample and cross-fitted log losses and the verdict.
    """
    base = combine(oofs, method=method)
    base_loss = log_loss(base, y)
    weights, t = _fit_calibration(oofs, y, method)
    in_sample = log_loss(_apply_calibration(oofs, weights, t, method), y)
    parts = crossfit_folds(len(y), folds, seed=seed)
    crossed = np.zeros_like(base)
    gains = []
    for k in np.unique(parts):
        tr, va = parts != k, parts == k
        wk, tk = _fit_calibration([o[tr] for o in oofs], y[tr], method)
        crossed[va] = _apply_calibration([o[va] for o in oofs], wk, tk, method)
        gains.append(log_loss(base[va], y[va]) - log_loss(crossed[va], y[va]))
    cross_loss = log_loss(crossed, y)
    gains = np.asarray(gains)
    se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    keep = cross_loss < base_loss and float(gains.mean()) > se
    report = {"uncalibrated": base_loss, "in_sample": in_sample, "cross_fitted": cross_loss, "folds": int(len(gains)),
              "mean_gain": float(gains.mean()), "gain_se": se, "kept": bool(keep)}
    if keep:
        return weights, t, _apply_calibration(oofs, weights, t, method), report
    return np.ones(len(oofs)) / len(oofs), 1.0, base, report


def choose_calibration(oof, method: str = "mean", fit: bool = True) -> tuple:
    """(weights, temperature, calibrated OOF, cross-fitting report or None, a note saying where they come from).

    Fitted only on OOF the runs' own models produced: a merged run's OOF is its source folds' (``kk merge``), and
    fitting on it would calibrate one model on another's predictions. Alone, it carries over the temperature ``kk
    merge`` recorded; blended with other runs, nothing is fitted. ``oof``: :func:`kagglekit.runs.oof_set`.
    """
    preds, oofs, y, folds = oof.runs, oof.oofs, oof.y, oof.folds
    equal = np.ones(len(oofs)) / len(oofs)
    base = combine(oofs, method=method)
    if not fit:
        return equal, 1.0, base, None, "none (--no-fit)"
    borrowed = [rp for rp in preds if rp.borrowed is not None]
    if not borrowed:
        weights, t, calibrated, report = calibrate(oofs, y, method, folds)
        return weights, t, calibrated, report, "cross-fitted on the runs' OOF" + ("" if report["kept"] else ": not kept")
    why = f"{borrowed[0].run.path}'s OOF is its source folds' (kk merge), not its own predictions"
    if len(preds) > 1:
        return equal, 1.0, base, None, f"none (equal weights, temperature 1): {why}"
    rec = borrowed[0].borrowed
    t = rec.get("temperature")
    if rec.get("kept") and isinstance(t, (int, float)) and not isinstance(t, bool) and 0.2 <= t <= 5.0:
        return equal, float(t), apply_temperature(base, float(t)), None, (
            f"carried over from {rec.get('source', 'the source run')}: its fold ensemble's cross-fitted temperature "
            f"{t:.3f} ({why})")
    return equal, 1.0, base, None, f"none: the source fold ensemble's calibration was not kept or not recorded ({why})"


def blend(fold_probs: list[list[np.ndarray]], weights, temperature: float = 1.0, method: str = "mean") -> np.ndarray:
    """The submission's probabilities, the one blend of ``kk ensemble`` and the kernel: each run's folds combined,
    the runs combined with ``weights``, the temperature applied, then clipped (:func:`finalize_probs`)."""
    final = finalize_probs(apply_temperature(combine([combine(p, method=method) for p in fold_probs], weights, method), temperature))
    if not np.isfinite(final).all():
        raise KKError("the ensemble produced NaN probabilities")
    return final


def finalize_probs(probs: np.ndarray) -> np.ndarray:
    """Clip away from 0 and 1 (one confident mistake costs ~16 nats unclipped) and renormalise."""
    p = np.clip(probs, CLIP, 1.0 - CLIP)
    return p / p.sum(axis=1, keepdims=True)


def check_submission(sub, test_ids, sample_submission=None, ids_mismatch: str = "error", task: Task = LMSYS) -> None:
    """The format Kaggle scores: exact header, every test id once in order, and the task's values: rows of
    probabilities summing to 1 with no NaN (LMSYS), or one of the task's labels per row (WSDM)."""
    columns = task.submission_columns
    if list(sub.columns) != ["id", *columns]:
        raise KKError(f"submission header is {list(sub.columns)}, expected id,{','.join(columns)}")
    if len(sub) != len(test_ids) or (sub["id"].astype(str).to_numpy() != np.asarray(test_ids, dtype=str)).any():
        raise KKError("submission ids differ from the test file's ids or order")
    if task.submission == "labels":
        values = sub[columns[0]].astype(str)
        bad = ~values.isin(task.label_values) | sub[columns[0]].isna()
        if bad.any():
            raise KKError(f"submission row id {sub['id'][bad].iloc[0]}: {columns[0]}={sub[columns[0]][bad].iloc[0]!r} "
                          f"is not one of {', '.join(task.label_values)}")
    else:
        p = sub[list(columns)].to_numpy(dtype=np.float64)
        if not np.isfinite(p).all():
            raise KKError("submission has NaN probabilities")
        if np.abs(p.sum(1) - 1).max() > 1e-6 or (p <= 0).any() or (p >= 1).any():
            raise KKError("submission rows must be probabilities strictly between 0 and 1 summing to 1")
    if sample_submission is not None:
        sample = read_sample_submission(sample_submission, task)
        if set(sample["id"]) != set(sub["id"].astype(str)):
            if ids_mismatch == "warn":
                # On Kaggle's rerun the hidden test.csv is what is scored; a stale sample must not abort it.
                from .ui import warn

                warn(f"{sample_submission}: ids differ from the test file's; following the test file")
            else:
                raise KKError(f"{sample_submission}: ids differ from the test file's")


def read_sample_submission(path, task: Task = LMSYS):
    """Kaggle's sample_submission.csv, checked: a readable CSV with the task's submission columns and at least one row."""
    import pandas as pd

    from .data import check_unique_header

    path = Path(path)
    if path.stat().st_size == 0:
        raise KKError(f"sample submission {path} is empty")
    check_unique_header(path)
    try:
        sample = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise KKError(f"sample submission {path}: cannot be read as CSV ({str(e).splitlines()[0][:120]})") from None
    expected = ["id", *task.submission_columns]
    if list(sample.columns) != expected:
        raise KKError(f"sample submission {path}: columns {list(sample.columns)[:6]} differ from the submission's ({','.join(expected)})")
    if len(sample) == 0:
        raise KKError(f"sample submission {path} has a header but no rows")
    return sample


def write_submission(test_ids, probs: np.ndarray, out, force: bool = False, sample_submission=None,
                     ids_mismatch: str = "error", task: Task = LMSYS) -> Path:
    """Checked, atomic write of the task's submission (probabilities, or argmax labels); an existing file
    is renamed with a timestamp unless ``force``."""
    from .io import atomic_path, file_lock, protect_existing

    sub = task.submission_frame(test_ids, probs)
    check_submission(sub, test_ids, sample_submission, ids_mismatch, task)
    out = Path(out)
    with atomic_path(out) as tmp:
        sub.to_csv(tmp, index=False)
        # Only once the new file is complete is the old one kept aside (then the new one renamed in),
        # and both under a lock: two writers never back up the same file and lose the other's.
        with file_lock(out.with_name(f".{out.name}.lock"), f"submission {out}", wait=60):
            protect_existing(out, force, "submission", policy="keep")
            os.replace(tmp, out)
    return out


def _check_inputs(test_path, sample_submission, out, force: bool, task: Task = LMSYS, train_path=None) -> None:
    from .io import check_writable, refuse_inputs

    for what, p in (("--test", test_path), ("--sample-submission", sample_submission)):
        if p is None:
            continue
        p = Path(p)
        if not p.exists():
            raise KKError(f"{what} {p} does not exist")
        if not p.is_file():
            raise KKError(f"{what} {p} is a folder, expected a file")
    if sample_submission is not None:
        read_sample_submission(sample_submission, task)  # a binary or empty file is refused before any prediction
    out = Path(out)
    refuse_inputs(out, [test_path, sample_submission, train_path])
    if out.is_dir():
        raise KKError(f"--out {out} is a folder; give a file name such as {out / 'submission.csv'}")
    check_writable(out.parent, f"--out {out}")


def ensemble(runs: list, test_path, out="submissions/submission.csv", folds="all", method: str = "mean",
             fit: bool = True, tta: bool = True, force: bool = False, sample_submission=None, train_path=None,
             backbone: str | None = None, bad_rows: str | None = None, oof_out=None, overrides: list[str] | None = None,
             threads: int | None = None) -> dict:
    """Average folds (and runs), calibrate on OOF, write the submission; returns a report. ``overrides``:
    ``--set predict.*`` inference settings for every fold (its config.yaml stays as trained). ``threads``: torch's CPU
    threads (default: each fold's ``predict.threads``)."""
    from .data import load_test, load_train
    from .predict import predict_runs
    from .runs import oof_set, open_runs, runs_task
    from .ui import console, table, warn

    runs = open_runs([Path(r) for r in runs], folds)
    task = runs_task(runs)  # the runs' competition: its files, its submission
    overrides = [*(overrides or []), *([f"predict.threads={threads}"] if threads else [])] or None
    # Everything that can fail after the long prediction work is checked before it starts.
    _check_inputs(test_path, sample_submission, out, force, task, train_path)
    first_cfg = runs[0].folds[0].inference(overrides, "kk ensemble")  # a bad --set fails before the long work
    train_df, train_report = load_train(train_path or first_cfg.data.train, bad_rows or first_cfg.data.bad_rows, task)
    train_report.print_warnings()
    # OOF ids common to every run: runs trained on other folds still compare on the same rows.
    oof = oof_set(runs, train_df, {rid for rid, _ in train_report.skipped})
    y = oof.y
    if len(y) == 0:
        raise KKError("the runs' out-of-fold ids do not overlap; were they trained on the same train file?")
    if any(len(y) != len(rp.ids) for rp in oof.runs):
        warn(f"runs cover different OOF rows; weights are fitted on the {len(y)} rows they share")

    base = combine(oof.oofs, method=method)
    before = log_loss(base, y)
    weights, temperature, calibrated, cal, cal_note = choose_calibration(oof, method, fit)
    after = log_loss(calibrated, y)
    if oof_out is not None:
        # The calibrated OOF ensemble: a teacher's soft labels for every training row (distillation).
        from .io import protect_existing, write_csv

        protect_existing(oof_out, force, "OOF soft labels", sources=[test_path, train_path or first_cfg.data.train, out])
        write_csv(oof_out, task.prob_frame(oof.ids, calibrated))

    test_df, report = load_test(test_path, task=task)
    report.print_warnings()
    test_ids = test_df["id"].to_numpy()
    fold_probs = predict_runs(runs, test_df, test_path, tta, force, backbone, overrides)
    final = blend(fold_probs, weights, temperature, method)
    path = write_submission(test_ids, final, out, force=force, sample_submission=sample_submission, task=task)

    rows, labels = [], dict(zip(train_df["id"], train_df["label"]))
    for rp in oof.runs:
        for f in rp.per_fold:
            rows.append([str(rp.run.path), f["fold"], f["rows"], f["no_tta"], f["tta"], f["acc"]])
        yr = np.array([labels[i] for i in rp.ids])
        rows.append([str(rp.run.path), "all", len(yr), log_loss(rp.probs_no_tta, yr), log_loss(rp.probs, yr), accuracy(rp.probs, yr)])
    rows.append(["ensemble", "all", len(y), "", before, accuracy(base, y)])
    rows.append(["ensemble (calibrated)", "all", len(y), "", after, accuracy(calibrated, y)])
    console.print(table("out-of-fold log loss", ["run", "fold", "rows", "no TTA", "TTA", "accuracy"], rows))
    if cal is not None:
        console.print(table("calibration (weights + temperature)", ["judged on", "log loss"],
                            [["uncalibrated", cal["uncalibrated"]], ["the rows it was fitted on (in-sample)", cal["in_sample"]],
                             [f"held-out folds (cross-fitted, {cal['folds']} folds)", cal["cross_fitted"]],
                             ["verdict", "kept" if cal["kept"] else "not kept: it does not generalise"]]))
    if task.language_column and task.language_column in train_df.columns:
        from .metrics import group_accuracy

        lang = dict(zip(train_df["id"], train_df[task.language_column]))
        console.print(table(f"out-of-fold accuracy per {task.language_column} (calibrated ensemble)",
                            [task.language_column, "rows", "accuracy"], group_accuracy(calibrated, y, [lang[i] for i in oof.ids])))
    metric = task.metric
    console.print(
        f"calibration: {cal_note}\nweights {', '.join(f'{w:.3f}' for w in weights)}; temperature {temperature:.3f}; "
        f"OOF {before:.4f} -> {after:.4f}"
        + (f" (log loss; OOF {metric.title} {metric(base, y):.4f} -> {metric(calibrated, y):.4f})" if metric.name != "log_loss" else "")
        + f"; wrote {path} ({len(test_ids)} rows)",
        highlight=False,
    )
    return {"submission": path, "task": task.name, "oof_before": before, "oof_after": after, "weights": weights.tolist(),
            "calibration": cal, "calibration_source": cal_note, "temperature": temperature, "test_probs": final,
            "test_ids": test_ids, "per_run": oof.runs, "oof_metric": metric(calibrated, y)}
