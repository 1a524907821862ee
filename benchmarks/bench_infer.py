"""Test-set inference speed against what competitors use, side by side, on the same token ids, with swap
TTA as `kk ensemble` runs it (every row in both A/B orders):

  fixed padding            every sequence padded to max_length, file order (the seed notebook)
  Trainer.predict          transformers.Trainer.predict, DataCollatorWithPadding, file order
  bare sorted loop         a plain loop over length-sorted batches padded before the clock starts (the upper bound)
  kagglekit                kagglekit.engine.infer_logits: sorted, padded per batch, order restored
  kagglekit max_tokens     the same with a token budget of batch_size x max_length: the peak memory of a
                           row batch of full-length rows, but short rows travel in bigger batches

`--rounds` interleaved rounds; median and min-max sequences/s; the largest logit difference from the
fixed-padding reference (float rounding only) is shown per contender.

    python benchmarks/bench_infer.py                          # tiny model, the real rows, CPU
    python benchmarks/bench_infer.py --data sim --rows 2000   # lengths of the real distribution
    python benchmarks/bench_infer.py --arch deberta-v3-base --data sim --rows 512 --precision fp16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_sequences, build_model, device_info, md_table, median_range, print_table, record, sync, tiny_tokenizer

VARIANTS = ("fixed padding", "Trainer.predict", "bare sorted loop", "kagglekit", "kagglekit max_tokens")
# Added when the flashdeberta package imports (GPU only: it needs triton): kagglekit's batches through its model.
FLASH = "flashdeberta (kagglekit batches)"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "deberta-v3-base"])
    ap.add_argument("--data", default="real", choices=["real", "sim"])
    ap.add_argument("--rows", type=int, default=0, help="--data sim: rows (each predicted in both orders)")
    ap.add_argument("--repeat", type=int, default=1, help="--data real: the rows this many times")
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from kagglekit.engine import infer_logits, length_sorted_batches, pad_batch

    torch.manual_seed(0)
    from kagglekit.modeling import device_and_dtype

    device, dtype = device_and_dtype(args.precision)
    kind, name, _ = device_info()
    work = Path(tempfile.mkdtemp())
    model, pad_id, vocab = build_model(args.arch, work)
    model.to(device).eval()
    seqs, source = bench_sequences(args.data, args.max_length, vocab, work, args.rows, args.repeat)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    flash = None
    if device.type == "cuda" and args.arch == "deberta-v3-base":
        try:
            from flashdeberta import FlashDebertaV2ForSequenceClassification

            flash = FlashDebertaV2ForSequenceClassification(model.config).to(device).eval()
            missing = flash.load_state_dict(model.state_dict(), strict=False).missing_keys
            if missing:
                print(f"flashdeberta: {len(missing)} weights not matched ({missing[0]}...); its row is not comparable")
            variants.append(FLASH)
        except Exception as e:  # not installed, or no triton: say so and go on
            print(f"flashdeberta: not run ({type(e).__name__}: {str(e).splitlines()[0][:120]})")

    def trainer_predict():
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        tok = tiny_tokenizer(work)
        tok.pad_token_id = pad_id
        ds = [{"input_ids": list(map(int, s)), "attention_mask": [1] * len(s)} for s in seqs]
        targs = TrainingArguments(output_dir=str(work / "hf"), per_device_eval_batch_size=args.batch_size, report_to="none",
                                  use_cpu=device.type != "cuda", bf16_full_eval=False, fp16_full_eval=False,
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, disable_tqdm=True,
                                  dataloader_num_workers=0)
        return Trainer(model=model, args=targs, data_collator=DataCollatorWithPadding(tok)).predict(ds).predictions

    sorted_batches = length_sorted_batches([len(s) for s in seqs], args.batch_size)
    ready = [(b, *(t.to(device) for t in pad_batch([seqs[i] for i in b], pad_id))) for b in sorted_batches]

    def bare_loop():
        out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for b, ids, mask in ready:
                out[b] = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()
        return out

    run = {
        "fixed padding": lambda: infer_logits(model, seqs, pad_id, args.batch_size, device, dtype, sort=False, pad_to=args.max_length),
        "Trainer.predict": trainer_predict,
        "bare sorted loop": bare_loop,
        "kagglekit": lambda: infer_logits(model, seqs, pad_id, args.batch_size, device, dtype),
        "kagglekit max_tokens": lambda: infer_logits(model, seqs, pad_id, args.batch_size, device, dtype,
                                                     max_tokens=args.batch_size * args.max_length),
        FLASH: lambda: infer_logits(flash, seqs, pad_id, args.batch_size, device, dtype),
    }
    infer_logits(model, seqs[: args.batch_size], pad_id, args.batch_size, device, dtype)  # warm-up
    speed: dict[str, list[float]] = {v: [] for v in variants}
    logits: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for v in variants:  # interleaved rounds
            sync(device)
            t = time.perf_counter()
            logits[v] = np.asarray(run[v]())
            sync(device)
            speed[v].append(len(seqs) / (time.perf_counter() - t))
    med = {v: float(np.median(s)) for v, s in speed.items()}
    ref = logits[variants[0]]
    rows = [[v, median_range(speed[v]), f"{med[v] / med[variants[0]]:.2f}x", f"{np.abs(logits[v] - ref).max():.1e}"] for v in variants]
    setting = (f"{args.arch}, {len(seqs)} sequences ({source}), max_length {args.max_length}, batch {args.batch_size}, "
               f"{str(dtype or 'fp32').replace('torch.', '')}, {args.rounds} interleaved rounds")
    cols = ["variant", "sequences/s median (min-max)", f"vs {variants[0]}", f"max logit diff vs {variants[0]}"]
    print_table(f"inference: {setting}\n{name}", cols, rows)
    ratios = [f"kagglekit/{v} = {med['kagglekit'] / med[v]:.2f}x" for v in variants if v != "kagglekit" and "kagglekit" in med]
    line = "sequences/s ratios: " + ", ".join(ratios)
    print(line)
    if args.record:
        record("bench_infer", "python benchmarks/bench_infer.py " + " ".join(argv), name, f"{setting}\n\n" + md_table(cols, rows), line)
    return {"median": med, "max_diff": {v: float(np.abs(logits[v] - ref).max()) for v in variants}}


if __name__ == "__main__":
    main()
