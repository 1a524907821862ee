"""Test-set inference speed, three ways, side by side, with swap TTA as `kk ensemble` runs it:

  (a) pad every sequence to max_length, file order       (the seed notebook)
  (b) pad each batch to its longest sequence, file order (dynamic padding)
  (c) kagglekit: length-sorted batches, dynamic padding, original order restored

All three run kagglekit.inference.infer_logits on the same sequences; the max abs difference of
their logits is reported (it should be float rounding only).

    python benchmarks/bench_infer.py                       # tiny model, CPU (target (c)/(a) >= 2.5x)
    python benchmarks/bench_infer.py --arch deberta-v3-base --max-length 1280 --n 512 --precision fp16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import build_model, device_info, md_table, random_sequences, real_lengths, record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "deberta-v3-base"])
    ap.add_argument("--n", type=int, default=128, help="rows (each predicted twice: swap TTA)")
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from kagglekit.inference import infer_logits
    from kagglekit.modeling import device_and_dtype

    torch.manual_seed(0)
    device, dtype = device_and_dtype(args.precision)
    kind, name, _ = device_info()
    with tempfile.TemporaryDirectory() as tmp:
        model, pad_id, vocab = build_model(args.arch, Path(tmp))
    model.to(device).eval()
    lengths, source = real_lengths(args.n, args.max_length)
    seqs = random_sequences(lengths, vocab)
    seqs = seqs + [s[::-1] for s in seqs]  # the swapped pass: same lengths, other tokens
    variants = {
        "(a) fixed padding, file order": dict(sort=False, pad_to=args.max_length),
        "(b) dynamic padding, file order": dict(sort=False),
        "(c) length-sorted (kagglekit)": dict(sort=True),
    }
    infer_logits(model, seqs[: args.batch_size], pad_id, args.batch_size, device, dtype)  # warm-up
    results, logits = {}, {}
    for label, kw in variants.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits[label] = infer_logits(model, seqs, pad_id, args.batch_size, device, dtype, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[label] = len(seqs) / (time.perf_counter() - t)
    ref = logits["(a) fixed padding, file order"]
    rows = [[label, f"{sps:.1f}", f"{sps / results['(a) fixed padding, file order']:.2f}x", f"{np.abs(logits[label] - ref).max():.2e}"]
            for label, sps in results.items()]
    table = Table(title=f"inference, {args.arch}, {len(seqs)} sequences ({args.n} rows x TTA), max_length {args.max_length}, "
                        f"lengths: {source}, {name}, {dtype or 'fp32'}")
    for c in ("variant", "sequences/s", "vs (a)", "max |logit diff| vs (a)"):
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    ratio = results["(c) length-sorted (kagglekit)"] / results["(a) fixed padding, file order"]
    ratio_b = results["(c) length-sorted (kagglekit)"] / results["(b) dynamic padding, file order"]
    line = f"ratios: (c)/(a) = {ratio:.2f}x, (c)/(b) = {ratio_b:.2f}x (target (c)/(a) >= 2.5x on CPU with the tiny model)"
    print(line)
    if args.record:
        record("bench_infer", "python benchmarks/bench_infer.py " + " ".join(argv or []), name,
               md_table(["variant", "sequences/s", "vs (a)", "max logit diff"], rows), line)
    return {"ratio_c_a": ratio, "ratio_c_b": ratio_b, "sps": results}


if __name__ == "__main__":
    main()
