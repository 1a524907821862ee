"""What the cheaper TTA settings give up: `predict.tta: uncertain` (the swapped pass on the least confident
share of rows only) against full TTA and no TTA, on runs' out-of-fold predictions.

Every trained fold leaves ``oof_no_tta.csv`` (the (A,B) order, p_ab) and ``oof.csv`` (the TTA average
p = (p_ab + p_ba) / 2), so the swapped prediction is recovered exactly as p_ba = 2 p - p_ab: no model runs.
For each run and share s the rows are chosen as the kernel chooses them (kagglekit.tta.uncertain_rows: the
s x n rows with the lowest top probability of the first pass, over the run's OOF rows) and get the TTA
average; the rest keep p_ab. Reported per run: log loss of no TTA, uncertain at each share, full TTA, and
the per-row differences to full TTA and to no TTA with a paired bootstrap 95% interval (rows resampled,
both settings scored on the same draws).

    python benchmarks/bench_tta.py --run runs/minilm-cpu --record
    python benchmarks/bench_tta.py --run runs/a --run runs/b --shares 0.2,0.3,0.5 --train data/train.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from _common import md_table, print_table, record

EPS = 1e-15


def row_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row log loss, scored as kagglekit.metrics.log_loss scores the mean (renormalised, clipped)."""
    p = np.clip(probs / probs.sum(axis=1, keepdims=True), EPS, 1 - EPS)
    return -np.log(p[np.arange(len(labels)), labels])


def paired_bootstrap(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-row differences, rows resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def analyse(run, labels_by_id: dict, shares, n_boot: int = 2000, seed: int = 0) -> dict:
    """Log losses and paired intervals of one run's OOF rows (see the module docstring)."""
    from kagglekit.runs import open_run, run_oof
    from kagglekit.tta import merge_passes, uncertain_rows

    rp = run_oof(open_run(run), labels_by_id)
    y = np.array([labels_by_id[i] for i in rp.ids])
    p_ab, p = rp.probs_no_tta, rp.probs
    p_ba = 2 * p - p_ab  # the swapped order, mapped back: exact, since oof.csv = (p_ab + p_ba) / 2
    if np.abs(p_ba.sum(axis=1) - 1).max() > 1e-4 or (p_ba < -1e-6).any():
        raise SystemExit(f"{run}: oof.csv is not the TTA average of oof_no_tta.csv (p_ba = 2p - p_ab is no probability)")
    p_ba = np.clip(p_ba, 0, None)
    none, full = row_losses(p_ab, y), row_losses(p, y)
    out = {"run": str(run), "rows": len(y), "none": float(none.mean()), "full": float(full.mean()), "shares": {}}
    for s in shares:
        rows = uncertain_rows(p_ab, s)
        loss = row_losses(merge_passes(p_ab, p_ba[rows], rows), y)
        out["shares"][s] = {"rows": len(rows), "loss": float(loss.mean()),
                            "vs_full": (float((loss - full).mean()), *paired_bootstrap(loss - full, n_boot, seed)),
                            "vs_none": (float((loss - none).mean()), *paired_bootstrap(loss - none, n_boot, seed)),
                            "gain_kept": float((none.mean() - loss.mean()) / (none.mean() - full.mean()))
                            if none.mean() != full.mean() else float("nan")}
    out["full_vs_none"] = (float((full - none).mean()), *paired_bootstrap(full - none, n_boot, seed))
    out["none_vs_full"] = (float((none - full).mean()), *paired_bootstrap(none - full, n_boot, seed))
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="a run folder with trained folds (repeat for several)")
    ap.add_argument("--train", help="train.csv with the labels (default: the run's data.train)")
    ap.add_argument("--shares", default="0.3,0.5", help="shares of rows given the swapped pass")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap draws")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)

    from kagglekit.data import load_train
    from kagglekit.runs import open_run
    from kagglekit.task import get_task

    shares = [float(s) for s in args.shares.split(",") if s.strip()]
    results, rows = [], []

    def ci(t):
        return f"{t[0]:+.4f} [{t[1]:+.4f}, {t[2]:+.4f}]"

    for run in args.run:
        cfg = open_run(run).folds[0].cfg
        task = get_task(cfg.task)
        train, _ = load_train(args.train or cfg.data.train, cfg.data.bad_rows, task)
        res = analyse(Path(run), dict(zip(train["id"], train["label"])), shares, args.boot)
        results.append(res)
        name = Path(run).name
        rows.append([name, "no TTA (A,B only)", "0%", f"{res['none']:.4f}", ci(res["none_vs_full"]), "+0.0000", "0%"])
        for s, r in res["shares"].items():
            rows.append([name, f"uncertain {s:.0%}", f"{r['rows'] / res['rows']:.0%}", f"{r['loss']:.4f}", ci(r["vs_full"]),
                         ci(r["vs_none"]), f"{r['gain_kept']:.0%}"])
        rows.append([name, "full TTA", "100%", f"{res['full']:.4f}", "+0.0000", ci(res["full_vs_none"]), "100%"])
    cols = ["run", "setting", "rows with (B,A)", "OOF log loss", "vs full TTA [95% paired bootstrap]", "vs no TTA [95%]",
            "share of TTA's gain kept"]
    title = f"TTA settings on out-of-fold rows ({', '.join(str(r['rows']) for r in results)} rows; {args.boot} bootstrap draws)"
    print_table(title, cols, rows)
    line = "; ".join(f"{Path(r['run']).name}: uncertain {s:.0%} gives up {v['vs_full'][0]:+.4f} of full TTA"
                     for r in results for s, v in r["shares"].items())
    print(line)
    if args.record:
        record("bench_tta", "python benchmarks/bench_tta.py " + " ".join(argv), "no model runs (OOF files)", f"{title}\n\n" + md_table(cols, rows), line)
    return {"results": results, "rows": rows}


if __name__ == "__main__":
    main()
