"""train.strategy: FSDP2 on 2 gloo processes (CPU), DeepSpeed by simulation, the memory plan, the presets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config

FULL = ["lora.enabled=false", "train.lr=1e-3", "train.batch_size=16", "train.eval_every=2", "train.max_steps=6",
        "train.checkpoint_minutes=0", "model.max_length=64"]


def _torchrun(project, run, nproc: int, *sets: str, args=(), wait: bool = True):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "kagglekit.cli", "--", "train", "--fold", "1",
           "--config", str(REPO / "configs/tiny.yaml"), "--train", str(project / "train.csv"),
           "--folds", str(project / "folds.csv"), "--run", str(run), "--set", f"model.backbone={project / 'llama'}",
           *[a for s in sets for a in ("--set", s)], *args]
    env = {**os.environ, "KK_QUIET": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def test_fsdp_full_finetune_matches_one_process(tiny_project, tmp_path):
    """2 FSDP processes x grad_accum 1 = 1 process x grad_accum 2 (the same 32 sequences a step): the same val log loss
    within 0.05, and the same fold folder: one ordinary model folder gathered on rank 0, no checkpoint left."""
    from safetensors import safe_open

    from kagglekit.train import train_fold

    one = train_fold(tiny_config(tiny_project, *FULL, "train.grad_accum=2", arch="llama"), 1, tmp_path / "one")
    r = _torchrun(tiny_project, tmp_path / "fsdp", 2, *FULL, "train.grad_accum=1", "train.strategy=fsdp")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a, b = tmp_path / "one/fold_1", tmp_path / "fsdp/fold_1"
    m = json.loads((b / "metrics.json").read_text())
    assert m["steps"] == one["steps"] == 6
    assert abs(m["val_log_loss"] - one["val_log_loss"]) < 0.05, (m["val_log_loss"], one["val_log_loss"])
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    keys = []
    for d in (a, b):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys.append({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert keys[0] == keys[1]  # whole tensors, under the model's own names
    assert pd.read_csv(b / "oof.csv")["id"].tolist() == pd.read_csv(a / "oof.csv")["id"].tolist()


def test_fsdp_resumes_exactly_after_sigterm(tiny_project, tmp_path):
    """SIGTERM to torchrun mid-run: every rank stops at the end of the same step and writes its shard; --resume on 2
    processes ends exactly where the uninterrupted run does; on 1 process it is refused in one line."""
    sets = [*FULL, "train.max_steps=10", "train.strategy=fsdp", "train.grad_accum=1"]
    full = _torchrun(tiny_project, tmp_path / "full", 2, *sets)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    p = _torchrun(tiny_project, tmp_path / "cut", 2, *sets, wait=False)
    state = tmp_path / "cut/fold_1/checkpoint/state.pt"
    deadline = time.time() + 600
    while not state.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0 and "checkpoint saved" in out, out[-3000:]
    assert not (tmp_path / "cut/fold_1/metrics.json").exists()
    shards = [d.name for d in state.parent.iterdir() if d.name.startswith("sharded-")]
    assert len(shards) == 1  # the previous one went once state.pt named the new one
    other = _torchrun(tiny_project, tmp_path / "cut", 1, *sets, args=["--resume"])
    assert other.returncode != 0 and "saved by 2 processes, resumed by 1" in other.stdout + other.stderr
    resumed = _torchrun(tiny_project, tmp_path / "cut", 2, *sets, args=["--resume"])
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    a, b = tmp_path / "full/fold_1", tmp_path / "cut/fold_1"
    assert pd.read_csv(b / "train_log.csv")["step"].tolist() == list(range(1, 11))  # no step repeated or lost
    assert (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes()
    assert not (b / "checkpoint").exists()
