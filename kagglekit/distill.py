"""Knowledge distillation: per-fold teacher labels without a CV leak.

A teacher's OOF predictions leak: the model that predicted a row of fold j trained on fold K, so a fold-K student
learning from them learns fold K's labels. ``kk distill-labels`` writes one file per fold, as the LMSYS 1st place
did: fold K's file holds the teachers' fold-K models' predictions of fold K's *training* rows. Those are in-sample,
so sharper than OOF (``train.distill.temperature`` > 1 softens them; the table shows both). Several teachers are
averaged in logit space. The student's loss is :func:`kagglekit.train.training_loss`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import KKError
from .task import LMSYS, Task

# --- the student's side: which file, which rows, which loss -------------------------------------------------------------


def fold_soft_labels(template: str, fold: int, train_ids, val_ids, task: Task = LMSYS) -> np.ndarray:
    """The teacher's probabilities for fold ``fold``'s training rows; a warning when the file also covers the
    fold's validation rows, the mark of an OOF file (one teacher model per row, trained on this fold's rows)."""
    from .data import read_probs

    path = Path(str(template).replace("{fold}", str(fold)))  # one file for every fold, or DIR/fold_{fold}.csv
    soft_ids, soft = read_probs(path, "data.soft_labels", task)  # it refuses any row that is not a distribution
    index = {i: n for n, i in enumerate(soft_ids)}
    ids = list(train_ids)
    missing = [i for i in ids if i not in index]
    if missing:
        raise KKError(f"{path}: no soft label for train id {missing[0]} ({len(missing)} missing)")
    seen = sum(1 for i in val_ids if i in index)
    if seen:
        from .ui import warn

        warn(f"{path} also labels {seen} of fold {fold}'s validation rows: if it is an OOF ensemble (kk ensemble "
             f"--oof-out), the teacher models behind fold {fold}'s training labels trained on fold {fold}'s validation "
             f"rows, so this fold's score is optimistic; kk distill-labels writes leak-free per-fold labels "
             f"(data.soft_labels: DIR/fold_{{fold}}.csv)")
    return soft[[index[i] for i in ids]]


# --- the teachers' side: kk distill-labels -----------------------------------------------------------------------------


def _check_teacher_folds(teachers: list[Path], folds_df, fold_ids: list[int], folds_path, task: Task = LMSYS) -> dict:
    """{(teacher, fold): fold folder}; every teacher has every fold, and its fold-K model validated on (so never
    trained on) every one of fold K's validation rows."""
    from .data import read_probs
    from .runs import open_run

    found = {}
    for run in teachers:
        for fold in open_run(run, fold_ids).folds:
            k, path = fold.index, fold.path
            oof_ids, _ = read_probs(path / "oof.csv", "teacher OOF", task)
            val = set(folds_df.loc[folds_df["fold"] == k, "id"])
            unseen = val - set(oof_ids)
            if unseen:
                raise KKError(f"{path} did not validate on {len(unseen)} of fold {k}'s validation rows in {folds_path} "
                              f"(e.g. id {sorted(unseen)[0]}): its fold-{k} model may have trained on them; "
                              "train the teacher with the same folds file")
            found[run, k] = path
    return found


def _normalised_weights(weights, n: int) -> np.ndarray:
    if not weights:
        return np.full(n, 1.0 / n)
    if len(weights) != n:
        raise KKError(f"give one --weight per --teacher ({n} teacher(s), {len(weights)} weight(s))")
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise KKError(f"--weight must be non-negative numbers, not all zero (got {', '.join(map(str, weights))})")
    return w / w.sum()


def _extra_frames(paths, train_ids: set, task: Task = LMSYS):
    """Extra rows to label too (the task's test or train format); their ids must differ from the train file's and each other."""
    import pandas as pd

    from .data import load_test

    frames, seen = [], set(train_ids)
    for p in paths:
        df, report = load_test(p, task=task)
        report.print_warnings()
        clash = [i for i in df["id"] if i in seen]
        if clash:
            raise KKError(f"{p}: id {clash[0]} is also a train id or in another --extra file ({len(clash)} such ids); "
                          "a soft-label file is keyed by id")
        seen.update(df["id"])
        frames.append(df[list(task.test_columns)])
    return pd.concat(frames, ignore_index=True) if frames else None


def teacher_labels(teachers, train_path, folds_path, out_dir, weights=None, extra=(), tta: bool = True,
                   batch_size: int | None = None, backbone: str | None = None, bad_rows: str = "error",
                   force: bool = False, task_name: str = "lmsys", only_folds=None) -> list[dict]:
    """Write ``out_dir/fold_K.csv`` for every fold K of ``folds_path`` (or those in ``only_folds``): the teachers'
    fold-K models' probabilities (swap TTA, averaged over teachers in logit space with ``weights``) for fold K's
    training rows and the ``extra`` rows. Returns a row per fold for the report (in-sample vs OOF log loss of the
    teacher blend). ``task_name``: the competition (a teacher trained for another one is refused)."""
    import pandas as pd

    from .data import load_train
    from .ensemble import combine
    from .folds import load_folds
    from .inference import TokenCache
    from .io import check_writable, protect_existing, write_csv, write_json
    from .metrics import log_loss
    from .predict import FoldModel
    from .runs import file_sha256, open_run, run_oof
    from .task import get_task
    from .ui import progress

    task = get_task(task_name)
    teachers = [Path(t) for t in teachers]
    if not teachers:
        raise KKError("give at least one --teacher run")
    w = _normalised_weights(weights, len(teachers))
    for run in teachers:  # before the train file is read in the other competition's format
        if (trained := open_run(run).task) != task:
            raise KKError(f"{run} was trained for task {trained.name}, not {task.name} (give --task {trained.name})")
    df, report = load_train(train_path, bad_rows, task)
    report.print_warnings()
    folds = load_folds(folds_path, df["id"])
    folds = folds[folds["id"].isin(set(df["id"]))]
    fold_ids = sorted(int(f) for f in folds["fold"].unique())
    if only_folds is not None:
        unknown = sorted(set(only_folds) - set(fold_ids))
        if unknown:
            raise KKError(f"fold {unknown[0]} is not in {folds_path} (folds: {', '.join(map(str, fold_ids))})")
        fold_ids = sorted(set(only_folds))
    paths = _check_teacher_folds(teachers, folds, fold_ids, folds_path, task)   # before any long work
    extra_df = _extra_frames(extra, set(df["id"]), task)
    out_dir = Path(out_dir)
    check_writable(out_dir, f"--out {out_dir}")
    outputs = {k: out_dir / f"fold_{k}.csv" for k in fold_ids}
    for path in outputs.values():
        protect_existing(path, force, "teacher labels", sources=[train_path, folds_path, *extra, *teachers])
    fold_of = dict(zip(folds["id"], folds["fold"]))
    labels = df["label"].to_numpy()
    # The teachers' own OOF predictions (what they score on rows they never trained on), for the table.
    skipped = {rid for rid, _ in report.skipped}
    teacher_oof = [run_oof(open_run(t, fold_ids), dict(zip(df["id"], labels)), skipped) for t in teachers]
    teacher_oof = [dict(zip(rp.ids, rp.probs)) for rp in teacher_oof]
    rows, labelled = [], {}
    with progress() as bar:
        for k in fold_ids:
            in_train = np.array([fold_of[i] != k for i in df["id"]])
            fold_rows = df[in_train].reset_index(drop=True)
            n_train = len(fold_rows)
            if extra_df is not None:
                fold_rows = pd.concat([fold_rows[list(extra_df.columns)], extra_df], ignore_index=True)
            probs = []
            cache = TokenCache()  # teachers with one tokenizer and formatting tokenize this fold's rows once
            for run in teachers:
                fm = FoldModel(paths[run, k], backbone)
                probs.append(fm.predict(fold_rows, tta, batch_size, bar, f"{run.name} fold {k}", cache=cache)["probs"])
                fm.release()  # one teacher model in memory at a time
            oofs = [np.array([t[i] for i in df["id"][~in_train]]) for t in teacher_oof]
            blend = combine(probs, w, "geo")  # softmax of the weighted mean log-probability
            if not np.isfinite(blend).all():
                raise KKError(f"fold {k}: the teachers predicted non-finite probabilities")
            labelled[k] = task.prob_frame(fold_rows["id"].to_numpy(), blend)
            oof = combine(oofs, w, "geo")
            y_tr, y_va = labels[in_train], labels[~in_train]
            rows.append({"fold": k, "rows": len(fold_rows), "extra": len(fold_rows) - n_train,
                         "in_sample_log_loss": log_loss(blend[:n_train], y_tr), "oof_log_loss": log_loss(oof, y_va),
                         "in_sample_confidence": float(blend[:n_train].max(1).mean()),
                         "oof_confidence": float(oof.max(1).mean()), "file": str(outputs[k])})
    # Written only once every fold is labelled, teacher_labels.json last (an old one removed first): Ctrl-C or a
    # failure mid-way leaves the folder as it was, never new fold files beside no description or an old one.
    (out_dir / "teacher_labels.json").unlink(missing_ok=True)
    for k, frame in labelled.items():
        write_csv(outputs[k], frame)
    write_json(out_dir / "teacher_labels.json", {
        "teachers": [str(t) for t in teachers], "weights": w.tolist(), "tta": tta, "train": str(train_path),
        "train_sha256": file_sha256(train_path), "folds": str(folds_path), "folds_sha256": file_sha256(folds_path),
        "extra": [str(p) for p in extra], "per_fold": rows,
    })
    return rows
