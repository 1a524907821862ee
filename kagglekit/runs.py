"""Runs and folds as objects, read once per command.

A run is a folder of trained folds (``runs/<experiment>/fold_K``). :func:`open_runs` reads each fold's
config.yaml and metrics.json once (checked: a damaged fold is one line naming its file, before any work)
and every command passes the :class:`Fold` objects on. :func:`oof_set` is the one place a run's
out-of-fold predictions are read and lined up with their labels: ``kk ensemble``, the kernel build,
``kk report``, ``kk merge`` and ``kk distill-labels`` all call it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import KKError
from .task import Task, get_task, same_task


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(fold_path) -> dict:
    """A fold's metrics.json, checked: a JSON object with a numeric ``val_log_loss`` and ``n_val`` (what a
    finished training writes); anything else (cut off, a list, keys missing) is one line naming the file."""
    f = Path(fold_path) / "metrics.json"
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise KKError(f"{f}: not valid JSON (cut off or damaged); retrain the fold with kk train --force") from None
    if not isinstance(m, dict):
        raise KKError(f"{f}: expected a JSON object of metrics, found a {type(m).__name__}; retrain the fold with kk train --force")
    for key in ("val_log_loss", "n_val"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise KKError(f"{f}: {key} is {'missing' if key not in m else f'not a number ({v!r})'}; retrain the fold with kk train --force")
    return m


def fold_generation(fold_path, metrics: dict | None = None) -> str:
    """Which training made the weights in ``fold_path``: the id ``kk train`` (or ``kk merge``) writes into
    metrics.json, or for a fold trained before there were ids, the hash of its metrics.json. A forced retrain
    that swaps a new fold in changes it."""
    m = read_metrics(fold_path) if metrics is None else metrics
    if isinstance(m.get("generation"), str) and m["generation"]:
        return m["generation"]
    return "metrics-" + file_sha256(Path(fold_path) / "metrics.json")


def fold_config(fold_path: Path):
    from .config import config_from_dict, read_yaml

    return config_from_dict(read_yaml(Path(fold_path) / "config.yaml"), str(Path(fold_path) / "config.yaml"))


def parse_fold_list(folds) -> list[int]:
    if isinstance(folds, (list, tuple)):
        return [int(f) for f in folds]
    try:
        return [int(f) for f in str(folds).split(",") if f.strip() != ""]
    except ValueError:
        raise KKError(f"--folds must be 'all' or a list like 0,2,4 (got {folds!r})") from None


@dataclass(eq=False)
class Fold:
    """One trained fold: its folder, its config as trained and its metrics, each read once."""

    run: Path
    index: int
    path: Path
    cfg: object  # kagglekit.config.Config as trained (config.yaml)
    metrics: dict
    _inference: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.run.name}/fold_{self.index}"

    @property
    def task(self) -> Task:
        return get_task(self.cfg.task)

    @property
    def adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()

    @property
    def merged(self) -> bool:
        return "merged_from" in self.metrics

    @cached_property
    def generation(self) -> str:
        return fold_generation(self.path, self.metrics)

    def inference(self, overrides: list[str] | None = None, command: str = "kk predict"):
        """The config inference uses: ``--set predict.*`` applied (others refused, naming ``command``), once per
        set of overrides; config.yaml stays as trained."""
        from .config import apply_predict_overrides

        key = tuple(overrides or ())
        if key not in self._inference:
            self._inference[key] = apply_predict_overrides(self.cfg, overrides, command) if key else self.cfg
        return self._inference[key]


def open_fold(path, run: Path | None = None, index: int = 0) -> Fold:
    """A fold folder; its metrics.json is checked when it has one (a fold being written, e.g. by kk merge, has none yet)."""
    path = Path(path)
    metrics = read_metrics(path) if (path / "metrics.json").exists() else {}
    return Fold(Path(run) if run else path.parent, index, path, fold_config(path), metrics)


@dataclass(eq=False)
class Run:
    path: Path
    folds: list[Fold]

    @property
    def task(self) -> Task:
        return same_task([f.cfg.task for f in self.folds], "folds")

    @property
    def merged(self) -> bool:
        return any(f.merged for f in self.folds)


def open_run(run_dir, folds="all") -> Run:
    """The finished folds of a run (those in ``folds``, or every one), each read once."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KKError(f"run folder {run_dir} does not exist (train a fold first: kk train --fold 0)")
    found = {}
    for d in run_dir.glob("fold_*"):
        k = d.name.split("_", 1)[1]
        if k.isdigit() and (d / "metrics.json").exists():
            if d.is_symlink() and run_dir.resolve() not in d.resolve().parents:  # kk predict writes into a fold
                raise KKError(f"{d} is a link to {d.resolve()}, outside the run: copy that fold in instead")
            found[int(k)] = d
    if folds in (None, "all"):
        if not found:
            raise KKError(f"{run_dir} has no trained fold (no fold_*/metrics.json)")
        chosen = sorted(found.items())
    else:
        wanted = parse_fold_list(folds)
        missing = [k for k in wanted if k not in found]
        if missing:
            raise KKError(f"fold {missing[0]} of {run_dir} is not trained (trained: {', '.join(map(str, sorted(found))) or 'none'})")
        chosen = [(k, found[k]) for k in wanted]
    return Run(run_dir, [open_fold(d, run_dir, k) for k, d in chosen])


def open_runs(paths, folds="all") -> list[Run]:
    """Runs of one competition; with ``folds`` all, folds missing from a run's folds file are named."""
    if not paths:
        raise KKError("give at least one --run")
    runs = [open_run(p, folds) for p in paths]
    runs_task(runs)
    if folds in (None, "all"):
        for r in runs:
            warn_missing_folds(r)
    return runs


def runs_task(runs: list[Run]) -> Task:
    return same_task([f.cfg.task for r in runs for f in r.folds], "runs")


def warn_missing_folds(run: Run) -> list[int]:
    """Warn, naming them, about folds of the run's folds file that have no trained model: an ensemble of 3
    of 5 folds is legitimate but should never happen by accident. Returns the missing folds."""
    from .ui import warn

    if run.merged:
        return []  # a merged run is one model: the folds file is its source's
    trained = [f.index for f in run.folds]
    expected = set(range(max(trained) + 1))
    for d in run.path.glob("fold_*"):  # a fold folder without metrics.json: unfinished or damaged
        if d.is_dir() and d.name[5:].isdigit():
            expected.add(int(d.name[5:]))
    try:
        import pandas as pd

        expected |= {int(f) for f in pd.read_csv(run.folds[0].cfg.data.folds, usecols=["fold"])["fold"].unique()}
    except (OSError, ValueError, KeyError):
        pass  # the folds file moved or is unreadable: judge by the fold numbers alone
    missing = sorted(expected - set(trained))
    if missing:
        warn(f"{run.path}: fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} not trained; "
             f"using {len(trained)} fold(s): {', '.join(map(str, trained))}")
    return missing


# --- out-of-fold predictions: the currency between steps ---------------------------------------------------------------


@dataclass
class RunOOF:
    """A run's OOF predictions (every validated row once), with the fold each row was validated in."""

    run: Run
    ids: np.ndarray
    probs: np.ndarray
    probs_no_tta: np.ndarray
    row_folds: np.ndarray
    per_fold: list[dict] = field(default_factory=list)
    borrowed: dict | None = None  # a merged run: its OOF is its source folds'; what kk merge recorded of their calibration


@dataclass
class OOFSet:
    """Several runs' OOF on the ids they all cover (sorted), with those ids' labels: what weights and a
    temperature are fitted on."""

    runs: list[RunOOF]
    ids: list
    oofs: list[np.ndarray]
    y: np.ndarray
    folds: np.ndarray | None  # the first run's fold of each row: what cross-fitting splits by


def run_oof(run: Run, labels_by_id: dict, skipped: set | None = None) -> RunOOF:
    """A run's OOF predictions checked against the train file's labels. ``skipped``: ids the train file's
    loader skipped (``--bad-rows skip``); their OOF rows are left out instead of being an error."""
    from .data import read_probs
    from .metrics import accuracy, log_loss

    task, borrowed = run.task, None
    parts, per_fold = [], []  # per fold: (ids, probabilities, probabilities without TTA, the fold of each row)
    for fold in run.folds:
        if fold.merged:
            borrowed = fold.metrics.get("calibration") if isinstance(fold.metrics.get("calibration"), dict) else {}
        fid, p = read_probs(fold.path / "oof.csv", task=task)
        nt_path = fold.path / "oof_no_tta.csv"
        _, pnt = read_probs(nt_path, task=task) if nt_path.exists() else (fid, p)
        if skipped:
            keep = np.array([i not in skipped for i in fid], dtype=bool)
            fid, p, pnt = fid[keep], p[keep], pnt[keep]
        unknown = [i for i in fid if i not in labels_by_id]
        if unknown:
            raise KKError(f"{fold.path / 'oof.csv'}: id {unknown[0]} is not in the train file")
        y = np.array([labels_by_id[i] for i in fid])
        per_fold.append({"fold": fold.index, "rows": len(fid), "tta": log_loss(p, y), "no_tta": log_loss(pnt, y),
                         "acc": accuracy(p, y)})
        parts.append((fid, p, pnt, np.full(len(fid), fold.index)))
    all_ids, probs, probs_nt, row_folds = (np.concatenate(x) for x in zip(*parts))
    if len(set(all_ids)) != len(all_ids):
        raise KKError(f"{run.path}: an id appears in the OOF of two folds (were the folds changed between trainings?)")
    return RunOOF(run, all_ids, probs, probs_nt, row_folds, per_fold, borrowed)


def oof_set(runs: list[Run], train_df, skipped: set | None = None) -> OOFSet:
    """The runs' OOF on the rows they share, lined up with ``train_df``'s labels (the one function every
    command that fits or reports on OOF calls)."""
    labels = dict(zip(train_df["id"], train_df["label"]))
    preds = [run_oof(r, labels, skipped) for r in runs]
    ids = sorted(set(preds[0].ids).intersection(*[set(p.ids) for p in preds[1:]]))
    at = [{i: n for n, i in enumerate(p.ids)} for p in preds]  # id -> row, per run
    oofs = [p.probs[[pos[i] for i in ids]] for p, pos in zip(preds, at)]
    folds = preds[0].row_folds[[at[0][i] for i in ids]]
    return OOFSet(preds, ids, oofs, np.array([labels[i] for i in ids], dtype=int), folds)
