"""train.strategy: FSDP2 on 2 gloo processes (CPU), DeepSpeed by simulation, the memory plan, the presets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


# --- DeepSpeed, by simulation: it cannot run here ------------------------------------------------------------------


class FakeEngine:
    """What kagglekit's loop calls on DeepSpeed's engine, done the plain way on the CPU, and recorded."""

    def __init__(self, model, optimizer, calls):
        self.module, self.optimizer, self.calls = model, optimizer, calls

    def __call__(self, **kw):
        return self.module(**kw)

    def set_gradient_accumulation_boundary(self, flag):
        self.calls.append(("boundary", flag))

    def backward(self, loss, scale_wrt_gas=True):
        self.calls.append(("backward", scale_wrt_gas))
        loss.backward()

    def step(self):
        self.calls.append(("step",))
        self.optimizer.step()
        self.optimizer.zero_grad()

    def zero_optimization_stage(self):
        return 2

    def save_checkpoint(self, folder, tag):
        self.calls.append(("save", tag))
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    import types

    calls, received = [], []

    def initialize(**kwargs):
        received.append(kwargs)
        return FakeEngine(kwargs["model"], kwargs["optimizer"], calls), kwargs["optimizer"], None, None

    import importlib.machinery

    fake = types.ModuleType("deepspeed")  # with a spec and an engine class: accelerate looks for both when it is importable
    fake.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    fake.initialize, fake.DeepSpeedEngine = initialize, FakeEngine
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    yield received, calls
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_deepspeed_receives_the_json_and_kagglekits_batching(fake_deepspeed, tiny_project, tmp_path):
    received, calls = fake_deepspeed
    from kagglekit.train import train_fold

    cfg = tiny_config(tiny_project, "train.strategy=deepspeed", "train.deepspeed=zero3", "train.grad_accum=2",
                      "train.max_steps=2", "train.eval_every=2", "train.max_grad_norm=0.5", "lora.enabled=false", arch="llama")
    m = train_fold(cfg, 0, tmp_path / "run")
    (kw,) = received
    conf = kw["config"]
    assert conf["zero_optimization"]["stage"] == 3 and "_comment" not in conf
    assert conf["train_micro_batch_size_per_gpu"] == 16 and conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"] == {"enabled": False} and conf["fp16"] == {"enabled": False}
    assert type(kw["model"]).__name__.endswith("ForSequenceClassification") and type(kw["optimizer"]).__name__ == "AdamW"
    # kagglekit accumulates: its loss is already per step (no division by the accumulation steps), the boundary is the
    # step's last micro-batch, and the engine steps once per optimizer step
    assert {c for c in calls if c[0] == "backward"} == {("backward", False)}
    assert [c[1] for c in calls if c[0] == "boundary"] == [False, True, False, True]
    assert sum(c[0] == "step" for c in calls) == m["steps"] == 2
    assert ("save", "sharded-a") in calls and (tmp_path / "run/fold_0/model.safetensors").exists()


def test_fsdp_refuses_quantized_weights(fake_deepspeed, tiny_project, tmp_path):
    from kagglekit.errors import KKError
    from kagglekit.train import train_fold

    cfg = tiny_config(tiny_project, "train.strategy=fsdp", "model.quantization=4bit", arch="llama")
    with pytest.raises(KKError, match="fsdp trains unquantized weights in bf16 or fp32, not 4bit: use train.strategy=deepspeed"):
        train_fold(cfg, 0, tmp_path / "run")


def test_deepspeed_or_fsdp_refused_in_one_line(tiny_project, monkeypatch):
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--set", "train.strategy=fsdp")
    assert r.exit_code == 1 and "runs under a launcher: torchrun" in r.stderr and "Traceback" not in r.output
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--set", "train.strategy=deepspeed")
    assert r.exit_code == 1 and "needs DeepSpeed on GPUs (pip install deepspeed)" in r.stderr


# --- the plan: meta device, no weights read --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma9b_like(tmp_path_factory):
    """A Gemma-2-9B-sized decoder config (no weights at all: the plan never reads them), tokenizer borrowed."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("big")
    LlamaConfig(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, vocab_size=256000).save_pretrained(d)
    return d


def _plan(project, backbone, *args):
    return run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--train", project / "train.csv",
                   "--folds", project / "folds.csv", "--set", f"model.backbone={backbone}", "--plan", *args)


def test_plan_names_the_knob_and_fits_with_it(tiny_project, gemma9b_like):
    full = ["--set", "lora.enabled=false", "--set", "model.max_length=4096", "--set", "train.batch_size=1"]
    r = _plan(tiny_project, gemma9b_like, "--gpus", "1", "--gpu-gib", "80", *full)
    assert r.exit_code == 1 and "does not fit" in r.stderr and "with train.strategy=fsdp" in r.stderr, r.output
    assert "optimizer state" in r.stdout and "9." in r.stdout  # the table: 9.x B parameters
    r = _plan(tiny_project, gemma9b_like, "--gpus", "4", "--gpu-gib", "80", *full, "--set", "train.strategy=fsdp",
              "--set", "model.gradient_checkpointing=true")
    assert r.exit_code == 0 and "fits" in r.stdout, r.output
    # a LoRA over fp32 weights on one 15 GiB GPU: 4-bit is the knob
    r = _plan(tiny_project, gemma9b_like, "--gpu-gib", "15", "--set", "model.max_length=1024", "--set", "train.batch_size=1",
              "--set", "model.gradient_checkpointing=true")
    assert r.exit_code == 1 and "model.quantization=4bit" in r.stderr, r.output


def test_train_checks_the_plan_before_loading_onto_a_gpu(tiny_project, tmp_path):
    import peft.utils.constants  # noqa: F401  imported before CUDA is simulated (bitsandbytes probes the real one)
    from cudasim import simulated_cuda, spy
    from transformers import AutoModelForSequenceClassification

    from kagglekit.memory import OutOfMemory
    from kagglekit.train import train_fold

    cfg = tiny_config(tiny_project, "lora.enabled=false", arch="llama")
    with simulated_cuda(total_gib=0.001), spy(AutoModelForSequenceClassification, "from_pretrained") as loads, \
            pytest.raises(OutOfMemory, match=r"needs about .* GiB per GPU at one row of 96 tokens, more than 90% of 0.001 GiB; fits with: .*kk train --plan"):
        train_fold(cfg, 0, tmp_path / "run")
    assert loads == []  # refused before any weight was read


@pytest.mark.parametrize("name", ["gemma2-9b-fsdp-full", "qwen25-14b-zero3-full", "llama31-70b-qlora-teacher"])
def test_presets_load_through_the_validator(name):
    from kagglekit.config import load_config
    from kagglekit.train import deepspeed_json

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name and cfg.train.strategy in ("fsdp", "deepspeed")
    assert (cfg.lora.enabled and cfg.model.quantization == "4bit") or not cfg.lora.enabled
    if cfg.train.strategy == "deepspeed":
        assert deepspeed_json(cfg.train.deepspeed)[1]["zero_optimization"]["stage"] in (2, 3)
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert text.count("# ") > 20  # each value's source in a comment
