"""Padding efficiency (real tokens / computed tokens, i.e. rows x longest row summed over batches) of each
way to batch a training epoch, at every data size up to the full competition (57,477 rows x 2 orders):

  kagglekit          kagglekit.batching.plan_batches: the sorted chunk grows until 98% efficiency
  kagglekit (fixed)  the same with the old fixed chunk of 32 batches
  HF group_by_length transformers' own LengthGroupedSampler (mega-batches of 50 batches at most)
  random dynamic     shuffled rows, each batch padded to its longest row
  fixed              every row padded to max_length
  token budget       plan_batches with max_tokens = batch x max_length (the same peak memory)

No model runs: efficiency is a property of the batches. The smallest size is the real rows (tiny tokenizer)
when ../shared is present; the others draw lengths from the real distribution.

    python benchmarks/bench_padding.py --record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import bench_sequences, md_table, print_table, real_lengths, record


def hf_batches(lengths, batch_size: int, seed: int) -> list[list[int]]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator()
    g.manual_seed(seed)
    order = list(LengthGroupedSampler(batch_size, lengths=[int(x) for x in lengths], generator=g))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def fixed_chunk(lengths, batch_size: int, seed: int, chunk_batches: int = 32) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(len(lengths))
    out = []
    for s in range(0, len(perm), batch_size * chunk_batches):
        part = sorted(perm[s:s + batch_size * chunk_batches].tolist(), key=lambda i: (-lengths[i], i))
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000,20000,114954", help="sequences; the first is the real rows when present")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--seeds", type=int, default=3, help="epochs averaged")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    from kagglekit.batching import padding_efficiency, plan_batches

    B, L = args.batch_size, args.max_length
    cols = ["sequences", "lengths", "kagglekit", "kagglekit (fixed chunk)", "HF group_by_length", "random dynamic", "fixed",
            "token budget (B x max_length)"]
    rows = []
    for k, n in enumerate(int(x) for x in args.sizes.split(",")):
        if k == 0:
            with tempfile.TemporaryDirectory() as work:
                seqs, source = bench_sequences("real", L, 8000, Path(work), n // 2)
            lengths = np.array([len(s) for s in seqs]) if "real rows" in source else real_lengths(n, L, 0)[0]
            source = "real rows" if "real rows" in source else "real distribution"
        else:
            lengths, source = real_lengths(n, L, seed=k)[0], "real distribution"
        units = [[i] for i in range(len(lengths))]
        eff: dict[str, list[float]] = {c: [] for c in cols[2:]}
        for seed in range(args.seeds):
            eff["kagglekit"].append(padding_efficiency(lengths, plan_batches(lengths, units, B, seed, 0)))
            eff["kagglekit (fixed chunk)"].append(padding_efficiency(lengths, fixed_chunk(lengths, B, seed)))
            eff["HF group_by_length"].append(padding_efficiency(lengths, hf_batches(lengths, B, seed)))
            perm = np.random.default_rng(seed).permutation(len(lengths)).tolist()
            eff["random dynamic"].append(padding_efficiency(lengths, [perm[i:i + B] for i in range(0, len(perm), B)]))
            eff["fixed"].append(float(lengths.sum()) / (len(lengths) * L))
            eff["token budget (B x max_length)"].append(
                padding_efficiency(lengths, plan_batches(lengths, units, B, seed, 0, max_tokens=B * L)))
        rows.append([len(lengths), source] + [f"{np.mean(v):.3f}" for v in eff.values()])
    print_table(f"padding efficiency of a training epoch: batch {B}, max_length {L}, mean of {args.seeds} epochs", cols, rows)
    worst = min(float(r[2]) for r in rows)
    line = f"kagglekit's lowest efficiency over these sizes: {worst:.3f} (target 0.98)"
    print(line)
    if args.record:
        record("bench_padding", "python benchmarks/bench_padding.py " + " ".join(argv), "no model (batch composition only)",
               md_table(cols, rows), line)
    return {"rows": rows}


if __name__ == "__main__":
    main()
