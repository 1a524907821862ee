"""Does cost grow as it should? kagglekit's training epoch and test inference (both A/B orders) timed at
1x, 2x and 4x the rows (max_length 1280), and at max_length 512, 1024 and 1280 (1x rows).

Rows: time should grow linearly (ratio ~ 2 and 4). Length: real rows are cut at max_length, so the work
grows with the real tokens kept (shown beside the times), a little faster for attention (quadratic in a
row's length); anything far beyond that is a bug (e.g. padding to max_length).

    python benchmarks/bench_scaling.py            # the tiny model, the real rows, CPU (about 5 minutes)
    python benchmarks/bench_scaling.py --record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import bench_infer
import bench_train

from _common import bench_sequences, device_info, md_table, print_table, record, tiny_tokenizer


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", default="1,2,4", help="row multiples at the longest max_length")
    ap.add_argument("--lengths", default="512,1024,1280", help="max_length values at 1x rows")
    ap.add_argument("--data", default="real", choices=["real", "sim"])
    ap.add_argument("--rows", type=int, default=100, help="--data sim: rows at 1x")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="cap the timed training steps (0 = the whole epoch; smoke runs)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    repeats = [int(r) for r in args.repeats.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths)
    grid = [(r, longest) for r in repeats] + [(1, n) for n in lengths if n != longest]
    _, name, _ = device_info()
    out = []
    with tempfile.TemporaryDirectory() as work:
        tiny_tokenizer(Path(work))
        for rep, length in grid:
            common = ["--data", args.data, "--max-length", str(length), "--batch-size", str(args.batch_size)]
            size = ["--repeat", str(rep)] if args.data == "real" else ["--rows", str(args.rows * rep)]
            seqs, _ = bench_sequences(args.data, length, 8000, Path(work), args.rows * rep, rep)
            tokens = sum(map(len, seqs))
            tr = bench_train.main(common + size + ["--contenders", "kagglekit", "--rounds", "1", "--steps", str(args.steps)])
            sps = tr["median"]["kagglekit"]
            inf = bench_infer.main(common + size + ["--variants", "kagglekit", "--rounds", "1"])
            ips = inf["median"]["kagglekit"]
            out.append({"rows": rep, "max_length": length, "sequences": len(seqs), "tokens": tokens,
                        "train_s": len(seqs) / sps, "infer_s": len(seqs) / ips})
    base = next(o for o in out if o["rows"] == 1 and o["max_length"] == longest)
    cols = ["rows", "max_length", "sequences", "real tokens", "train epoch s", "inference s",
            "tokens vs base", "train time vs base", "inference time vs base"]
    rows = [[f"{o['rows']}x", o["max_length"], o["sequences"], o["tokens"], f"{o['train_s']:.1f}", f"{o['infer_s']:.1f}",
             f"{o['tokens'] / base['tokens']:.2f}", f"{o['train_s'] / base['train_s']:.2f}", f"{o['infer_s'] / base['infer_s']:.2f}"]
            for o in out]
    print_table(f"scaling: tiny model, batch {args.batch_size}, {args.data} data\n{name}", cols, rows)
    big = max(out, key=lambda o: o["rows"])
    line = (f"{big['rows']}x rows: training {big['train_s'] / base['train_s']:.2f}x and inference "
            f"{big['infer_s'] / base['infer_s']:.2f}x the 1x time (linear = {big['rows']:.2f}x)")
    print(line)
    if args.record:
        record("bench_scaling", "python benchmarks/bench_scaling.py " + " ".join(argv), name, md_table(cols, rows), line)
    return {"results": out}


if __name__ == "__main__":
    main()
