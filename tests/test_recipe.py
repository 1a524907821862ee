"""The winners' recipe (issue 20): inference settings apart from training (predict.max_length / quantization /
precision, cached apart) and staged initialisation (model.init_from: an earlier fold, a 1-logit reward model,
a 2-class model)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.errors import KKError
from kagglekit.predict import predict_fold
from kagglekit.train import train_fold

COLS = ["winner_model_a", "winner_model_b", "winner_tie"]


def _oof_again(fold_dir, project):
    """The fold reloaded for inference, predicting its own validation rows: what its oof.csv says, if inference
    rebuilt the model the fold trained (base weights, adapter, heads)."""
    from kagglekit.data import load_train
    from kagglekit.predict import FoldModel

    train_df, _ = load_train(project / "train.csv")
    saved = pd.read_csv(fold_dir / "oof.csv", dtype={"id": str})
    val = train_df.set_index("id").loc[saved["id"]].reset_index()
    return FoldModel(fold_dir).predict(val)["probs"], saved[COLS].to_numpy()


# --- inference settings apart from training ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_4bit_fold_predicts_at_8bit_and_at_256_tokens_each_cached_apart(tiny_project, tmp_path):
    pytest.importorskip("bitsandbytes")
    from kagglekit.predict import FoldModel

    run, test = tmp_path / "run", tiny_project / "test.csv"
    cfg = tiny_config(tiny_project, "model.quantization=4bit", "model.max_length=128", "train.max_steps=2", arch="llama")
    train_fold(cfg, 0, run)
    fold = run / "fold_0"
    trained_yaml = (fold / "config.yaml").read_bytes()

    as_trained = predict_fold(run, 0, test)
    at_8bit = predict_fold(run, 0, test, overrides=["predict.quantization=8bit"])
    at_256 = predict_fold(run, 0, test, overrides=["predict.max_length=256"])
    assert (fold / "config.yaml").read_bytes() == trained_yaml  # no fold's config.yaml is edited
    csvs = sorted(p.name for p in fold.glob("test*.csv"))
    assert len(csvs) == 3 and "test.csv" in csvs
    metas = [json.loads(p.read_text()) for p in fold.glob("test*.json")]
    assert sorted((m["inference"]["max_length"], m["inference"]["quantization"]) for m in metas) == [
        (128, "4bit"), (128, "8bit"), (256, "4bit")]
    trunc = {m["inference"]["max_length"]: m["truncation"]["share_truncated"] for m in metas if m["inference"]["quantization"] == "4bit"}
    assert trunc[256] < trunc[128]  # the truncation rules applied at the new length
    p = {k: df[COLS].to_numpy() for k, df in (("4bit", as_trained), ("8bit", at_8bit), ("256", at_256))}
    assert not np.allclose(p["4bit"], p["8bit"], atol=1e-7) and not np.allclose(p["4bit"], p["256"], atol=1e-7)
    assert all(np.allclose(v.sum(1), 1) for v in p.values())

    # each setting is reused from its own cache (the model does not run again), through the CLI too
    mtimes = {f: (fold / f).stat().st_mtime_ns for f in csvs}
    pd.testing.assert_frame_equal(predict_fold(run, 0, test, overrides=["predict.quantization=8bit"]), at_8bit)
    r = run_cli("predict", "--run", run, "--fold", 0, "--test", test, "--set", "predict.max_length=256")
    assert r.exit_code == 0, r.output
    r = run_cli("ensemble", "--run", run, "--folds", "0", "--test", test, "--out", tmp_path / "sub.csv",
                "--set", "predict.quantization=8bit", "--no-fit")
    assert r.exit_code == 0, r.output
    assert {f: (fold / f).stat().st_mtime_ns for f in csvs} == mtimes
    sub = pd.read_csv(tmp_path / "sub.csv")
    np.testing.assert_allclose(sub[COLS].to_numpy(), p["8bit"] / p["8bit"].sum(1, keepdims=True), atol=1e-6)

    # what was loaded: 8-bit layers under the 4-bit-trained adapter, the formatter at 256 tokens
    import bitsandbytes as bnb

    fm = FoldModel(fold, overrides=["predict.quantization=8bit", "predict.max_length=256"])
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in fm.model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in fm.model.modules())
    assert fm.formatter.max_length == 256 and FoldModel(fold).formatter.max_length == 128

    # only predict.* keys, one line
    for cmd in (["predict", "--fold", 0], ["ensemble", "--folds", "0"]):
        r = run_cli(*cmd, "--run", run, "--test", test, "--set", "model.max_length=64")
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.stderr.strip().splitlines() == [
            f"error: config error: --set model.max_length=64: kk {cmd[0]} takes only predict.* keys (e.g. "
            "predict.max_length=8192, predict.quantization=8bit); the fold's other settings are fixed by its training"]


@pytest.mark.slow
def test_kernel_carries_the_inference_settings(tiny_project, tmp_path):
    """kk kernel --set predict.*: the kernel's copy of each fold's config holds them (the run's stays as trained), so
    the notebook's FoldModel predicts at them."""
    from kagglekit.kernel import build_kernel
    from kagglekit.predict import FoldModel
    from kagglekit.runs import fold_config

    run = tmp_path / "run"
    train_fold(tiny_config(tiny_project, "train.max_steps=1"), 0, run)
    before = (run / "fold_0" / "config.yaml").read_bytes()
    with pytest.raises(KKError, match="kk kernel takes only predict"):
        build_kernel([run], "tiny-set", tmp_path / "bad", user="alice", folds=[0], overrides=["train.lr=1"])
    out = build_kernel([run], "tiny-set", tmp_path / "k", user="alice", folds=[0],
                       overrides=["predict.max_length=128", "predict.precision=fp32"])
    art = out / "datasets" / "tiny-set-artifacts"
    copied = art / "run" / "fold_0"
    cfg = fold_config(copied)
    assert (cfg.predict.max_length, cfg.predict.precision, cfg.model.max_length) == (128, "fp32", 96)
    assert (run / "fold_0" / "config.yaml").read_bytes() == before
    manifest = json.loads((art / "kk_manifest.json").read_text())
    assert manifest["predict"] == ["predict.max_length=128", "predict.precision=fp32"]
    fm = FoldModel(copied, backbone=str(art / manifest["runs"][0]["backbone"]["path"]))
    assert fm.formatter.max_length == 128


def test_kernel_places_a_9b_model_by_its_inference_quantization(tmp_path):
    """A 9B model trained in half precision does not fit one T4 (the plan splits it over both); predicted at 8-bit
    (--set predict.quantization=8bit, the fold's config.yaml untouched) a copy fits each T4."""
    from transformers import Gemma2Config

    from kagglekit.kernel.build import kernel_plan
    from kagglekit.runs import Run, open_fold

    big = tmp_path / "gemma-2-9b"
    Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256, vocab_size=256000).save_pretrained(big)
    fold = tmp_path / "run" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "config.yaml").write_text(f"model:\n  backbone: {big}\n  quantization: none\n  max_length: 64\n")
    before = (fold / "config.yaml").read_text()
    run_folds = [Run(fold.parent, [open_fold(fold)])]
    as_trained = kernel_plan(run_folds, None, "NvidiaTeslaT4", 8.0)[0]
    at_8bit = kernel_plan(run_folds, None, "NvidiaTeslaT4", 8.0, overrides=["predict.quantization=8bit"])[0]
    assert as_trained["placement"].kind == "split" and as_trained["quantization"] == "none"
    assert at_8bit["placement"].kind == "per_gpu" and at_8bit["quantization"] == "8bit"
    assert (fold / "config.yaml").read_text() == before


# --- staged initialisation -----------------------------------------------------------------------------------------------

def _checkpoint_with_labels(src, dst, num_labels: int, perturb: str):
    """A sequence-classification checkpoint of ``src``'s architecture with ``num_labels`` outputs (a reward model's 1
    logit, a 2-class model) whose ``perturb`` weights differ from ``src``'s, so it is clear which weights a model got."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels, ignore_mismatched_sizes=True)
    with torch.no_grad():
        dict(model.named_parameters())[perturb].mul_(-1.5)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.slow
def test_init_from_a_one_logit_reward_model(tiny_project, tmp_path, capsys):
    """The 3rd place started from a reward model: its 1-logit head is re-initialised (one line says so), every other
    weight is the checkpoint's, and the trained fold predicts on those same base weights."""
    import torch
    from safetensors.torch import load_file

    from kagglekit.modeling import build_model, load_tokenizer

    embed = "model.embed_tokens.weight"
    rm = _checkpoint_with_labels(tiny_project / "llama", tmp_path / "rm", 1, embed)
    cfg = tiny_config(tiny_project, f"model.init_from={rm}", "train.max_steps=2", "train.lr=0.01", arch="llama")
    model = build_model(cfg, load_tokenizer(str(tiny_project / "llama")), torch.device("cpu"))
    line = f"model.init_from {rm}: head of another size re-initialised (score.weight (1, 64) -> (3, 64))"
    assert line in capsys.readouterr().out.replace("\n", "")
    got = dict(model.named_parameters())["base_model.model." + embed]
    torch.testing.assert_close(got, load_file(str(rm / "model.safetensors"))[embed])
    assert not torch.allclose(got, load_file(str(tiny_project / "llama" / "model.safetensors"))[embed])

    train_fold(cfg, 0, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert metrics["init_from"] == {"kind": "weights", "path": str(rm)}
    again, saved = _oof_again(tmp_path / "run" / "fold_0", tiny_project)
    np.testing.assert_allclose(again, saved, atol=1e-5)  # inference rebuilt the reward model's weights + the adapter


@pytest.mark.slow
def test_init_from_a_two_class_encoder(tiny_project, tmp_path, capsys):
    """A 2-class DeBERTa: its classifier is re-initialised, its pooler (a head kagglekit trains) is kept."""
    import torch
    from safetensors.torch import load_file

    from kagglekit.modeling import build_model, load_tokenizer

    two = _checkpoint_with_labels(tiny_project / "deberta", tmp_path / "two", 2, "pooler.dense.weight")
    cfg = tiny_config(tiny_project, f"model.init_from={two}")
    model = build_model(cfg, load_tokenizer(str(tiny_project / "deberta")), torch.device("cpu"))
    out = capsys.readouterr().out.replace("\n", "")
    assert f"model.init_from {two}: head of another size re-initialised (" in out
    assert "classifier.bias (2,) -> (3,)" in out and "classifier.weight (2, 64) -> (3, 64)" in out and "pooler" not in out
    pooler = dict(model.named_parameters())["base_model.model.pooler.modules_to_save.default.dense.weight"]
    torch.testing.assert_close(pooler, load_file(str(two / "model.safetensors"))["pooler.dense.weight"])
    assert dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"].shape == (3, 64)


@pytest.mark.slow
def test_init_from_an_earlier_runs_same_fold(tiny_project, tmp_path, capsys):
    """The 2nd place's stage 2 -> 3: a fold starts from the same fold of an earlier run. Before any step, its
    evaluation is the earlier fold's OOF prediction; a head of another size is re-initialised; a misfit is one line."""
    import torch
    from safetensors.torch import load_file, save_file

    from kagglekit.modeling import build_model, load_tokenizer
    from kagglekit.train import evaluate, prepare_inputs, record_config, setup_training, start_session

    stage1 = tmp_path / "stage1"
    train_fold(tiny_config(tiny_project, "train.max_steps=3", "train.lr=0.01"), 1, stage1)
    cfg = tiny_config(tiny_project, f"model.init_from={stage1}/fold_{{fold}}", "train.max_steps=1")

    s = start_session(cfg, 1, tmp_path / "stage2-session", False)
    assert s.cfg.model.init_from == f"{stage1}/fold_1"  # {fold} filled in, and recorded so in the fold's config
    record_config(s)
    assert f"init_from: {stage1}/fold_1" in (tmp_path / "stage2-session" / "config.yaml").read_text()
    inputs = prepare_inputs(s.cfg, 1, s.fmt)
    setup_training(s, inputs)
    evaluate(s, inputs)
    earlier = pd.read_csv(stage1 / "fold_1" / "oof.csv", dtype={"id": str})
    assert earlier["id"].tolist() == inputs.val_df["id"].tolist()
    np.testing.assert_allclose(s.best["probs"], earlier[COLS].to_numpy(), atol=1e-6)

    m = train_fold(cfg, 1, tmp_path / "stage2")
    assert m["init_from"] == {"kind": "adapter", "path": str(stage1 / "fold_1")} and m["steps"] == 1
    shutil.rmtree(stage1)  # the earlier stage is gone: the trained fold does not need it
    again, saved = _oof_again(tmp_path / "stage2" / "fold_1", tiny_project)
    np.testing.assert_allclose(again, saved, atol=1e-5)

    # an earlier fold whose head has another size (another task's 2 classes): re-initialised, the LoRA weights kept
    train_fold(tiny_config(tiny_project, "train.max_steps=1"), 0, tmp_path / "other")
    fold = tmp_path / "other" / "fold_0"
    weights = load_file(str(fold / "adapter_model.safetensors"))
    head = next(k for k in weights if k.endswith("classifier.weight"))
    weights[head] = weights[head][:2].contiguous()
    weights[head.replace("weight", "bias")] = weights[head.replace("weight", "bias")][:2].contiguous()
    save_file(weights, str(fold / "adapter_model.safetensors"))
    tok = load_tokenizer(str(tiny_project / "deberta"))
    capsys.readouterr()
    model = build_model(tiny_config(tiny_project, f"model.init_from={fold}"), tok, torch.device("cpu"))
    out = capsys.readouterr().out.replace("\n", "")
    assert f"model.init_from {fold}: head of another size re-initialised (" in out and "classifier.weight (2, 64) -> (3, 64)" in out
    live = dict(model.named_parameters())
    lora = next(k for k in weights if "lora_A" in k)
    torch.testing.assert_close(live[lora.replace("lora_A.weight", "lora_A.default.weight")], weights[lora])

    # what does not fit is one clear line
    with pytest.raises(KKError, match=r"adapter does not fit this model .*same backbone, lora.r and lora.target_modules"):
        build_model(tiny_config(tiny_project, f"model.init_from={fold}", "lora.r=4"), tok, torch.device("cpu"))
    with pytest.raises(KKError, match="is a LoRA fold: continue it with lora.enabled=true"):
        build_model(tiny_config(tiny_project, f"model.init_from={fold}", "lora.enabled=false"), tok, torch.device("cpu"))
    with pytest.raises(KKError, match=r"model.init_from .*nowhere/fold_2 does not exist"):
        train_fold(tiny_config(tiny_project, f"model.init_from={tmp_path}/nowhere/fold_{{fold}}"), 2, tmp_path / "x")
    assert not (tmp_path / "x" / "fold_2" / "metrics.json").exists()
    r = run_cli("train", "--fold", 2, "--config", REPO / "configs" / "tiny.yaml", "--run", tmp_path / "y",
                "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", f"model.init_from={tmp_path}")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [f"error: model.init_from {tmp_path}: neither a trained fold "
                                             "(adapter_config.json) nor a checkpoint (config.json)"]


# --- the per-round layout through training -------------------------------------------------------------------------------

@pytest.mark.slow
def test_rounds_layout_trains_and_reports_its_truncation(tiny_project, tmp_path):
    """model.layout=rounds through kk train: metrics.json's truncation report covers the rounds kept; validation is
    formatted at predict.max_length (as the test rows will be)."""
    from kagglekit.train import start_session

    cfg = tiny_config(tiny_project, "model.layout=rounds", "model.max_length=48", "train.max_steps=1",
                      "model.instruction=which is better")
    m = train_fold(cfg, 0, tmp_path / "run")
    for part in ("train", "val"):
        rounds = m["truncation"][part]["rounds"]
        assert 0 < rounds["share_rows_with_dropped_rounds"] < 1 and 0 < rounds["retention"] < 1 and rounds["mean_rounds"] > 1
    assert "rounds" not in train_fold(tiny_config(tiny_project, "train.max_steps=1"), 0, tmp_path / "blocks")["truncation"]["val"]
    s = start_session(tiny_config(tiny_project, "predict.max_length=128"), 0, tmp_path / "session", False)
    assert (s.fmt.max_length, s.eval_fmt.max_length) == (96, 128)
