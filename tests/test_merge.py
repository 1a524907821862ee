"""kk merge: fold adapters averaged by factors or exactly by their updates; the merged model is a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_delta_merge_is_the_exact_average_of_the_fold_updates(tiny_run, tiny_project, tmp_path):
    import torch

    from kagglekit.engine import HFEngine
    from kagglekit.merge import merge_run
    from kagglekit.runs import open_fold

    def load_trained(path):  # the fold's model, its adapter (if any) merged into its base
        model = HFEngine([open_fold(path)], device="cpu").model
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    out = merge_run(tiny_run, tmp_path / "delta", method="delta")
    # each fold merged alone is W + dW_k; their mean is W + mean dW_k, which delta must equal
    folds = [_params(load_trained(tiny_run / f"fold_{k}")) for k in range(3)]
    merged = _params(load_trained(out / "fold_0"))
    assert set(merged) == set(folds[0])
    for name, value in merged.items():
        torch.testing.assert_close(value, torch.stack([f[name] for f in folds]).mean(0), atol=1e-6, rtol=1e-5)
    # factors is a different (approximate) model when the folds differ
    fac = merge_run(tiny_run, tmp_path / "factors", method="factors", unload=True)
    fac_params = _params(load_trained(fac / "fold_0"))
    lora_target = next(n for n in merged if "query_proj.weight" in n)
    assert not torch.allclose(fac_params[lora_target], merged[lora_target])


def test_merging_identical_folds_gives_the_fold_back(tiny_run, tiny_project, tmp_path):
    from kagglekit.merge import merge_run
    from kagglekit.predict import predict_fold

    run = tmp_path / "twins"
    (run).mkdir()
    for k in (0, 1):
        shutil.copytree(tiny_run / "fold_0", run / f"fold_{k}", ignore=shutil.ignore_patterns("test.*"))
    one = predict_fold(run, 0, tiny_project / "test.csv").iloc[:, 1:].to_numpy()
    for method, unload in (("factors", False), ("delta", False)):
        out = merge_run(run, tmp_path / f"m-{method}", method=method, unload=unload)
        merged = predict_fold(out, 0, tiny_project / "test.csv").iloc[:, 1:].to_numpy()
        np.testing.assert_allclose(merged, one, atol=1e-5)


def test_merged_run_through_the_cli_ensemble_and_kernel(tiny_run, tiny_project, tmp_path, monkeypatch):
    import json

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = run_cli("merge", "--run", run, "--method", "factors", "--test", tiny_project / "test.csv")
    assert r.exit_code == 0, r.output
    assert "speed-up" in r.output and "mean |p_merged - p_folds|" in r.output
    merged = tmp_path / "run-merged"
    m = json.loads((merged / "fold_0" / "metrics.json").read_text())
    assert m["source_folds"] == [0, 1, 2] and m["method"] == "factors" and "not this model's own" in m["oof"]
    r = run_cli("ensemble", "--run", merged, "--test", tiny_project / "test.csv", "--out", tmp_path / "sub.csv")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    r = run_cli("kernel", "--run", merged, "--name", "merged-k", "--out", tmp_path / "k")
    assert r.exit_code == 0, r.output
    r = run_cli("merge", "--run", run, "--method", "factors")
    assert r.exit_code == 1 and "already exists; pass --force" in r.stderr
    r = run_cli("merge", "--run", run, "--method", "mean")
    assert r.exit_code == 1 and "--method must be factors or delta" in r.stderr


def test_merge_refuses_what_cannot_be_merged(tiny_run, tmp_path):
    from kagglekit.errors import KKError
    from kagglekit.merge import merge_run

    with pytest.raises(KKError, match="at least two trained folds"):
        merge_run(tiny_run, tmp_path / "x", folds="0")
    run = tmp_path / "mixed"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "fold_1" / "adapter_config.json").read_text())
    cfg["r"] = 4
    (run / "fold_1" / "adapter_config.json").write_text(json.dumps(cfg))
    # a genuine rank-4 adapter (a config that disagrees with its weights is refused on reading)
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "fold_1" / "adapter_model.safetensors"))
    state = {k: v[:4].contiguous() if ".lora_A." in k else v[:, :4].contiguous() if ".lora_B." in k else v for k, v in state.items()}
    save_file(state, str(run / "fold_1" / "adapter_model.safetensors"))
    with pytest.raises(KKError, match="differs from fold 0's in r"):
        merge_run(run, tmp_path / "y")



