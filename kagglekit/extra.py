"""``data.extra`` at training time: extra rows join a fold's training rows, never its validation.

A file (CSV or parquet) is hard-labelled (the task's train format) or pseudo-labelled (``soft_labels``: one file or
a per-fold template). A row training fold K is dropped, counted by reason (printed, kept in metrics.json), when
1. its id is a train id, 2. its prompt and responses are a train row's (:func:`kagglekit.dedup.pair_key`), or
3. its prompt is one of fold K's validation prompts (:func:`kagglekit.dedup.prompt_key`: folds are grouped by
prompt). An id repeated across the extra files is kept once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import KKError

DROP_ID = "id of a train row"
DROP_PAIR = "same prompt+responses as a train row"
DROP_REPEAT = "id repeated in data.extra"


def drop_val_prompt(fold: int) -> str:
    return f"prompt of a fold-{fold} validation row"


@dataclass
class ExtraRows:
    """The extra rows fold K trains on, with their targets."""

    rows: object  # DataFrame: id + the task's text columns (parsed turn lists)
    soft: np.ndarray  # (n, C) teacher probabilities; NaN rows where a row has none
    hard: np.ndarray  # (n,) class index; -1 where a row has no hard label
    dropped: dict = field(default_factory=dict)  # reason -> rows dropped (all files)


def _read(path: str, bad_rows: str, task):
    """(frame, has hard labels) of one extra file, through the competition loader's checks."""
    from pathlib import Path

    import pandas as pd

    from .data import is_parquet, load_test, load_train

    p = Path(path)
    if not p.is_file():
        raise KKError(f"data.extra: {p} does not exist" if not p.exists() else f"data.extra: {p} is a folder, expected a file")
    try:
        if is_parquet(p):
            import pyarrow.parquet as pq

            header = list(pq.read_schema(p).names)
        else:
            header = list(pd.read_csv(p, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        raise KKError(f"data.extra: {p}: cannot be read ({str(e).splitlines()[0][:120]})") from None
    present = [c for c in task.label_columns if c in header]
    if present and len(present) < len(task.label_columns):
        missing = [c for c in task.label_columns if c not in header]
        raise KKError(f"data.extra: {p} has {', '.join(present)} but not {', '.join(missing)} (hard labels need all of "
                      f"{', '.join(task.label_columns)})")
    df, report = (load_train if present else load_test)(p, bad_rows, task)
    report.print_warnings()
    return df, bool(present)


def load_extra(cfg, fold: int, train_df, val_df) -> ExtraRows:
    """The ``data.extra`` rows that may train fold ``fold`` (``train_df``/``val_df``: the fold's rows, parsed)."""
    import pandas as pd

    from .dedup import frame_keys
    from .distill import fold_soft_labels
    from .task import get_task
    from .ui import warn

    task = get_task(cfg.task)
    cols = ["id", *task.text_columns]
    train_ids = set(train_df["id"]) | set(val_df["id"])
    train_pairs = set(frame_keys(train_df)[0]) | set(frame_keys(val_df)[0])
    val_prompts = set(frame_keys(val_df)[1])
    kept, dropped, seen = [], {}, set()  # kept: (rows, soft targets, hard labels) per file
    for extra in cfg.data.extra:
        df, has_hard = _read(extra.path, cfg.data.bad_rows, task)
        if extra.soft_labels is None and not has_hard:
            raise KKError(f"data.extra: {extra.path} has no label columns ({', '.join(task.label_columns)}) and no "
                          "soft_labels: give the teacher's probabilities (soft_labels: FILE) or hard-labelled rows")
        pairs, prompts = frame_keys(df)
        reasons = []
        for rid, pk, qk in zip(df["id"], pairs, prompts):
            reason = (DROP_ID if rid in train_ids else DROP_PAIR if pk in train_pairs
                      else drop_val_prompt(fold) if qk in val_prompts else DROP_REPEAT if rid in seen else None)
            seen.add(rid)
            reasons.append(reason)
        keep = np.array([r is None for r in reasons], dtype=bool)
        counts = pd.Series([r for r in reasons if r is not None], dtype=object).value_counts()
        if len(counts):
            warn(f"data.extra {extra.path}: {int((~keep).sum())} of {len(df)} rows left out of fold {fold}'s training: "
                 + ", ".join(f"{n} {r}" for r, n in counts.items()))
            for r, n in counts.items():
                dropped[r] = dropped.get(r, 0) + int(n)
        df = df[keep].reset_index(drop=True)
        if len(df) == 0:
            continue
        hard = df["label"].to_numpy() if has_hard else np.full(len(df), -1)
        soft = (np.full((len(df), task.n_classes), np.nan) if extra.soft_labels is None
                else fold_soft_labels(extra.soft_labels, fold, df["id"], val_df["id"], task))
        kept.append((df[cols], soft, hard))
    if not kept:
        return ExtraRows(pd.DataFrame({c: pd.Series(dtype=object) for c in cols}), np.zeros((0, task.n_classes)),
                         np.zeros(0, dtype=np.int64), dropped)
    frames, softs, hards = zip(*kept)
    return ExtraRows(pd.concat(frames, ignore_index=True), np.concatenate(softs), np.concatenate(hards).astype(np.int64), dropped)
