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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only folder: name the output, not the temporary name it was refused
        raise _naming(e, path) from None
    # mkstemp makes the file 0600; outputs get the mode any new file gets here (0644 under the usual umask),
    # or they would reach Kaggle datasets and other users unreadable.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if os.path.lexists(tmp_path):  # the block may have renamed it into place itself (under a lock)
            os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp_path)):  # a full disk names no file: name the output
            raise _naming(e, path) from None
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """The same OS error, naming ``path`` (what the user asked for) instead of a temporary name or nothing."""
    return OSError(e.errno, e.strerror or str(e), str(path))


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


def write_table(path: str | os.PathLike, df) -> None:
    """A data file as its name says: parquet (pyarrow) for ``.parquet``, CSV otherwise."""
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False, engine="pyarrow")
    else:
        write_csv(path, df)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it in for ``path`` on success.

    The old folder is moved aside first and removed only once the new one is in
    place, so at every moment either the old or the new complete folder exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _naming(e, path) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith(str(tmp))):  # inside tmp: name the output
            raise _naming(e, path) from None
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


OUTPUT_MARKER = ".kk-output.json"  # in every folder a command writes whole: which command made it


def claim_output_dir(path: str | os.PathLike, force: bool, command: str, sources=()) -> None:
    """The policy for a folder a command writes whole (``kk merge --out``, ``kk kernel --out``, ``kk tiny-model``).

    A missing or empty folder is free. Anything else is refused without ``--force``; with it, only a folder an
    earlier run of the same command made (its :data:`OUTPUT_MARKER` names the command) may be replaced, so a
    mistyped ``--out`` can never delete a trained run, a backbone or a parent folder of other work. ``sources``
    (the command's inputs) are never replaced, nor a folder holding them, whatever the marker says.
    """
    path = Path(path)
    refuse_inputs(path, sources)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise KKError(f"--out {path} exists and is not a folder")
    if not any(path.iterdir()):
        return
    if not force:
        raise KKError(f"{path} already exists; pass --force to replace it")
    try:
        marker = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    made_by = marker.get("command") if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None
    if made_by != command:
        by = f"made by kk {made_by}" if made_by else f"not made by kk {command} (no {OUTPUT_MARKER})"
        raise KKError(f"{path} is {by}; --force replaces only an earlier kk {command} output: choose another folder "
                      "or remove it yourself")


def refuse_inputs(path: str | os.PathLike, sources) -> None:
    """An output that is one of its command's inputs, or a folder holding one (links resolved), is refused, with
    ``--force`` too: it replaces outputs, never what the command reads."""
    target = Path(path).resolve()
    for src in filter(None, sources):
        src = Path(src).resolve()
        if target == src or target in src.parents:
            raise KKError(f"--out {path} {'is' if target == src else 'holds'} the input {src}; choose another path")


def mark_output_dir(folder: str | os.PathLike, command: str) -> None:
    """Sign a folder as ``command``'s output (call it on the temporary folder of :func:`atomic_dir`); no time
    stamp, so an output stays byte-identical from run to run."""
    write_json(Path(folder) / OUTPUT_MARKER, {"command": command})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def protect_existing(path: str | os.PathLike, force: bool, what: str, policy: str = "refuse", sources=()) -> Path | None:
    """The explicit policy for an output that already exists.

    ``policy="refuse"``: raise unless ``force``. ``policy="keep"``: keep the old file under a
    timestamped name (``name.20261127-201500.csv``) unless ``force``, so nothing is lost either
    way; returns the backup's path. The backup name is claimed with an exclusive hard link
    (``os.link`` fails if the name exists), so concurrent writers never pick the same one; call
    it under :func:`file_lock` of the output so the backup and the following rename are one step.
    """
    path = Path(path)
    refuse_inputs(path, sources)  # ``sources``: the command's inputs, never replaced
    if not path.exists() or force:
        return None
    if policy == "refuse":
        raise KKError(f"{path} already exists; pass --force to overwrite the {what}")
    if policy != "keep":
        raise ValueError(f"unknown policy {policy!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(10_000):
        backup = path.with_name(f"{path.stem}.{stamp}{f'-{n}' if n else ''}{path.suffix}")
        try:
            os.link(path, backup)
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None  # another writer moved it away first: nothing of ours to keep
        except OSError:  # no hard links on this file system: exclusive create + copy
            try:
                with open(backup, "xb") as dst, open(path, "rb") as src:
                    shutil.copyfileobj(src, dst)
            except FileExistsError:
                continue
        return backup
    raise KKError(f"{path}: no free backup name")


class LockHeld(KKError):
    pass


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, wait: float = 0.0) -> Iterator[Path]:
    """An exclusive lock on ``path`` (created if needed) for as long as the block runs.

    ``fcntl.flock``: the kernel releases it when the process dies, however it dies, so a
    stale lock cannot outlive its owner. The holder's pid is written into the file so a
    refused caller can say who holds it. ``wait``: seconds to wait for a short critical section of
    another process (a submission rename) before refusing. Where flock is missing (Windows), no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield Path(path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, held = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False
    try:
        deadline = time.monotonic() + wait
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise LockHeld(f"{what} is in use by {holder} (lock {path}); wait for it to finish") from None
            # The holder removes the file as it releases it: a lock on that removed file is no lock; take the new one.
            with contextlib.suppress(FileNotFoundError):
                held = os.path.samestat(os.fstat(fd), os.stat(path))
            if not held:
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        if held:  # removed while still held, so no lock file outlives a command (a SIGKILL's stays, harmless)
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)  # closing releases the lock


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Fail before long work when ``folder`` (or its nearest existing parent) cannot be written."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise KKError(f"{what}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise KKError(f"{what}: {probe} is not writable")


def normal_mode(path: str | os.PathLike) -> None:
    """Give a file the mode any new file gets here (0644 under the usual umask). safetensors (0.8) writes
    its files 0600, through a private temporary file that it renames, whoever calls it (transformers' and
    peft's save_pretrained included), and copies keep that mode: weights would reach Kaggle datasets and
    other users unreadable."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def safetensors_errors(path: str | os.PathLike) -> Iterator[None]:
    """safetensors' own errors (a damaged header, a full disk while writing) as one line naming ``path``
    (for a folder, the damaged file in it): an OSError when the cause is the OS (the CLI prints
    'PATH: No space left on device'), else KKError."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        import re

        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        code = re.search(r"\(os error (\d+)\)", msg)
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise KKError(f"{_damaged_file(Path(path))}: not a readable .safetensors file ({msg[:160]})") from None


def _damaged_file(path: Path) -> Path:
    """In a folder, the first .safetensors file whose header safetensors refuses; else ``path`` itself."""
    if not path.is_dir():
        return path
    from safetensors import SafetensorError, safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError):
            return f
    return path


def load_safetensors(path: str | os.PathLike) -> dict:
    """``safetensors.torch.load_file`` with its errors as one line naming the file."""
    from safetensors.torch import load_file

    with safetensors_errors(path):
        return load_file(str(path))


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file`` with the normal file mode and a full disk named as ``path``."""
    from safetensors.torch import save_file

    with safetensors_errors(path):
        save_file(tensors, str(path))
    normal_mode(path)
