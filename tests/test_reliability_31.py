"""Regressions of issue 31 (breaks found trying kk as a careless or hostile user would)."""

import json
import shutil

import pytest

from conftest import run_cli


def test_merge_accepts_folds_whose_target_modules_peft_wrote_in_another_order(tiny_run, tmp_path):
    # peft writes target_modules from a set: a fold trained in another process lists them in another order.
    from kagglekit.merge import merge_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for k, order in ((0, ["query_proj", "key_proj", "value_proj"]), (1, ["value_proj", "query_proj", "key_proj"]), (2, ["key_proj", "value_proj", "query_proj"])):
        p = run / f"fold_{k}" / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg["target_modules"] = order
        p.write_text(json.dumps(cfg))
    assert (merge_run(run, tmp_path / "merged", check_rows=0) / "fold_0").is_dir()


def test_an_adapter_asking_for_megatron_is_refused_in_one_line(tiny_run, tmp_path):
    from kagglekit.adapters import read_adapter_config
    from kagglekit.errors import KKError

    fold = tmp_path / "fold_0"
    shutil.copytree(tiny_run / "fold_0", fold)
    cfg = json.loads((fold / "adapter_config.json").read_text())
    cfg["megatron_core"] = "os"
    (fold / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KKError, match="megatron_core"):
        read_adapter_config(fold)


@pytest.mark.parametrize("args", [["--set", "seed=-1"], ["--set", f"seed={2**32}"], ["--set", "train.threads=100000"],
                                  ["--set", "predict.threads=100000"]])
def test_out_of_range_seed_and_threads_are_refused_by_the_config(args):
    r = run_cli("config", *args)
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_seed_flag_out_of_numpys_range_is_refused(synth_train, tmp_path):
    r = run_cli("make-folds", "--train", synth_train, "--out", tmp_path / "f.csv", "--seed", str(2**32))
    assert r.exit_code != 0 and not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize("hours", [0, -0.0, -5, float("nan"), 25])
def test_time_budget_outside_0_24_hours_is_refused(hours):
    from kagglekit.errors import KKError
    from kagglekit.kernel.common import check_budget_h

    with pytest.raises(KKError, match="time-budget-h"):
        check_budget_h(hours)
