"""Protected outputs: write to a temporary file, then rename.

Every file kagglekit produces (folds, OOF/test predictions, submissions,
checkpoints) goes through these helpers, so a crash or Ctrl-C mid-write never
leaves a half-written file where a good one used to be.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import KKError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file lives in the same folder so the final ``os.replace`` is an
    atomic rename on the same file system. On any exception it is removed and the
    old ``path`` (if any) is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars and paths show up in metrics; make them plain JSON.
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv(path: str | os.PathLike, df, **kwargs) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it in for ``path`` on success.

    The old folder is moved aside first and removed only once the new one is in
    place, so at every moment either the old or the new complete folder exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def protect_existing(path: str | os.PathLike, force: bool, what: str, policy: str = "refuse") -> None:
    """The explicit policy for an output that already exists.

    ``policy="refuse"``: raise unless ``force``. ``policy="keep"``: rename the old
    file with a timestamp (``name.20261127-201500.csv``) unless ``force``, so
    nothing is lost either way.
    """
    path = Path(path)
    if not path.exists() or force:
        return
    if policy == "refuse":
        raise KKError(f"{path} already exists; pass --force to overwrite the {what}")
    if policy == "keep":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        n = 1
        while backup.exists():
            backup = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
            n += 1
        os.replace(path, backup)
        return
    raise ValueError(f"unknown policy {policy!r}")
