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


# Case 1: code shipped in a backbone folder never runs, whatever stdin answers.
def _backbone_with_code(src, dst, model_type):
    shutil.copytree(src, dst)
    marker = dst / "RAN"
    (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'kk-evil'\n")
    conf = json.loads((dst / "config.json").read_text())
    conf.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"})
    (dst / "config.json").write_text(json.dumps(conf))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return marker


def test_kk_train_refuses_a_backbone_whose_architecture_is_its_own_code_even_with_yes_on_stdin(tiny_project, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    marker = _backbone_with_code(tiny_project / "deberta", tmp_path / "evil", "kk-evil")
    args = [sys.executable, "-m", "kagglekit.cli", "train", "--fold", "0", "--config", str(REPO / "configs/tiny.yaml"),
            "--run", str(tmp_path / "run"), "--set", f"model.backbone={tmp_path / 'evil'}", "--set", f"data.train={tiny_project / 'train.csv'}",
            "--set", f"data.folds={tiny_project / 'folds.csv'}", "--set", "model.max_length=64"]
    r = subprocess.run(args, input="y\ny\ny\n", capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "Traceback" not in r.stderr and "auto_map" in r.stderr and "[y/N]" not in r.stdout + r.stderr
    assert not marker.exists()


def test_every_loader_refuses_the_folder_and_a_native_type_with_auto_map_loads_without_running_it(tiny_project, tmp_path):
    from kagglekit.errors import KKError
    from kagglekit.kernel.plan import meta_model
    from kagglekit.modeling import count_parameters, load_tokenizer

    marker = _backbone_with_code(tiny_project / "deberta", tmp_path / "evil", "kk-evil")
    for load in (load_tokenizer, lambda p: meta_model(p, 3)):
        with pytest.raises(KKError, match="auto_map"):
            load(str(tmp_path / "evil"))
    assert count_parameters(str(tmp_path / "evil")) is None and not marker.exists()
    # A native architecture whose folder still lists its old custom code (as Phi-3's does) loads with transformers' own classes.
    native = _backbone_with_code(tiny_project / "deberta", tmp_path / "native", "deberta-v2")
    assert load_tokenizer(str(tmp_path / "native")) is not None and count_parameters(str(tmp_path / "native")) > 0
    assert not native.exists()


# Case 3: no command writes over one of its own inputs, --force or not, through a link or not.
def test_no_command_overwrites_its_own_input(tiny_run, tiny_project, synth_train, tmp_path):
    import hashlib

    test = tmp_path / "test.csv"
    shutil.copy(tiny_project / "test.csv", test)
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    link = tmp_path / "link.csv"
    link.symlink_to(synth_train)
    files = (synth_train, test, src)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for args in (["data", "import", "pairs", src, "--out", synth_train, "--train", synth_train, "--test", test, "--force"],
                 ["data", "import", "pairs", src, "--out", src, "--no-dedup", "--force"],
                 ["make-folds", "--train", synth_train, "--out", synth_train, "--force"],
                 ["make-folds", "--train", synth_train, "--out", link, "--force"],
                 ["ensemble", "--run", tiny_run, "--test", test, "--out", test, "--force"]):
        r = run_cli(*args)
        assert r.exit_code != 0 and "is the input" in r.output and "Traceback" not in r.output, (args, r.output)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} and link.is_symlink()


# Case 11: a study is named like a config; its trial folders and --keep-best-only stay under --runs.
@pytest.mark.parametrize("study", ["../elsewhere/x", "/tmp/kk-abs-study", "..", "a\\\\b"])
def test_tune_refuses_a_study_name_that_is_a_path(study, tmp_path):
    from conftest import REPO

    for args in (["--config", REPO / "configs/tiny.yaml", "--n-trials", "1"], ["--best"]):
        r = run_cli("tune", *args, "--study", study, "--runs", tmp_path / "runs", "--keep-best-only" if "--n-trials" in args else "--force")
        assert r.exit_code != 0 and "--study" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "runs").exists()


# Case 10: a tokenizer with more tokens than the model's embeddings is refused before training, not mid-run.
def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_training(tiny_project, tmp_path):
    from conftest import REPO

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_project / "deberta", backbone)
    conf = json.loads((backbone / "config.json").read_text())
    conf["vocab_size"] = 100  # the checkpoint's 600 rows are refused as mismatched and 100 fresh ones made
    (backbone / "config.json").write_text(json.dumps(conf))
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--run", tmp_path / "run",
                "--train", tiny_project / "train.csv", "--folds", tiny_project / "folds.csv",
                "--set", f"model.backbone={backbone}", "--set", "model.max_length=64", "--set", "train.max_steps=2")
    assert r.exit_code != 0 and "Traceback" not in r.output and "100 rows" in r.output, r.output
    assert not list((tmp_path / "run").glob("fold_0/*.safetensors"))


# Case 9: kk kernel --plan --rows FILE reads the file or refuses it; a short run folder still gets a valid slug.
def test_kernel_plan_refuses_rows_it_cannot_read_and_names_a_short_run(tiny_project, tmp_path):
    from kernel_fakes import make_fake_run

    run = make_fake_run(tiny_project, tmp_path / "t1", (0,), "llama")
    (tmp_path / "no_text.csv").write_text("id,x\n1,2\n")
    (tmp_path / "utf16.csv").write_bytes((tiny_project / "test.csv").read_text().encode("utf-16"))
    (tmp_path / "folder").mkdir()
    for rows in ("missing.csv", "folder", "no_text.csv", "utf16.csv"):
        r = run_cli("kernel", "--run", run, "--name", "plan-test", "--plan", "--rows", tmp_path / rows)
        assert r.exit_code != 0 and "--rows" in r.output and "Traceback" not in r.output, (rows, r.output)
    r = run_cli("kernel", "--run", run, "--plan", "--rows", tiny_project / "test.csv")
    assert r.exit_code == 0, r.output
