"""A Gemma-2-9B-architecture classifier (random weights) through kagglekit's own QLoRA path: training steps
and inference throughput, peak memory, padded vs packed (train.packing) training.

The model is written once in bf16 (hidden 3584, 42 layers, 16 heads / 8 KV heads, head_dim 256,
intermediate 14336, vocab 256,000; `--layers` and `--scale` shrink it for a CPU smoke run), then loaded
exactly as `kk train` loads a backbone (kagglekit.modeling.build_model: 4-bit NF4 by bitsandbytes, LoRA
r on every projection, the score head trained). Training runs kagglekit.train.fit (evaluation stubbed)
on sequences whose lengths follow the real distribution, cut at --max-length.

    python benchmarks/bench_llm.py --record                                   # on the GPU (needs bitsandbytes)
    python benchmarks/bench_llm.py --layers 2 --scale 64 --quantization none --steps 2 --max-length 64  # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import device_info, md_table, peak_memory_gib, print_table, random_sequences, real_lengths, record, sync, timed_fit

GEMMA2_9B = dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256, vocab_size=256000, sliding_window=4096, max_position_embeddings=8192)


def write_model(path: Path, layers: int, scale: int, device) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import Gemma2Config, Gemma2ForSequenceClassification, PreTrainedTokenizerFast

    from kagglekit.task import LMSYS

    dims = dict(GEMMA2_9B, num_hidden_layers=layers)
    if scale > 1:  # a toy of the same shape for CPU smoke runs
        dims.update(hidden_size=3584 // scale * 2, intermediate_size=14336 // scale, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=3584 // scale, vocab_size=2048)
    cfg = Gemma2Config(**dims, num_labels=LMSYS.n_classes, pad_token_id=0)  # eager attention: Gemma-2 soft-caps its scores
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: a 9B model never exists in fp32
    try:
        with torch.device(device):
            model = Gemma2ForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    del model
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, dims["vocab_size"])}}  # one name per id: pad is id 0
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), pad_token="<pad>")
    tok.save_pretrained(path)
    return path


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--scale", type=int, default=1, help="shrink width by this factor (CPU smoke)")
    ap.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps (after one warm-up step)")
    ap.add_argument("--infer-rows", type=int, default=64)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from kagglekit.config import load_config
    from kagglekit.inference import infer_logits
    from kagglekit.modeling import build_model, device_and_dtype, load_tokenizer, quiet_libraries

    quiet_libraries()
    device, dtype = device_and_dtype("auto")
    kind, name, peak = device_info()
    work = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    path = write_model(work / "gemma2", args.layers, args.scale, device)
    t_write = time.perf_counter() - t
    vocab = 2048 if args.scale > 1 else GEMMA2_9B["vocab_size"]  # what write_model gave the model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for packing in (False, True):
        cfg = load_config(None, [f"model.backbone={path}", f"model.quantization={args.quantization}", f"model.max_length={args.max_length}",
                                 "model.gradient_checkpointing=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
                                 f"train.batch_size={args.batch_size}", "train.grad_accum=1", "train.epochs=1",
                                 f"train.max_steps={args.steps + 1}", "train.checkpoint_minutes=0", "train.patience=0",
                                 "train.swap_augment=false", "train.lr=1e-4", f"train.packing={str(packing).lower()}"])
        tok = load_tokenizer(str(path))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = build_model(cfg, tok, device, dtype)
        t_load = time.perf_counter() - t
        n = args.batch_size * (args.steps + 2)
        lengths, source = real_lengths(n, args.max_length, seed=3)
        labels = np.random.default_rng(0).integers(0, 3, n)
        _, _, wall, samples = timed_fit(cfg, model, random_sequences(lengths, vocab, seed=3), labels, device, dtype,
                                        tok.pad_token_id, work)
        train_sps = samples / wall
        train_peak = peak_memory_gib(device)
        infer_sps = float("nan")
        if not packing:
            iseqs = random_sequences(real_lengths(args.infer_rows, args.max_length, seed=4)[0], vocab, seed=4)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            infer_logits(model, iseqs, tok.pad_token_id, 8, device, dtype, max_tokens="auto")
            sync(device)
            infer_sps = len(iseqs) / (time.perf_counter() - t)
        rows.append(["packed" if packing else "padded", f"{train_sps:.2f}", f"{train_peak:.1f}",
                     f"{infer_sps:.1f}" if infer_sps == infer_sps else "-", f"{t_load:.0f}"])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    setting = (f"Gemma-2-9B architecture{' (' + str(args.layers) + ' layers, width /' + str(args.scale) + ')' if args.scale > 1 or args.layers != 42 else ''}, "
               f"random weights, {args.quantization} + LoRA r16, grad ckpt, batch {args.batch_size}, max_length {args.max_length}, "
               f"lengths {source}; model written in {t_write:.0f} s")
    cols = ["training", "train samples/s", "peak GiB (train)", "inference seq/s (max_tokens auto)", "load s"]
    print_table(f"{setting}\n{name}", cols, rows)
    line = f"packed/padded training samples/s = {float(rows[1][1]) / max(float(rows[0][1]), 1e-9):.2f}x"
    print(line)
    if args.record:
        record("bench_llm", "python benchmarks/bench_llm.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"rows": rows}


if __name__ == "__main__":
    main()
