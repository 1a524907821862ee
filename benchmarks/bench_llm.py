"""A Gemma-2-9B-architecture classifier (random weights) through kagglekit's own QLoRA path: training steps
and inference throughput, peak memory, padded vs packed (train.packing) training.

The model is written once in bf16 (hidden 3584, 42 layers, 16 heads / 8 KV heads, head_dim 256,
intermediate 14336, vocab 256,000; `--layers` and `--scale` shrink it for a CPU smoke run), then loaded
exactly as `kk train` loads a backbone (kagglekit.modeling.build_model: 4-bit NF4 by bitsandbytes, LoRA
r on every projection, the score head trained). Training runs kagglekit.train.fit (evaluation stubbed)
on sequences whose lengths follow the real distribution, cut at --max-length.

    python benchmarks/bench_llm.py --record                                   # on the GPU (needs bitsandbytes)
    python benchmarks/bench_llm.py --layers 2 --scale 64 --quantization none --steps 2 --max-length 64  # CPU smoke

``--preset configs/gemma2-9b-qlora.yaml`` runs the preset itself instead: its LoRA, batches (token budget),
learning rates and lengths on the same random-weight architecture (or ``--backbone`` with real weights), training
at the preset's quantization (4-bit), then the trained adapter saved as a fold and loaded back the way
``kk predict --set predict.quantization=8bit`` loads it, predicting at ``predict.max_length``; tokens/s and peak
memory of both:

    python benchmarks/bench_llm.py --preset configs/gemma2-9b-qlora.yaml --predict-quantization 8bit --steps 4 --record
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
    ap.add_argument("--preset", help="a Gemma-2 preset (configs/gemma2-9b-qlora.yaml): train it, then predict at --predict-quantization")
    ap.add_argument("--predict-quantization", default="8bit", choices=["4bit", "8bit", "none"],
                    help="with --preset: predict.quantization of the prediction (default 8bit)")
    ap.add_argument("--predict-max-length", type=int, default=0, help="with --preset: predict.max_length (default: the preset's)")
    ap.add_argument("--backbone", help="with --preset: real Gemma-2 weights to use instead of random ones")
    args = ap.parse_args(argv)
    if args.preset:
        return run_preset(args, argv)

    import numpy as np
    import torch

    from kagglekit.config import load_config
    from kagglekit.engine import infer_logits
    from kagglekit.errors import KKError
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
        try:
            model = build_model(cfg, tok, device, dtype)
        except KKError as e:  # packing on a GPU without flash-attention-2 is refused: say so in the table
            rows.append(["packed" if packing else "padded", f"refused: {str(e).split(':')[0]}", "-", "-", "-"])
            continue
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
    try:
        line = f"packed/padded training samples/s = {float(rows[1][1]) / max(float(rows[0][1]), 1e-9):.2f}x"
    except ValueError:
        line = "packed/padded training samples/s: not measured (packing needs flash-attention-2 on a GPU)"
    print(line)
    if args.record:
        record("bench_llm", "python benchmarks/bench_llm.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"rows": rows}


def run_preset(args, argv) -> dict:
    """The preset trained a few steps at its quantization, then predicting at another (issue 20): tokens/s, peak memory."""
    import numpy as np
    import torch

    from kagglekit.config import load_config
    from kagglekit.engine import infer_logits
    from kagglekit.io import write_text
    from kagglekit.modeling import build_model, device_and_dtype, load_tokenizer, quiet_libraries, save_model
    from kagglekit.predict import FoldModel

    quiet_libraries()
    preset = load_config(args.preset)
    if "gemma-2" not in preset.model.backbone.lower() and not args.backbone:
        sys.exit(f"--preset {args.preset}: bench_llm builds the Gemma-2 architecture; {preset.model.backbone} is not one")
    device, dtype = device_and_dtype(preset.model.precision)
    _, name, _ = device_info()
    work = Path(tempfile.mkdtemp())
    if args.backbone:
        path, weights = Path(args.backbone), "real weights"
    else:
        path, weights = write_model(work / "gemma2", args.layers, args.scale, device), "random weights"
    vocab = load_tokenizer(str(path)).vocab_size if args.backbone else (2048 if args.scale > 1 else GEMMA2_9B["vocab_size"])
    quant = args.quantization
    sets = [f"model.backbone={path}", f"model.quantization={quant}", f"train.max_steps={args.steps + 1}",
            "train.checkpoint_minutes=0", "train.patience=0", f"predict.quantization={args.predict_quantization}"]
    if args.max_length != 1280 or args.scale > 1:  # --max-length given (or a CPU smoke): shorter sequences than the preset's
        sets += [f"model.max_length={args.max_length}", f"train.max_tokens={4 * args.max_length}"]
    if args.scale > 1:  # a width-scaled model has layers narrower than the preset's rank (kk refuses r > a layer's side)
        sets.append(f"lora.r={min(preset.lora.r, 8)}")
    if args.predict_max_length:
        sets.append(f"predict.max_length={args.predict_max_length}")
    cfg = load_config(args.preset, sets)
    train_len, predict_len = cfg.model.max_length, cfg.inference_model().max_length
    budget = cfg.train.max_tokens if isinstance(cfg.train.max_tokens, int) else 0
    tok = load_tokenizer(str(path))
    rows = []

    # 1. training: the preset's model (LoRA r, alpha, targets; gradient checkpointing; heads at head_lr) and loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, tok, device, dtype)
    n = cfg.train.batch_size * cfg.train.grad_accum * (args.steps + 2) * 4  # enough rows for the steps under the budget
    lengths, source = real_lengths(n, train_len, seed=3)
    labels = np.random.default_rng(0).integers(0, 3, n)
    _, _, wall, samples = timed_fit(cfg, model, random_sequences(lengths, vocab, seed=3), labels, device, dtype,
                                    tok.pad_token_id, work, max_tokens=budget)
    mean_len = float(np.mean(lengths))
    rows.append([f"train ({quant}, max_length {train_len})", f"{samples / wall * mean_len:.0f}", f"{samples / wall:.2f}",
                 f"{peak_memory_gib(device):.1f}"])

    # 2. the adapter as a fold, loaded back at the prediction's settings (kk predict --set predict.quantization=...)
    fold = work / "run" / "fold_0"
    save_model(model, tok, fold)
    write_text(fold / "config.yaml", load_config(args.preset, [s for s in sets if not s.startswith("predict.quantization")]).to_yaml())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fm = FoldModel(fold, overrides=[f"predict.quantization={args.predict_quantization}"])
    iseqs = random_sequences(real_lengths(args.infer_rows, predict_len, seed=4)[0], vocab, seed=4)
    t = time.perf_counter()
    logits = infer_logits(fm.model, iseqs, tok.pad_token_id, cfg.predict.batch_size, fm.device, fm.dtype,
                          max_tokens=cfg.predict.max_tokens)
    sync(fm.device)
    secs = time.perf_counter() - t
    assert np.isfinite(logits).all(), "non-finite logits at prediction"
    tokens = sum(len(x) for x in iseqs)
    rows.append([f"predict ({args.predict_quantization}, max_length {predict_len})", f"{tokens / secs:.0f}",
                 f"{len(iseqs) / secs:.2f}", f"{peak_memory_gib(fm.device):.1f}"])
    shape = (f"Gemma-2-9B architecture{' (' + str(args.layers) + ' layers, width /' + str(args.scale) + ')' if args.scale > 1 or args.layers != 42 else ''}"
             if not args.backbone else str(path))
    setting = (f"preset {cfg.name} ({args.preset}): {shape}, {weights}, LoRA r{cfg.lora.r}/alpha {cfg.lora.alpha:g} on "
               f"{len(cfg.lora.target_modules or [])} projections, grad ckpt {cfg.model.gradient_checkpointing}, batch "
               f"{cfg.train.batch_size} x accum {cfg.train.grad_accum}, train.max_tokens {budget}, lengths {source}")
    cols = ["step", "tokens/s", "sequences/s", "peak GiB"]
    print_table(f"{setting}\n{name}", cols, rows)
    line = (f"preset {cfg.name}: training {rows[0][1]} tokens/s at {quant} (peak {rows[0][3]} GiB), "
            f"prediction {rows[1][1]} tokens/s at {args.predict_quantization} (peak {rows[1][3]} GiB)")
    print(line)
    if args.record:
        record("bench_llm --preset", "python benchmarks/bench_llm.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"rows": rows}


if __name__ == "__main__":
    main()
