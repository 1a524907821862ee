"""The prediction path before and after issue 28 (one path: folds read once, text tokenized once), side by side.

Two checkouts of kagglekit run the same work in separate processes, alternating round by round:

  kk ensemble, cold cache   a 3-fold run copied afresh each round (no fold's test cache), swap TTA,
                            wall time of the whole command (process start, reading, tokenizing, both orders)
  tokenizer passes          rows given to Formatter.encode_rows, counted per call: during one fold's training with
                            E evaluations (validation rows tokenized per evaluation) and during kk ensemble over
                            3 folds (test rows tokenized per fold and order)

The run is trained once, by the "before" code (so both read it), with the tiny DeBERTa of configs/tiny.yaml on
synthetic rows; the two submissions are compared (largest probability difference).

    git worktree add --detach /tmp/kk-before 6b4299a
    python benchmarks/bench_predict_path.py --before /tmp/kk-before --record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, device_info, md_table, median_range, print_table, record

# Run inside each side's process: counts the rows of every Formatter.encode_rows call, then runs the work.
COUNTER = """
import json, sys
from kagglekit.formatting import Formatter
calls, real = [], Formatter.encode_rows
def counted(self, df, *a, **k):
    calls.append(len(df))
    return real(self, df, *a, **k)
Formatter.encode_rows = counted
what, args = sys.argv[1], json.loads(sys.argv[2])
if what == "train":
    from kagglekit.config import load_config
    from kagglekit.train import train_fold
    m = train_fold(load_config(args["config"], args["sets"]), 0, args["run"])
else:
    from kagglekit.cli import app
    try:
        app(args["argv"], standalone_mode=False)
    except SystemExit:
        pass
print("KKCOUNT " + json.dumps(calls))
"""


def side_env(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "KK_QUIET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_counted(code: Path, what: str, args: dict, cwd: Path) -> tuple[float, list]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", COUNTER, what, json.dumps(args)], cwd=cwd, env=side_env(code),
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0 or "KKCOUNT " not in r.stdout:
        raise SystemExit(f"{code} {what} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, json.loads(r.stdout.split("KKCOUNT ", 1)[1].splitlines()[0])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of kagglekit before the change (e.g. a git worktree)")
    ap.add_argument("--after", default=str(REPO), help="the checkout after (default: this one)")
    ap.add_argument("--rows", type=int, default=300, help="test rows")
    ap.add_argument("--train-rows", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=4, help="evaluations during the counted training")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    sides = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}

    import pandas as pd

    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="kk-bench-path-"))
    try:
        make_synthetic(args.train_rows, seed=1).to_csv(work / "train.csv", index=False)
        make_synthetic(args.rows, seed=2, with_labels=False).to_csv(work / "test.csv", index=False)
        df, _ = load_train(work / "train.csv")
        make_folds(df, k=3, seed=0).to_csv(work / "folds.csv", index=False)
        build_tiny_model(work / "tiny", "deberta-v2", str(work / "train.csv"), vocab_size=600, hidden=64)
        n_val = int((pd.read_csv(work / "folds.csv")["fold"] == 0).sum())
        steps = (args.train_rows - n_val) // 16
        sets = [f"data.train={work / 'train.csv'}", f"data.folds={work / 'folds.csv'}", f"data.test={work / 'test.csv'}",
                f"model.backbone={work / 'tiny'}", "model.max_length=128", "train.epochs=1",
                f"train.eval_every={max(1, steps // args.evals)}", "train.patience=0"]
        config = str(REPO / "configs" / "tiny.yaml")
        for k in range(3):  # the run both sides read, trained by the before code
            subprocess.run([sys.executable, "-m", "kagglekit.cli", "train", "--config", config, "--fold", str(k), "--run",
                            str(work / "run"), *sum((["--set", s] for s in sets), [])], cwd=work, env=side_env(sides["before"]),
                           check=True, capture_output=True)

        walls = {s: [] for s in sides}
        counts, subs = {}, {}
        for rnd in range(args.rounds):
            for s in (sides if rnd % 2 == 0 else dict(reversed(list(sides.items())))):
                cold = work / f"run-{s}-{rnd}"
                shutil.copytree(work / "run", cold)
                for cache in cold.glob("fold_*/test*"):
                    cache.unlink()
                out = work / f"sub-{s}.csv"
                wall, calls = run_counted(sides[s], "ensemble", {"argv": [
                    "ensemble", "--run", str(cold), "--test", str(work / "test.csv"), "--out", str(out), "--force",
                    "--train", str(work / "train.csv")]}, work)
                walls[s].append(wall)
                counts.setdefault(s, {})["ensemble"] = calls
                subs[s] = pd.read_csv(out)
        for s in sides:
            _, calls = run_counted(sides[s], "train", {"config": config, "sets": sets, "run": str(work / f"count-{s}")}, work)
            counts[s]["train"] = calls
        log = pd.read_csv(work / "count-after" / "fold_0" / "train_log.csv")
        evals = int(log["val_loss"].notna().sum()) if "val_loss" in log else args.evals
        diff = float((subs["before"].iloc[:, 1:] - subs["after"].iloc[:, 1:]).abs().to_numpy().max())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def per_eval(calls):
        return sum(c for c in calls if c == n_val) / n_val / max(evals, 1)

    def test_passes(calls):
        return sum(c for c in calls if c == args.rows) / args.rows

    rows = [[s, median_range(walls[s]), f"{per_eval(counts[s]['train']):.1f}", f"{test_passes(counts[s]['ensemble']):.0f}"]
            for s in sides]
    cols = ["code", "kk ensemble 3 folds, cold cache: wall s, median (min-max)",
            f"validation tokenizations per evaluation ({evals} evaluations)", "test-row tokenizations per kk ensemble"]
    ratio = sorted(walls["before"])[len(walls["before"]) // 2] / sorted(walls["after"])[len(walls["after"]) // 2]
    line = (f"kk ensemble (3 folds, {args.rows} rows, swap TTA, cold cache): after {ratio:.2f}x as fast as before; "
            f"submissions differ by at most {diff:.2e}")
    print_table("bench_predict_path", cols, rows)
    print(line)
    if args.record:
        record("bench_predict_path (issue 28)", "python benchmarks/bench_predict_path.py " + " ".join(argv), device_info()[1],
               md_table(cols, rows), line)
    return {"walls": walls, "counts": counts, "diff": diff, "n_val": n_val, "evals": evals}


if __name__ == "__main__":
    main()
