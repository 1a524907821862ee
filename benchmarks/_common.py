"""Shared pieces of the benchmarks: models of a real architecture (random weights), the
length distribution of real arena rows, device facts, and the RESULTS.md history."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_TRAIN = REPO.parent / "shared" / "data" / "arena" / "train_sample.csv"
sys.path.insert(0, str(REPO))

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; CPU has no agreed peak: pass --peak-tflops.
GPU_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "P100": 18.7, "V100": 125.0}


def device_info():
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        return "cuda", name, peak
    return "cpu", f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})", None


def build_model(arch: str, workdir: Path, vocab_size: int = 1000):
    """(model, pad_id, vocab) for 'tiny' (a 2-layer DeBERTa-v2 built by kagglekit) or 'deberta-v3-base'
    (the real architecture: hidden 768, 12 layers, 12 heads, vocab 128,100, relative attention; random weights)."""
    from transformers import AutoModelForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

    from kagglekit.modeling import quiet_libraries

    quiet_libraries()
    if arch == "tiny":
        from kagglekit.tiny import build_tiny_model

        path = build_tiny_model(workdir / "tiny", "deberta-v2", str(SHARED_TRAIN) if SHARED_TRAIN.exists() else None, vocab_size)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        return model, model.config.pad_token_id, model.config.vocab_size
    if arch == "deberta-v3-base":
        cfg = DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
            share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
            layer_norm_eps=1e-7, num_labels=3, pad_token_id=0,
        )
        return DebertaV2ForSequenceClassification(cfg), 0, cfg.vocab_size
    raise SystemExit(f"--arch must be tiny or deberta-v3-base (got {arch})")


def real_lengths(n: int, max_length: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Token lengths of real rows (train_sample.csv, ~4 characters a token, cut at max_length) resampled to n,
    or a synthetic distribution with the same quantiles when the file is absent."""
    rng = np.random.default_rng(seed)
    if SHARED_TRAIN.exists():
        import pandas as pd

        df = pd.read_csv(SHARED_TRAIN, dtype=str, keep_default_na=False)
        chars = sum(df[c].str.len() for c in ("prompt", "response_a", "response_b")).to_numpy()
        tokens = np.minimum(chars // 4 + 12, max_length)
        return rng.choice(tokens, size=n, replace=True), "real (train_sample.csv, chars/4)"
    # Quantiles of the same file, measured once: p10 190, p50 620, p90 1550, max 8600 tokens.
    q = rng.lognormal(np.log(620), 0.85, size=n)
    return np.clip(q, 24, max_length).astype(int), "synthetic (lognormal with the real quantiles)"


def random_sequences(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=int(n)).tolist() for n in lengths]


def record(title: str, command: str, device: str, table_md: str, ratio_line: str) -> None:
    path = HERE / "RESULTS.md"
    entry = f"\n### {title}: {time.strftime('%Y-%m-%d %H:%M')} on {device}\n\n`{command}`\n\n{table_md}\n\n**{ratio_line}**\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(entry)


def md_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def dump_json(obj) -> None:
    print("KKBENCH " + json.dumps(obj))
