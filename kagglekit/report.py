"""`kk report`: one self-contained HTML page per set of runs, viewable offline (CSV and JSON only: no model, no
torch): the task and its metric, per-fold tables, accuracy per language (WSDM), learning curves, a reliability
diagram, the confusion matrix, truncation and the blend's cross-fitted weights, as embedded PNGs.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .errors import KKError


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(columns, rows) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def collect(runs: list, train_path=None) -> dict:
    """Everything the report shows, from the runs' files."""
    from .data import load_train
    from .runs import oof_set, open_runs, runs_task

    runs = open_runs([Path(r) for r in runs])  # a fold without metrics.json is named, not left out silently
    first = runs[0].folds[0].cfg
    task = runs_task(runs)
    train_df, _ = load_train(train_path or first.data.train, first.data.bad_rows, task)
    lang = task.language_column if task.language_column in train_df.columns else None
    oof = oof_set(runs, train_df)
    labels = dict(zip(train_df["id"], train_df["label"]))
    out = {"runs": [], "task": task, "groups": dict(zip(train_df["id"], train_df[lang])) if lang else None, "oof": oof}
    for run, rp in zip(runs, oof.runs):
        folds = [{"fold": f.index, "metrics": f.metrics,
                  "log": _train_log(f.path / "train_log.csv") if (f.path / "train_log.csv").exists() else None} for f in run.folds]
        out["runs"].append({"run": run.path, "oof": rp.probs, "oof_no_tta": rp.probs_no_tta,
                            "y": np.array([labels[i] for i in rp.ids]), "folds": folds})
    return out


def _train_log(path: Path):
    """A fold's train_log.csv (step, train_loss, val_loss...); an empty, cut or foreign file is one line naming it."""
    import pandas as pd

    try:
        log = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        reason = "empty" if isinstance(e, pd.errors.EmptyDataError) else f"cannot be read as CSV ({str(e).splitlines()[0][:120]})"
        raise KKError(f"{path}: {reason}") from None
    missing = [c for c in ("step", "train_loss", "val_loss") if c not in log.columns]
    if missing:
        raise KKError(f"{path}: missing column {', '.join(missing)}")
    try:
        log[["step", "train_loss", "val_loss"]].astype(float)
    except ValueError:
        raise KKError(f"{path}: step, train_loss and val_loss must be numbers") from None
    return log


def _figures(data: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    classes = data["task"].class_names
    n = len(classes)
    # learning curves
    fig, axes = plt.subplots(1, len(data["runs"]), figsize=(6 * len(data["runs"]), 3.6), squeeze=False)
    for ax, run in zip(axes[0], data["runs"]):
        for f in run["folds"]:
            log = f["log"]
            if log is None or log.empty:
                continue
            tr = log.dropna(subset=["train_loss"])
            ax.plot(tr["step"], tr["train_loss"], alpha=0.6, label=f"fold {f['fold']} train")
            va = log.dropna(subset=["val_loss"])
            ax.plot(va["step"], va["val_loss"], "o-", label=f"fold {f['fold']} val")
        ax.set_title(f"{run['run'].name}: loss per step")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("log loss")
        ax.legend(fontsize=7)
    figs["curves"] = _png(fig)
    # reliability diagram and confusion matrix, per run
    for run in data["runs"]:
        p, y = run["oof"], run["y"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        bins = np.linspace(0, 1, 11)
        for c, name in enumerate(classes):
            conf, hit = p[:, c], (y == c).astype(float)
            idx = np.clip(np.digitize(conf, bins) - 1, 0, 9)
            xs = [conf[idx == b].mean() for b in range(10) if (idx == b).any()]
            ys = [hit[idx == b].mean() for b in range(10) if (idx == b).any()]
            ax1.plot(xs, ys, "o-", label=name)
        ax1.plot([0, 1], [0, 1], "k--", lw=1)
        ax1.set_title("reliability of the OOF probabilities")
        ax1.set_xlabel("predicted probability")
        ax1.set_ylabel("observed frequency")
        ax1.legend()
        cm = np.zeros((n, n), dtype=int)
        np.add.at(cm, (y, p.argmax(1)), 1)
        ax2.imshow(cm, cmap="Blues")
        for i in range(n):
            for j in range(n):
                ax2.text(j, i, str(cm[i, j]), ha="center", va="center")
        ax2.set_xticks(range(n), classes)
        ax2.set_yticks(range(n), classes)
        ax2.set_xlabel("predicted")
        ax2.set_ylabel("true")
        ax2.set_title("confusion matrix (OOF argmax)")
        figs[f"calibration-{run['run'].name}"] = _png(fig)
        run["confusion"] = cm
    # truncation retention per field
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels, width, x = [], 0.25, 0
    for run in data["runs"]:
        for f in run["folds"]:
            ret = f["metrics"].get("truncation", {}).get("train", {}).get("retention", {})
            for j, field in enumerate(("prompt", "response_a", "response_b")):
                ax.bar(x + j * width, ret.get(field, np.nan), width, color=f"C{j}", label=field if x == 0 else None)
            labels.append(f"{run['run'].name}/{f['fold']}")
            x += 1
    ax.set_xticks(np.arange(len(labels)) + width, labels, rotation=30, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of tokens kept")
    ax.set_title("truncation: retention per field (training rows)")
    ax.legend(fontsize=7)
    figs["truncation"] = _png(fig)
    return figs


def build_report(runs: list, out, train_path=None, force: bool = False) -> Path:
    """Write the HTML report for ``runs`` to ``out`` (atomically); returns the path."""
    from .ensemble import choose_calibration
    from .io import protect_existing, write_text
    from .metrics import accuracy, group_accuracy, log_loss

    if not runs:
        raise KKError("give at least one --run")
    out = Path(out)
    protect_existing(out, force, "report", sources=[train_path])
    data = collect(runs, train_path)
    task = data["task"]
    figs = _figures(data)
    rows, metric = [], task.metric
    extra = [] if metric.name in ("log_loss", "accuracy") else [f"{metric.title} (the task's metric)"]
    for run in data["runs"]:
        for f in run["folds"]:
            m = f["metrics"]
            rows.append([run["run"].name, f["fold"], m.get("n_val", ""), m.get("val_log_loss_no_tta", ""), m.get("val_log_loss", ""),
                         m.get("val_accuracy", ""), *[m.get(f"val_{metric.name}", "")][:len(extra)], m.get("swap_flip_rate", ""),
                         m.get("prior_log_loss", "")])
        p, pnt, y = run["oof"], run["oof_no_tta"], run["y"]
        prior = np.bincount(y, minlength=task.n_classes) / len(y)
        rows.append([run["run"].name, "all", len(y), log_loss(pnt, y), log_loss(p, y), accuracy(p, y), *[metric(p, y)][:len(extra)],
                     float(np.mean([f["metrics"].get("swap_flip_rate", np.nan) for f in run["folds"]])),
                     log_loss(np.tile(prior, (len(y), 1)), y)])
    weights, t, calibrated, cal, note = choose_calibration(data["oof"])
    y = data["oof"].y
    cal_rows = [["source", note], ["temperature", float(t)]]
    if cal is not None:
        cal_rows = [["uncalibrated", cal["uncalibrated"]], ["in-sample", cal["in_sample"]],
                    [f"cross-fitted ({cal['folds']} folds)", cal["cross_fitted"]], *cal_rows,
                    ["verdict", "kept" if cal["kept"] else "not kept"]]

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kagglekit report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
        f"<h1>kagglekit report: {html.escape(', '.join(r['run'].name for r in data['runs']))}</h1>",
        f"<p>task: {html.escape(task.name)} ({html.escape(task.title)}); metric: {html.escape(task.metric.title)} "
        f"({'higher' if task.metric.higher_is_better else 'lower'} is better)"
        f"{'' if task.metric.name == 'log_loss' else '; log loss beside it'}; {task.n_classes} classes: "
        f"{html.escape(', '.join(task.class_names))}</p>",
        "<h2>Out-of-fold results</h2>",
        _table(["run", "fold", "rows", "log loss (no TTA)", "log loss (TTA)", "accuracy", *extra, "swap flip rate", "class prior"], rows),
        "<h2>Ensemble calibration (cross-fitted)</h2>",
        _table(["run", "weight"], [[r["run"].name, float(w)] for r, w in zip(data["runs"], weights)]),
        _table(["judged on", "log loss"], cal_rows),

    ]
    if data["groups"] is not None:
        # Per language: the calibrated ensemble of the runs, on the OOF rows they share.
        per = group_accuracy(calibrated, y, [data["groups"][i] for i in data["oof"].ids])
        parts += [f"<h2>Accuracy per {html.escape(task.language_column)} (OOF ensemble)</h2>",
                  _table([task.language_column, "rows", "accuracy"], per)]
    parts += ["<h2>Learning curves</h2>", f"<img alt='learning curves' src='data:image/png;base64,{figs['curves']}'>"]
    for run in data["runs"]:
        parts += [f"<h2>Calibration and errors: {html.escape(run['run'].name)}</h2>",
                  f"<img alt='reliability and confusion' src='data:image/png;base64,{figs['calibration-' + run['run'].name]}'>"]
    parts += ["<h2>Truncation</h2>", f"<img alt='truncation' src='data:image/png;base64,{figs['truncation']}'>", "</body></html>"]
    write_text(out, "\n".join(parts))
    return out
