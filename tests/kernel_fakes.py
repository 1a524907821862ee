"""Small helpers shared by the kernel tests (test_kernel_*.py): fold folders without training, a hand-made
artifacts dataset, and simulated CUDA for the kernel's GPU-only branches.

Fake folds are real peft adapters of the tiny test backbones with random (non-zero) LoRA and head
weights: every fold predicts differently, so a test that mixes up two folds' adapters or heads fails,
and none of them costs a training run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import tiny_config


def make_fake_run(project: Path, run_dir: Path, folds=(0, 1, 2), arch: str = "llama", seed: int = 0, *overrides: str) -> Path:
    """``run_dir/fold_K`` for each K: adapter, heads, tokenizer, config.yaml, metrics.json."""
    import torch

    from kagglekit.modeling import build_model, load_tokenizer, save_model

    cfg = tiny_config(project, "predict.batch_size=16", *overrides, arch=arch)
    tok = load_tokenizer(str(project / arch))
    for k in folds:
        torch.manual_seed(seed * 100 + k)
        model = build_model(cfg, tok, torch.device("cpu"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.normal_(0, 0.3)
        fold = run_dir / f"fold_{k}"
        save_model(model, tok, fold)
        (fold / "config.yaml").write_text(cfg.to_yaml())
        (fold / "metrics.json").write_text('{"val_log_loss": 1.0, "n_val": 1}')  # the keys a finished fold has
    return run_dir


def make_artifacts(art: Path, runs: list[tuple[str, Path, Path]], temperature: float = 1.0, only_folds=None, **manifest) -> Path:
    """An artifacts dataset as kk kernel writes it (without building a wheel): ``runs`` are (name, run
    folder, backbone folder); each backbone is copied once. ``only_folds``: package these folds only."""
    from kagglekit.kernel import FOLD_FILES, MANIFEST

    art.mkdir(parents=True, exist_ok=True)
    entries, copied = [], {}
    for name, run, backbone in runs:
        if str(backbone) not in copied:
            copied[str(backbone)] = f"backbones/{len(copied)}-{Path(backbone).name}"
            shutil.copytree(backbone, art / copied[str(backbone)])
        folds = sorted(int(d.name.split("_")[1]) for d in Path(run).glob("fold_*"))
        folds = [k for k in folds if only_folds is None or k in only_folds]
        for k in folds:
            dst = art / name / f"fold_{k}"
            dst.mkdir(parents=True)
            for f in FOLD_FILES:
                if (Path(run) / f"fold_{k}" / f).exists():
                    shutil.copy2(Path(run) / f"fold_{k}" / f, dst / f)
        entries.append({"name": name, "folds": folds, "backbone": {"path": copied[str(backbone)]}, "versions": {}})
    manifest = {"weights": [1.0] * len(entries), **{k: v for k, v in manifest.items() if v is not None}}
    (art / MANIFEST).write_text(json.dumps({"runs": entries, "temperature": temperature, "method": "mean", **manifest}))
    return art


def simulate_cuda(monkeypatch, n: int = 2, capability=(7, 5), free_bytes: int = int(14.6 * 1024**3)) -> dict:
    """Kaggle's 2 x T4 as far as the kernel asks: device count, capability, free memory, arch list; plus
    a fake ``torch.cuda.device`` context and ``empty_cache`` that record which device was current.
    Returns the record: ``{"empty_cache": [device index, ...], "empty_cache_threads": [(thread, index), ...]}``."""
    import contextlib
    import threading

    import torch

    current = threading.local()
    seen: dict = {"empty_cache": []}

    @contextlib.contextmanager
    def device(i):
        old = getattr(current, "i", 0)
        current.i = torch.device(i).index if not isinstance(i, int) else i
        try:
            yield
        finally:
            current.i = old

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (free_bytes, 15 * 1024**3))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: getattr(current, "i", 0))
    def empty_cache():
        seen["empty_cache"].append(getattr(current, "i", 0))
        seen["empty_cache_threads"].append((threading.current_thread().name, getattr(current, "i", 0)))

    seen["empty_cache_threads"] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return seen
