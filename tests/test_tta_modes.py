"""predict.tta: true / false / uncertain (issue 21.3): the config keeps its old YAML, the least confident rows
are chosen reproducibly, and kk predict runs the same uncertain path as the kernel."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from kernel_fakes import make_fake_run

from conftest import run_cli
from kagglekit.errors import ConfigError, KKError


def test_predict_tta_accepts_old_yaml_and_uncertain(tmp_path):
    from kagglekit.config import load_config

    assert load_config(None, ["predict.tta=true"]).predict.tta is True
    assert load_config(None, ["predict.tta=false"]).predict.tta is False
    cfg = load_config(None, ["predict.tta=uncertain", "predict.tta_share=0.5"])
    assert cfg.predict.tta == "uncertain" and cfg.predict.tta_share == 0.5
    assert load_config(None, []).predict.time_budget_h == 8.0
    for bad in ("predict.tta=maybe", "predict.tta_share=0", "predict.tta_share=1.5", "predict.time_budget_h=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])
    f = tmp_path / "c.yaml"
    f.write_text("predict:\n  tta: uncertain\n")
    assert load_config(f, []).predict.tta == "uncertain"


def test_uncertain_rows_are_the_least_confident_share():
    from kagglekit.tta import merge_passes, second_pass_share, tta_mode, uncertain_rows

    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.34, 0.33, 0.33], [0.6, 0.2, 0.2], [0.4, 0.3, 0.3]])
    assert uncertain_rows(p, 0.4).tolist() == [1, 2]  # ceil(0.4 x 5) = 2: top probabilities 0.34, then 0.40 (row 1 first)
    assert uncertain_rows(p, 0.6).tolist() == [1, 2, 4] and uncertain_rows(p, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert uncertain_rows(p, 0.0).tolist() == []
    p_ba = np.full((2, 3), 1 / 3)
    merged = merge_passes(p, p_ba, np.array([1, 2]))
    assert np.allclose(merged[[0, 3, 4]], p[[0, 3, 4]]) and np.allclose(merged[1], (p[1] + 1 / 3) / 2)
    assert [tta_mode(v) for v in (True, False, "uncertain")] == ["full", "none", "uncertain"]
    assert second_pass_share("uncertain", 0.3) == 0.3 and second_pass_share(True) == 1.0
    with pytest.raises(KKError, match="true, false or uncertain"):
        tta_mode("sometimes")


def test_kk_predict_tta_uncertain(tiny_project, tmp_path):
    """kk predict --tta-uncertain: the swapped pass on the fold's 30% least confident rows only, through
    the inference code the kernel uses; cached apart from full TTA."""

    from kagglekit.data import load_test
    from kagglekit.predict import FoldModel
    from kagglekit.tta import uncertain_rows

    run = make_fake_run(tiny_project, tmp_path / "run", (0,), "llama")
    test = tiny_project / "test.csv"
    r = run_cli("predict", "--run", run, "--fold", "0", "--test", test, "--tta-uncertain")
    assert r.exit_code == 0, r.output
    got = pd.read_csv(run / "fold_0" / "test.csv", dtype={"id": str}).iloc[:, 1:].to_numpy()
    assert json.loads((run / "fold_0" / "test.json").read_text())["tta"] == "uncertain:0.3"
    df, _ = load_test(test)
    full = FoldModel(run / "fold_0").predict(df, tta=True)
    rows = uncertain_rows(full["probs_ab"], 0.3)
    others = np.setdiff1d(np.arange(len(df)), rows)
    assert np.allclose(got[rows], full["probs"][rows], atol=1e-6)  # TTA on the chosen rows
    assert np.allclose(got[others], full["probs_ab"][others], atol=1e-6)  # (A,B) alone elsewhere
    assert not np.allclose(got, full["probs"], atol=1e-6)
    r = run_cli("predict", "--run", run, "--fold", "0", "--test", test)  # full TTA: not served from the uncertain cache
    assert r.exit_code == 0 and json.loads((run / "fold_0" / "test.json").read_text())["tta"] is True
