"""Rich output shared by every command: one console, progress bars, tables."""

from __future__ import annotations

import os
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


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar on stderr; quiet when KK_QUIET is set (tests, notebooks) or ``disable``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=disable or bool(os.environ.get("KK_QUIET")),
    )


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
