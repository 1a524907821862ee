"""Reading the competition's files through the task (kagglekit/task.py): CSV, or parquet by the ``.parquet`` suffix.

Errors name the row (``bad_rows="skip"`` skips and counts it instead): a text cell that is not a non-empty JSON
list of strings/nulls (JSON-list tasks) or not a string (plain tasks), turn counts differing between the fields,
labels that are not one-hot or not one of the task's values. Always errors: a missing or empty file, a missing
column, duplicate ids. Warnings, then repaired (:class:`LoadReport`): ``null`` turns (empty text), lone UTF-16
surrogates (U+FFFD). ``bad_rows="repair"`` also closes text cells cut off mid-JSON.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from .errors import KKError
from .task import LMSYS, Task

BadRows = Literal["error", "skip", "repair"]


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class LoadReport:
    """What the loader saw: how many rows it kept, skipped, repaired or cleaned."""

    path: str
    rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    repaired: int = 0
    null_turns: int = 0
    surrogates_fixed: int = 0

    def print_warnings(self) -> None:
        """Each warning as one yellow line on stderr."""
        from .ui import warn

        for w in self.warnings():
            warn(w)

    def warnings(self) -> list[str]:
        first = self.skipped[0] if self.skipped else ("", "")
        notes = ((self.skipped, f"skipped {len(self.skipped)} bad row(s) (first: id {first[0]}: {first[1]})"),
                 (self.repaired, f"repaired {self.repaired} truncated JSON cell(s)"),
                 (self.null_turns, f"{self.null_turns} null turn(s) read as empty text"),
                 (self.surrogates_fixed, f"{self.surrogates_fixed} cell(s) had lone surrogates, replaced by U+FFFD"))
        return [f"{self.path}: {text}" for shown, text in notes if shown]


def clean_text(s: str) -> tuple[str, bool]:
    """Return ``s`` safe for ``encode('utf-8')``: pairs joined, lone surrogates replaced."""
    if not _SURROGATE.search(s):
        return s, False
    out = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    # Only a replacement counts as a fix; a pair stored as two code points is just joined.
    return out, out.count("\ufffd") > s.count("\ufffd")


def _repair_json_list(cell: str):
    """Close a JSON list of strings that was cut off; None when that does not work."""
    s = cell.rstrip()
    if not s.startswith("["):
        return None
    # A cut can land after a backslash (an escape half written); drop it.
    trimmed = s[:-1] if s.endswith("\\") and not s.endswith("\\\\") else s
    candidates = [trimmed + tail for tail in ('"]', "]", 'null]', '""]')]
    candidates += [trimmed[:-k] + '"]' for k in range(1, 6)]  # a cut inside a \uXXXX escape: drop up to 5 characters
    for text in candidates:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    return None


def check_unique_header(path: str | os.PathLike) -> None:
    """Refuse a CSV whose header names a column twice: pandas would rename the second ``id`` to ``id.1``
    and silently read the first, whichever of the two was meant. A header that cannot be read is left
    to the reader that follows (it names the file)."""
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, IndexError):
        return
    dup = header[header.duplicated()]
    if len(dup):
        raise KKError(f"{path}: column {dup.iloc[0]!r} appears more than once in the header")


def parse_cell(cell, task: Task = LMSYS, bad_rows: BadRows = "error") -> tuple[list[str], dict]:
    """One text cell as the task stores it: a non-empty JSON list of strings or nulls, or (plain cells) one string,
    a single turn. Raises ``ValueError`` with a short reason otherwise; returns the turns and counters (nulls,
    surrogates, repaired)."""
    stats = {"nulls": 0, "surrogates": 0, "repaired": 0}
    if task.cells == "plain":  # a missing value (null in parquet) is read as empty text and counted
        if not (cell is None or isinstance(cell, str) or (isinstance(cell, float) and cell != cell)):
            raise ValueError(f"holds a {type(cell).__name__}, not a string")
        value = [cell if isinstance(cell, str) else None]
    elif not isinstance(cell, str):
        raise ValueError(f"holds a {type(cell).__name__}, not a JSON list")
    else:
        try:
            value = json.loads(cell)
        except (ValueError, RecursionError):  # 10^5 nested lists are no list of turns either
            value = _repair_json_list(cell) if bad_rows == "repair" else None
            if value is None:
                raise ValueError("is not valid JSON") from None
            stats["repaired"] = 1
        if not isinstance(value, list) or not value:
            raise ValueError("is not a non-empty JSON list")
    turns = []
    for item in value:
        if item is None:
            stats["nulls"] += 1
            item = ""
        elif not isinstance(item, str):
            raise ValueError(f"holds a {type(item).__name__}, not a string")
        item, fixed = clean_text(item)
        stats["surrogates"] += fixed
        turns.append(item)
    return turns, stats


def is_parquet(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def read_raw(path: str | os.PathLike, what: str = "data") -> pd.DataFrame:
    """A CSV (every cell a string, nothing read as NaN) or a parquet file (pyarrow; the file's own
    types) as it is, with one clear line for a file that cannot be read."""
    path = Path(path)
    if not path.exists():
        raise KKError(f"{path} does not exist")
    if path.is_dir():
        raise KKError(f"{path} is a folder, expected a {what} file")
    if path.stat().st_size == 0:
        raise KKError(f"{path} is empty")
    if is_parquet(path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise KKError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            try:
                return pd.read_parquet(path, engine="pyarrow")
            except NotImplementedError:  # pandas metadata saying str over a list or struct column: the data as it is,
                return pq.read_table(path).to_pandas(ignore_metadata=True)  # for the row checks to name the cell
        except (OSError, ValueError, NotImplementedError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise KKError(f"{path}: cannot be read as parquet ({str(e).splitlines()[0][:160]})") from None
    check_unique_header(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise KKError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None


def read_table(path: str | os.PathLike, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """:func:`read_raw` plus the checks every input gets: required columns, at least one row, ids
    present and unique (ids are strings, as in the file)."""
    path = Path(path)
    df = read_raw(path, what)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise KKError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a {what} file needs {', '.join(required)})")
    if len(df) == 0:
        raise KKError(f"{path} has a header but no rows")
    if df["id"].dtype != object or not all(isinstance(v, str) for v in df["id"]):
        df["id"] = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in df["id"]]
    ids = df["id"].str.strip()
    if (ids == "").any():
        raise KKError(f"{path}: row {int((ids == '').to_numpy().argmax()) + 1} has an empty id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise KKError(f"{path}: duplicate id {dup.iloc[0]} ({dup.nunique()} id(s) appear more than once)")
    df["id"] = ids
    return df


def load_arena(path: str | os.PathLike, kind: Literal["train", "test"] = "train", bad_rows: BadRows = "error",
               task: Task = LMSYS):
    """Load a train or test file of ``task``'s competition into a frame with parsed turn lists.

    Returns ``(df, report)``. ``df`` has ``id`` (str, as in the file), the three text
    columns as lists of strings, and for train a ``label`` column (the class index in
    ``task.class_names`` order: 0 = A, 1 = B, 2 = tie for LMSYS) plus the label columns
    (one-hot ``winner_*`` as ints, or the categorical ``winner`` as it is). Other columns are kept.
    """
    path = Path(path)
    required = task.train_columns if kind == "train" else task.test_columns
    df = read_table(path, required, kind)
    report = LoadReport(path=str(path))
    text_columns = task.text_columns
    parsed = {c: [] for c in text_columns}
    labels = []
    label_cols = list(task.label_columns)
    rows = zip(df["id"], *(df[c] for c in text_columns), *((df[c] for c in label_cols) if kind == "train" else ()))
    for rid, *values in rows:
        try:
            turns = {}
            repaired = 0
            for col, cell in zip(text_columns, values):
                try:
                    turns[col], st = parse_cell(cell, task, bad_rows)
                except ValueError as e:
                    raise ValueError(f"column {col} {e}") from None
                report.null_turns += st["nulls"]
                report.surrogates_fixed += st["surrogates"]
                repaired += st["repaired"]
            report.repaired += repaired
            counts = {c: len(t) for c, t in turns.items()}
            # A repaired (cut-off) cell may have lost turns, so counts only have to agree in intact rows.
            if len(set(counts.values())) != 1 and not repaired:
                raise ValueError("turn counts differ: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
            if kind == "train":
                labels.append(task.label_of(tuple(values[len(text_columns):])))
        except ValueError as e:
            if bad_rows == "error":
                hint = " (or skip such rows: --bad-rows skip, or data.bad_rows: skip in the config)" if kind == "train" else ""
                raise KKError(f"{path}: row id {rid}: {e}{hint}") from None
            report.skipped.append((rid, str(e)))
            continue
        for col in text_columns:
            parsed[col].append(turns[col])
    if report.skipped:
        df = df[~df["id"].isin({rid for rid, _ in report.skipped})].reset_index(drop=True)
    if len(df) == 0:
        raise KKError(f"{path}: every row was bad ({len(report.skipped)} skipped; first: id {report.skipped[0][0]}: {report.skipped[0][1]})")
    for col in text_columns:
        df[col] = pd.Series(parsed[col], index=df.index, dtype=object)
    if kind == "train":
        df["label"] = labels
        for col, values in task.label_cells(df["label"].to_numpy()).items():
            df[col] = values
    report.rows = len(df)
    return df, report


PROB_TOLERANCE = 1e-3  # rows of a probability file sum to 1 within this (soft labels may be rounded)


def read_probs(path: str | os.PathLike, what: str = "probabilities", task: Task = LMSYS) -> tuple:
    """(ids, (n, n_classes) array) from a CSV ``id`` + the task's probability columns
    (``winner_model_a,winner_model_b,winner_tie`` for LMSYS): OOF and test predictions, soft labels: the one
    reader of probability files. A missing column, no rows, or a row that is not a probability distribution
    (NaN, infinite, negative, not summing to 1 within :data:`PROB_TOLERANCE`) is an error naming the file and
    the row's id."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise KKError(f"{what} file {path} does not exist")
    check_unique_header(path)
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise KKError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0][:120]})") from None
    missing = [c for c in ("id", *task.prob_columns) if c not in df.columns]
    if missing:
        raise KKError(f"{path}: missing column {', '.join(missing)}")
    try:
        p = df[list(task.prob_columns)].to_numpy(dtype=np.float64)
    except ValueError:
        raise KKError(f"{path}: probability columns hold text, not numbers") from None
    if len(df) == 0:
        raise KKError(f"{path}: no rows (only a header)")
    checks = ((~np.isfinite(p).all(axis=1), "NaN or infinite probabilities"),
              ((p < 0).any(axis=1), "a negative probability"),
              (np.abs(p.sum(axis=1) - 1) > PROB_TOLERANCE, "probabilities that do not sum to 1"))
    for bad, what_is_wrong in checks:
        if bad.any():
            first = int(bad.argmax())
            raise KKError(f"{path}: row id {df['id'].iloc[first]} has {what_is_wrong} ({', '.join(f'{v:g}' for v in p[first])})"
                          + (f"; {int(bad.sum())} such rows" if bad.sum() > 1 else ""))
    return df["id"].to_numpy(), p


def load_train(path, bad_rows: BadRows = "error", task: Task = LMSYS):
    return load_arena(path, "train", bad_rows, task)


def load_test(path, bad_rows: BadRows = "error", task: Task = LMSYS):
    return load_arena(path, "test", bad_rows, task)


def swap_frame(df: pd.DataFrame, task: Task = LMSYS) -> pd.DataFrame:
    """A/B exchanged: responses swapped, labels mapped by the task's swap (A<->B, a tie stays)."""
    out = df.copy()
    out["response_a"], out["response_b"] = df["response_b"], df["response_a"]
    if "model_a" in df.columns and "model_b" in df.columns:
        out["model_a"], out["model_b"] = df["model_b"], df["model_a"]
    if "label" in df.columns:
        swapped = task.swap_labels(df["label"].to_numpy())
        out["label"] = pd.Series(swapped, index=df.index).astype(df["label"].dtype)
        for col, values in task.label_cells(swapped).items():
            if col in df.columns:
                out[col] = pd.Series(values, index=df.index).astype(df[col].dtype)
    return out
