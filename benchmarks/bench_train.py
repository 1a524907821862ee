"""Training speed and memory, naive vs kagglekit, side by side:

  naive:     shuffled rows, every sequence padded to max_length
  kagglekit: length-grouped micro-batches (kagglekit.train.plan_batches), dynamic padding

Both run the same model (LoRA via kagglekit.modeling.build_model) and the same step: forward,
cross-entropy, backward, AdamW. Each mode runs in its own process so peak memory is its own.

Model FLOPs per sample (stated formula): 2*N*T forward for the N non-embedding weights over T tokens,
plus attention 2*2*L*T^2*d forward, times 3 (DeBERTa's disentangled attention: content + c2p + p2c);
backward costs 2x forward for full fine-tuning, 1x for LoRA (no weight gradients of frozen layers):
  FLOPs = (1 + b) * (2*N*T + 12*L*d*T^2),  b = 1 (LoRA) or 2 (full)
MFU = achieved FLOPs/s / device peak (H100/H200 bf16 dense: 989 TFLOP/s; CPU: pass --peak-tflops).

    python benchmarks/bench_train.py --steps 3                           # tiny model on CPU
    python benchmarks/bench_train.py --arch deberta-v3-base --max-length 1280 --batch-size 16 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import build_model, device_info, dump_json, md_table, random_sequences, real_lengths, record


def flops_per_sample(model, tokens: float, tokens_sq: float, lora: bool) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name and "lora_" not in name)
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * tokens_sq
    return (1 + (1 if lora else 2)) * (2 * n * tokens + attn)


def child(args) -> dict:
    """One mode in this process: returns samples/s, tokens/s, FLOPs/sample, peak memory."""
    import resource

    import numpy as np
    import torch
    import torch.nn.functional as F

    from kagglekit.config import load_config
    from kagglekit.inference import pad_batch
    from kagglekit.modeling import device_and_dtype
    from kagglekit.train import plan_batches

    torch.manual_seed(0)
    device, dtype = device_and_dtype(args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        base, pad_id, vocab = build_model(args.arch, Path(tmp))
    cfg = load_config(None, [f"lora.r={args.lora_r}", f"lora.enabled={str(not args.full).lower()}",
                             f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}"])
    base.to(device)
    if args.grad_ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.full:
        model = base
    else:
        from peft import LoraConfig, TaskType, get_peft_model

        from kagglekit.modeling import head_modules, lora_targets

        model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 target_modules=lora_targets(base, cfg.lora), modules_to_save=head_modules(base)))
    model.train()
    n_rows = args.batch_size * (args.steps + 1)
    lengths, source = real_lengths(n_rows, args.max_length, seed=1)
    seqs = random_sequences(lengths, vocab, seed=1)
    labels = torch.tensor(np.random.default_rng(0).integers(0, 3, n_rows))
    if args.mode == "naive":
        order = np.random.default_rng(0).permutation(n_rows)
        batches = [order[i:i + args.batch_size].tolist() for i in range(0, n_rows, args.batch_size)]
        pad_to = args.max_length
    else:
        batches = plan_batches(list(lengths), [[i] for i in range(n_rows)], args.batch_size, 0, 0)
        pad_to = None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(b):
        ids, mask = pad_batch([seqs[i] for i in b], pad_id, pad_to)
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels[b].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum()), ids.shape[1]

    step(batches[0])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    samples = real_tokens = 0
    flops = 0.0
    for b in batches[1:args.steps + 1]:
        toks, width = step(b)
        samples += len(b)
        real_tokens += toks
        # FLOPs the model actually computes on the padded batch (padding is work too).
        flops += len(b) * flops_per_sample(model, width, width * width, not args.full)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    useful = sum(flops_per_sample(model, len(seqs[i]), len(seqs[i]) ** 2, not args.full) for b in batches[1:args.steps + 1] for i in b)
    return {"mode": args.mode, "samples_s": samples / wall, "tokens_s": real_tokens / wall, "peak_gib": peak,
            "flops_s": flops / wall, "useful_flops_s": useful / wall, "flops_per_sample": useful / samples, "source": source}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "deberta-v3-base"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--mode", choices=["naive", "kagglekit"], help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.mode:  # child process
        dump_json(child(args))
        return {}

    from rich.console import Console
    from rich.table import Table

    kind, name, peak = device_info()
    peak = args.peak_tflops or peak
    res = {}
    base_cmd = [sys.executable, str(Path(__file__).resolve())] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--record"]
    for mode in ("naive", "kagglekit"):
        proc = subprocess.run(base_cmd + ["--mode", mode], capture_output=True, text=True, env=dict(os.environ, KK_QUIET="1"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("KKBENCH ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        res[mode] = json.loads(line[-1][len("KKBENCH "):])
    rows = []
    for mode, r in res.items():
        mfu = f"{100 * r['useful_flops_s'] / (peak * 1e12):.1f}%" if peak else "n/a"
        rows.append([mode, f"{r['samples_s']:.2f}", f"{r['tokens_s']:.0f}", f"{r['flops_per_sample'] / 1e9:.1f}",
                     f"{r['useful_flops_s'] / 1e12:.3f}", mfu, f"{r['peak_gib']:.2f}"])
    setting = (f"{args.arch}, {'full' if args.full else f'LoRA r={args.lora_r}'}, batch {args.batch_size}, max_length {args.max_length}, "
               f"{args.precision}{', grad ckpt' if args.grad_ckpt else ''}, {args.steps} steps, lengths: {res['naive']['source']}")
    table = Table(title=f"training: {setting}\n{name}")
    cols = ["mode", "samples/s", "real tokens/s", "GFLOPs/sample", "useful TFLOP/s", "MFU", f"peak {'GPU' if kind == 'cuda' else 'RSS'} GiB"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    ratio = res["kagglekit"]["samples_s"] / res["naive"]["samples_s"]
    line = f"ratio: kagglekit/naive samples/s = {ratio:.2f}x; peak memory kagglekit/naive = {res['kagglekit']['peak_gib'] / res['naive']['peak_gib']:.2f}x"
    print(line)
    if args.record:
        record("bench_train", "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]), name,
               f"{setting}\n\n" + md_table(cols, rows), line)
    return {"ratio": ratio, **res}


if __name__ == "__main__":
    main()
