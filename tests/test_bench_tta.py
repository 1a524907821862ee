"""benchmarks/bench_tta.py (issue 21.5): the log loss of `predict.tta: uncertain` against full TTA and no TTA
from a run's OOF files, with paired bootstrap intervals, on a tiny run whose answers are known."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "benchmarks"))


def _fake_oof_run(tiny_project, run_dir, seed=0):
    """Two folds' oof.csv / oof_no_tta.csv over the tiny train rows: random (A,B) and (B,A) probabilities
    whose TTA average is oof.csv, as training writes them."""
    from kagglekit.data import load_train

    train, _ = load_train(tiny_project / "train.csv")
    rng = np.random.default_rng(seed)
    n = len(train)
    p_ab, p_ba = rng.dirichlet([2, 2, 1], n), rng.dirichlet([2, 2, 1], n)
    cols = ["winner_model_a", "winner_model_b", "winner_tie"]
    cfg = tiny_config(tiny_project)
    for k, part in enumerate(np.array_split(np.arange(n), 2)):
        fold = run_dir / f"fold_{k}"
        fold.mkdir(parents=True)
        (fold / "config.yaml").write_text(cfg.to_yaml())
        (fold / "metrics.json").write_text(json.dumps({"val_log_loss": 1.0, "n_val": len(part)}))  # what training writes
        ids = train["id"].to_numpy()[part]
        pd.DataFrame({"id": ids, **dict(zip(cols, p_ab[part].T))}).to_csv(fold / "oof_no_tta.csv", index=False)
        pd.DataFrame({"id": ids, **dict(zip(cols, ((p_ab[part] + p_ba[part]) / 2).T))}).to_csv(fold / "oof.csv", index=False)
    return p_ab, p_ba, train["label"].to_numpy()


def test_uncertain_tta_against_full_and_none_from_oof(tiny_project, tmp_path, capsys, monkeypatch):
    import bench_tta

    from kagglekit.metrics import log_loss
    from kagglekit.tta import uncertain_rows

    monkeypatch.setenv("COLUMNS", "250")
    p_ab, p_ba, y = _fake_oof_run(tiny_project, tmp_path / "run")
    out = bench_tta.main(["--run", str(tmp_path / "run"), "--shares", "0.3,0.5", "--boot", "300"])
    res = out["results"][0]
    assert res["rows"] == len(y)
    assert abs(res["none"] - log_loss(p_ab, y)) < 1e-9 and abs(res["full"] - log_loss((p_ab + p_ba) / 2, y)) < 1e-9
    for s in (0.3, 0.5):
        rows = uncertain_rows(p_ab, s)  # the kernel's choice: lowest top probability of the first pass
        p = p_ab.copy()
        p[rows] = (p_ab[rows] + p_ba[rows]) / 2
        r = res["shares"][s]
        assert r["rows"] == len(rows) == int(np.ceil(s * len(y)))
        assert abs(r["loss"] - log_loss(p, y)) < 1e-9
        mean, lo, hi = r["vs_full"]
        assert abs(mean - (log_loss(p, y) - res["full"])) < 1e-9 and lo <= mean <= hi and hi - lo > 0
    text = capsys.readouterr().out
    assert "uncertain 30%" in text and "uncertain 50%" in text and "paired bootstrap" in text
