"""Inference throughput of one backbone loaded in fp16, 8-bit and 4-bit (bitsandbytes) and GPTQ 8-bit (kk quantize's
compressed-tensors format: through the HF engine, and through vLLM beside vLLM fp16 when vllm is installed), the way the Kaggle
kernel loads it (kagglekit.modeling.load_backbone) and predicts (kagglekit.engine.infer_logits,
length-sorted batches, fp16 autocast): the measured ratios beside the factors the kernel's time estimate
uses (kagglekit.kernel.plan.THROUGHPUT), and the fp16 utilisation of the GPU's peak beside
T4_FP16_UTILISATION. On a T4 this checks the estimate's numbers directly; on another GPU the ratios
still show whether quantized prefill is as slow as the table says.

The model is a Gemma-2-9B architecture (random weights) with ``--layers`` of its 42 layers (full width:
the matmuls have the real shapes); rows follow the real length distribution, cut at ``--max-length``.

    python benchmarks/bench_quant.py --record                 # on a GPU with bitsandbytes (gpu_check.sh runs it)
    python benchmarks/bench_quant.py --smoke                  # CPU: a toy width, fp32 only, the quantized rows skipped
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import device_info, md_table, print_table, random_sequences, real_lengths, record, sync


def write_gptq8(src: Path, dst: Path, group: int) -> Path:
    """``src`` in kk quantize's 8-bit format, rounded to nearest (the format's speed is timed, not GPTQ's accuracy)."""
    import shutil

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(src), dtype=torch.float16)
    scheme = preset_name_to_scheme("W8A16", ["Linear"])
    scheme.weights.group_size = group
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, quantization_status="frozen",
                                                        ignore=["score"]), show_progress=False)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            m.weight_scale.data = (m.weight.data.float().reshape(m.out_features, -1, group).abs().amax(-1) / 127.5).to(m.weight_scale.dtype)
    (comp := ModelCompressor.from_pretrained_model(model, "pack-quantized")).compress_model(model)
    model.save_pretrained(dst)
    comp.update_config(str(dst))
    for f in src.glob("tokenizer*"):
        shutil.copy2(f, dst / f.name)
    return dst


def time_vllm(path: Path, seqs, max_length: int) -> float:
    """Seconds vLLM's classify runner (kagglekit.vllm_engine's settings) takes over ``seqs`` after a warm-up."""
    import vllm

    llm = vllm.LLM(model=str(path), runner="pooling", convert="classify", dtype="half", enable_prefix_caching=True,
                   enforce_eager=True, max_model_len=max_length + 8, gpu_memory_utilization=0.45)
    prompts = [{"prompt_token_ids": [int(t) for t in s]} for s in sorted(seqs, key=len)]
    llm.classify(prompts[:8], use_tqdm=False)
    t = time.perf_counter()
    llm.classify(prompts, use_tqdm=False)
    seconds = time.perf_counter() - t
    del llm
    return seconds


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="Gemma-2-9B layers to keep (full width)")
    ap.add_argument("--rows", type=int, default=256, help="sequences timed per precision (after a warm-up batch)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true", help="CPU toy run: width /64, 2 layers, 8 rows of 64 tokens")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.rows, args.max_length = 2, 8, 64

    import numpy as np
    import torch
    from bench_llm import GEMMA2_9B, write_model

    from kagglekit.config import load_config
    from kagglekit.engine import infer_logits
    from kagglekit.kernel.plan import T4_FP16_UTILISATION, THROUGHPUT, meta_model
    from kagglekit.modeling import device_and_dtype, load_backbone, load_tokenizer, quiet_libraries

    quiet_libraries()
    device, dtype = device_and_dtype("auto")
    kind, name, peak = device_info()
    scale = 64 if args.smoke else 1
    work = Path(tempfile.mkdtemp())
    path = write_model(work / "gemma2", args.layers, scale, device)
    vocab = 2048 if scale > 1 else GEMMA2_9B["vocab_size"]
    hidden = 3584 // scale * 2 if scale > 1 else 3584
    lengths, source = real_lengths(args.rows, args.max_length, seed=5)
    seqs = random_sequences(lengths, vocab, seed=5)
    warm = random_sequences(real_lengths(8, args.max_length, seed=6)[0], vocab, seed=6)
    tok = load_tokenizer(str(path))
    try:
        import bitsandbytes  # noqa: F401

        have_bnb = True
    except ImportError:
        have_bnb = False

    meta = meta_model(path, 3)  # parameters counted on the meta device: quantized tensors pack two values a byte
    body = sum(p.numel() for n, p in meta.named_parameters() if "embed" not in n)
    lens = np.asarray(lengths, dtype=np.float64)
    flops = float(np.sum(2 * body * lens + 4 * args.layers * hidden * lens**2))
    results, skipped = {}, []
    for q in ("none", "8bit", "4bit"):
        label = {"none": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")}.get(q, q)
        if q != "none" and (device.type != "cuda" or not have_bnb):
            skipped.append(label)
            continue
        cfg = load_config(None, [f"model.backbone={path}", f"model.quantization={q}", f"model.max_length={args.max_length}"])
        weight_dtype = dtype if q == "none" and device.type == "cuda" else None  # a 9B-wide model: half-precision weights
        model = load_backbone(cfg.model, tok, device, dtype, weight_dtype).eval()
        budget = "auto" if device.type == "cuda" else None
        infer_logits(model, warm, tok.pad_token_id, 8, device, dtype, max_tokens=budget)  # warm-up (and the auto probe)
        sync(device)
        t = time.perf_counter()
        infer_logits(model, seqs, tok.pad_token_id, 8, device, dtype, max_tokens=budget)
        sync(device)
        seconds = time.perf_counter() - t
        results[label] = {"seq_s": len(seqs) / seconds, "tflops": flops / seconds / 1e12}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:  # GPTQ 8-bit: kk quantize's format through the HF engine (decompressed to fp16 at the first forward) and vLLM
        q8 = write_gptq8(path, work / "gptq8", 16 if scale > 1 else 128)
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(q8)).to(device).eval()
        infer_logits(model, warm, tok.pad_token_id, 8, device, dtype)
        sync(device)
        t = time.perf_counter()
        infer_logits(model, seqs, tok.pad_token_id, 8, device, dtype)
        sync(device)
        sec = time.perf_counter() - t
        results["gptq8 (hf)"] = {"seq_s": len(seqs) / sec, "tflops": flops / sec / 1e12}
        del model
    except ImportError:
        skipped.append("gptq8 (hf)")
    try:
        import vllm  # noqa: F401

        if device.type != "cuda":
            raise ImportError
        for label, p in (("fp16 (vllm)", path), ("gptq8 (vllm)", work / "gptq8")):
            sec = time_vllm(p, seqs, args.max_length)
            results[label] = {"seq_s": len(seqs) / sec, "tflops": flops / sec / 1e12}
    except ImportError:
        skipped += ["fp16 (vllm)", "gptq8 (vllm)"]
    base = next(results[k] for k in ("fp16", "bf16", "fp32") if k in results)
    rows = []
    for label, r in results.items():
        key = {"gptq8 (hf)": "fp16", "fp16 (vllm)": "fp16", "gptq8 (vllm)": "gptq8"}.get(label, "fp16" if label in ("fp16", "bf16", "fp32") else label)
        rows.append([label, f"{r['seq_s']:.2f}", f"{r['tflops']:.2f}", f"{r['tflops'] / peak:.1%}" if peak else "-",
                     f"{r['seq_s'] / base['seq_s']:.2f}", f"{THROUGHPUT[key]:g}"])
    rows += [[label, "skipped (no CUDA, or its library missing)", "", "", "",
              f"{THROUGHPUT.get(label.split(' ')[0], 1.0):g}"] for label in skipped]
    setting = (f"Gemma-2-9B width, {args.layers} layer(s){' (width /' + str(scale) + ')' if scale > 1 else ''}, random weights, "
               f"{len(seqs)} rows, lengths {source}; kernel path (load_backbone + infer_logits, max_tokens auto on a GPU)")
    cols = ["weights", "seq/s", "TFLOP/s", "of peak", "ratio to fp16 (measured)", "kernel plan's factor"]
    print_table(f"{setting}\n{name}", cols, rows)
    measured = [f"{k} {results[k]['seq_s'] / base['seq_s']:.2f}x" for k in ("8bit", "4bit", "gptq8 (hf)") if k in results]
    if "gptq8 (vllm)" in results:
        measured.append(f"gptq8/fp16 under vLLM {results['gptq8 (vllm)']['seq_s'] / results['fp16 (vllm)']['seq_s']:.2f}x")
    line = "quantized/fp16 inference seq/s: " + (", ".join(measured) or "not measured (needs CUDA and bitsandbytes)")
    line += f"; the plan assumes fp16 at {T4_FP16_UTILISATION:.0%} of a T4's peak"
    print(line)
    if args.record:
        record("bench_quant", "python benchmarks/bench_quant.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"rows": rows, "results": results}


if __name__ == "__main__":
    main()
