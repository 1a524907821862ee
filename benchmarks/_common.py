"""Shared pieces of the benchmarks: models of a real architecture (random weights), the
length distribution of real arena rows, device facts, and the RESULTS.md history."""

from __future__ import annotations

import contextlib
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


def tiny_tokenizer(workdir: Path, vocab_size: int = 8000):
    """The tokenizer of the tiny model (trained on the real rows when present): formats the real rows,
    and pads for the Hugging Face contenders."""
    from transformers import AutoTokenizer

    from kagglekit.tiny import build_tiny_model

    path = workdir / "tiny"
    if not (path / "config.json").exists():
        build_tiny_model(path, "deberta-v2", str(SHARED_TRAIN) if SHARED_TRAIN.exists() else None, vocab_size)
    return AutoTokenizer.from_pretrained(path)


def bench_sequences(data: str, max_length: int, vocab: int, workdir: Path, rows: int = 0, repeat: int = 1, seed: int = 0):
    """(token id lists, description), identical in every contender's process.

    ``real``: the shared real rows formatted by kagglekit's formatter (the tiny tokenizer, ``max_length``), in both
    A/B orders, the set repeated ``repeat`` times. ``sim``: ``rows`` x 2 orders of random ids whose lengths follow
    the real distribution (the full competition is 57,477 rows x 2 = 114,954 sequences)."""
    if data == "real" and SHARED_TRAIN.exists():
        from kagglekit.config import load_config
        from kagglekit.data import load_train
        from kagglekit.formatting import Formatter

        tok = tiny_tokenizer(workdir)
        df, _ = load_train(SHARED_TRAIN)
        fmt = Formatter.from_config(tok, load_config(None, [f"model.max_length={max_length}"]).model)
        enc = fmt.encode_rows(df)
        seqs = [s.tolist() for s in fmt.sequences(enc)[0] + fmt.sequences(enc, swap=True)[0]]
        return seqs * repeat, f"{len(df)} real rows x 2 orders x {repeat} = {len(seqs) * repeat} sequences (formatted, tiny tokenizer)"
    n = 2 * (rows or 100 * repeat)
    lengths, source = real_lengths(n, max_length, seed)
    return random_sequences(lengths, vocab, seed), f"{n} sequences, lengths {source}"


def build_model(arch: str, workdir: Path, vocab_size: int = 8000):
    """(model, pad_id, vocab) for 'tiny' (a 2-layer DeBERTa-v2 built by kagglekit, 8,000-piece vocabulary) or
    'deberta-v3-base' (the real architecture: hidden 768, 12 layers, 12 heads, vocab 128,100, relative attention;
    random weights)."""
    from transformers import AutoModelForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

    from kagglekit.modeling import quiet_libraries
    from kagglekit.task import LMSYS  # the benchmarks time LMSYS's three-class head

    quiet_libraries()
    if arch == "tiny":
        tiny_tokenizer(workdir, vocab_size)
        model = AutoModelForSequenceClassification.from_pretrained(workdir / "tiny", num_labels=LMSYS.n_classes)
        return model, model.config.pad_token_id, model.config.vocab_size
    if arch == "deberta-v3-base":
        cfg = DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
            share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
            layer_norm_eps=1e-7, num_labels=LMSYS.n_classes, pad_token_id=0,
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


def random_sequences(lengths, vocab: int, seed: int = 0) -> list:
    """Random token ids, one int32 array per length (a full-size epoch as Python lists would take gigabytes)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=int(n), dtype=np.int32) for n in lengths]


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


def median_range(xs) -> str:
    """'median (min-max)' of interleaved rounds."""
    xs = sorted(xs)
    return f"{float(np.median(xs)):.2f} ({xs[0]:.2f}-{xs[-1]:.2f})" if len(xs) > 1 else f"{xs[0]:.2f}"


def peak_memory_gib(device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device) -> None:
    """Wait for the GPU before reading a clock (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def count_host_syncs(device):
    """Count the moments the host waits for the device inside the block: yields ``count()``, the number so far.

    On a GPU: torch's own sync debug mode, which warns at every synchronizing CUDA call (``.item()``, a
    ``bool`` of a tensor, device-to-host copies...), the model's and the optimizer's included. On CPU nothing
    waits, so the reads that would wait on a GPU are counted where kagglekit's own code makes them
    (``Tensor.item``/``tolist``/``numpy``/``cpu``, a tensor's truth or float value): the training loop's syncs,
    not the model's or AdamW's (whose step counters live on the host anyway). Exact counts: a benchmark row
    without a clock."""
    import warnings
    from unittest import mock

    import torch

    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum("synchroniz" in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    n = [0]
    own = str(REPO / "kagglekit")

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            n[0] += sys._getframe(1).f_code.co_filename.startswith(own)
            return real(self, *a, **k)

        return mock.patch.object(torch.Tensor, name, wrapper)

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__"):
            stack.enter_context(counted(name))
        yield lambda: n[0]


def print_table(title: str, columns, rows) -> None:
    """One Rich table to the terminal (md_table writes the same rows for RESULTS.md)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*map(str, r))
    Console().print(table)


def timed_fit(cfg, model, seqs, labels, device, dtype, pad_id: int, work: Path, max_tokens: int = 0,
              syncs: dict | None = None):
    """kagglekit.train.fit itself on ``seqs`` (evaluation and checkpoints stubbed out: the loop's speed, not
    validation's), with ``model`` already built. Returns (session, inputs, seconds after the first optimizer
    step, samples after it): the first step is the warm-up. ``max_tokens``: token-budget micro-batches.
    ``syncs``: gets "per_step", the host syncs per optimizer step after the warm-up (see :func:`count_host_syncs`)."""
    import torch

    import kagglekit.train as train_mod
    from kagglekit.task import LMSYS

    train_mod.evaluate = lambda s, inputs, bar=None: 1.0
    train_mod.save_checkpoint = lambda s: None
    tc = cfg.train
    s = train_mod.Session(cfg, 0, work / "kk", device, dtype, type("Tok", (), {"pad_token_id": pad_id})(), None)
    s.model = s.wrapped = model
    s.max_tokens = max_tokens
    s.optimizer = torch.optim.AdamW(train_mod.param_groups(model, tc), lr=tc.lr)
    inputs = train_mod.FoldInputs(None, None, seqs, LMSYS.one_hot(labels), [[i] for i in range(len(seqs))], None, tc.batch_size)
    s.steps_per_epoch = len(train_mod.epoch_plan(s, inputs, 0))
    s.total_steps = min(s.steps_per_epoch, tc.max_steps) if tc.max_steps else s.steps_per_epoch
    s.scheduler = train_mod.lr_scheduler(s.optimizer, tc.scheduler, int(tc.warmup_ratio * s.total_steps), s.total_steps)
    s.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    s.rng = train_mod._rng_state()
    mark = {}

    with count_host_syncs(device) as count:
        def on_step(step):
            if step == 1:
                sync(device)
                mark["t0"], mark["samples"], mark["syncs"] = time.perf_counter(), s.state.samples, count()

        train_mod.fit(s, inputs, on_step=on_step)
        loop_syncs = count() - mark["syncs"]
    sync(device)
    if syncs is not None:
        syncs["per_step"] = loop_syncs / max(1, s.state.step - 1)
    return s, inputs, time.perf_counter() - mark["t0"], s.state.samples - mark["samples"]


def dump_json(obj) -> None:
    print("KKBENCH " + json.dumps(obj))


def bootstrap_ci(stat, samples, n: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(statistic, lower, upper): a percentile bootstrap interval of ``stat(*samples)``, each sample's rows resampled
    independently. For a paired comparison pass the per-row differences (``stat=np.mean``): pairing removes the
    rows' shared difficulty from the interval."""
    rng = np.random.default_rng(seed)
    samples = [np.asarray(s, dtype=np.float64) for s in samples]
    point = float(stat(*samples))
    draws = np.array([stat(*[s[rng.integers(0, len(s), len(s))] for s in samples]) for _ in range(n)])
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
