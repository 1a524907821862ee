"""Runs on the user's machine: uploads the datasets and the notebook with the official kaggle CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import KKError


def push(kernel_dir) -> None:
    """Create or version both datasets, then push the notebook, through the official kaggle CLI."""
    kernel_dir = Path(kernel_dir)
    if not (kernel_dir / "kernel" / "kernel-metadata.json").exists():
        raise KKError(f"{kernel_dir} is not a kernel built by kk kernel")
    exe = shutil.which("kaggle")
    if exe is None:
        raise KKError("the kaggle CLI is not installed (pip install kaggle) and configured (~/.kaggle/kaggle.json)")
    from ..ui import info

    def run(args):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        return proc.returncode, (proc.stdout + proc.stderr).strip()

    for ds in sorted((kernel_dir / "datasets").iterdir()):
        # --dir-mode zip: without it `kaggle datasets create` silently skips sub-folders (the fold folders).
        rc, text = run(["datasets", "create", "-p", str(ds), "--dir-mode", "zip"])
        if rc != 0 or "already exists" in text.lower():
            rc, text = run(["datasets", "version", "-p", str(ds), "-m", "kagglekit update", "--dir-mode", "zip"])
        if rc != 0:
            raise KKError(f"kaggle datasets failed for {ds.name}: {text.splitlines()[-1] if text else rc}")
        info(f"dataset {ds.name}: {text.splitlines()[-1] if text else 'ok'}")
    rc, text = run(["kernels", "push", "-p", str(kernel_dir / "kernel")])
    if rc != 0:
        raise KKError(f"kaggle kernels push failed: {text.splitlines()[-1] if text else rc}")
    info(text)
