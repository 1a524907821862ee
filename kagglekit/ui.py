"""Rich output shared by every command: one console, progress bars, tables."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)


def progress(transient: bool = False) -> Progress:
    """A progress bar on stderr; quiet when KK_QUIET is set (tests, notebooks)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=bool(os.environ.get("KK_QUIET")),
    )


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence], floats: str = "{:.4f}") -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(str(c), justify="right" if c not in ("fold", "run", "state", "params", "key") else "left")
    for row in rows:
        t.add_row(*[floats.format(v) if isinstance(v, float) else str(v) for v in row])
    return t


def frame_table(title: str, df, floats: str = "{:.4f}") -> Table:
    return table(title, list(df.columns), df.itertuples(index=False), floats)
