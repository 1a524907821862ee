"""Rich output shared by every command: one console, progress bars, tables."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)


class PlainProgress:
    """Progress for logs nobody watches (stderr redirected to a file, a batch job): instead of a
    live bar, one plain line per task every ``every`` seconds, with the task's status (loss,
    samples/s), elapsed time and ETA. Same calls as Rich's Progress."""

    def __init__(self, every: float = 30.0, stream=None):
        self.every = every
        self.stream = stream
        self.tasks: dict[int, dict] = {}
        self._ids = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tid in list(self.tasks):
            self._emit(tid)
        self.tasks.clear()
        return False

    def add_task(self, description: str, total=None, completed=0, **fields) -> int:
        tid, self._ids = self._ids, self._ids + 1
        now = time.time()
        self.tasks[tid] = {"description": description, "total": total, "completed": completed, "start": now,
                           "start_completed": completed, "last": now, "fields": dict(fields)}
        self._emit(tid)
        return tid

    def update(self, task: int, completed=None, advance=None, **fields) -> None:
        t = self.tasks.get(task)
        if t is None:
            return
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        t["fields"].update(fields)
        if time.time() - t["last"] >= self.every:
            self._emit(task)

    def advance(self, task: int, advance=1) -> None:
        self.update(task, advance=advance)

    def remove_task(self, task: int) -> None:
        if task in self.tasks:
            self._emit(task)
            del self.tasks[task]

    def _emit(self, task: int) -> None:
        t = self.tasks[task]
        now = time.time()
        t["last"] = now
        done, total = t["completed"], t["total"]
        elapsed = now - t["start"]
        parts = [f"{t['description']}: {done:g}" + (f"/{total:g} ({100 * done / total:.0f}%)" if total else "")]
        if t["fields"].get("status"):
            parts.append(str(t["fields"]["status"]))
        parts.append(f"elapsed {_hms(elapsed)}")
        rate = (done - t["start_completed"]) / elapsed if elapsed > 0 else 0
        if total and rate > 0 and done < total:
            parts.append(f"ETA {_hms((total - done) / rate)}")
        print(", ".join(parts), file=self.stream or sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """Hours above one, else minutes or seconds: a small budget or pass never reads "~0.00 h"."""
    s = max(float(seconds), 0.0)
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress(transient: bool = False, disable: bool = False):
    """A progress bar on stderr; quiet when KK_QUIET is set (tests, notebooks) or ``disable``.

    When stderr is not a terminal (a log file, a batch job) a live bar would print nothing until the
    end, so a plain line is printed every ``KK_LOG_EVERY`` seconds (default 30) instead.
    """
    quiet = disable or bool(os.environ.get("KK_QUIET"))
    if not quiet and not err_console.is_terminal:
        return PlainProgress(float(os.environ.get("KK_LOG_EVERY", "30")))
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=transient, disable=quiet)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence], floats: str = "{:.4f}") -> Table:
    """A Rich table; numeric columns are right-aligned, text columns left-aligned."""
    rows = [list(r) for r in rows]
    t = Table(title=title, title_justify="left")
    for j, c in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[j], (int, float)) and not isinstance(r[j], bool) or r[j] in ("", None) for r in rows)
        t.add_column(str(c), justify="right" if numeric else "left")
    for row in rows:
        t.add_row(*["" if v is None else floats.format(v) if isinstance(v, float) else str(v) for v in row])
    return t


def frame_table(title: str, df, floats: str = "{:.4f}") -> Table:
    return table(title, list(df.columns), df.itertuples(index=False), floats)
