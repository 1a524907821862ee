from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_cli, tiny_config
from kagglekit.errors import KKError
from kagglekit.train import Interrupted, plan_batches, train_fold

FOLD_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml", "metrics.json",
              "oof.csv", "oof_no_tta.csv", "train_log.csv"]


def _fold_ids(project, k):
    folds = pd.read_csv(project / "folds.csv", dtype={"id": str})
    return set(folds.loc[folds["fold"] == k, "id"])


def test_deberta_fold_leaves_a_complete_run_folder(tiny_run, tiny_project):
    for k in range(3):
        d = tiny_run / f"fold_{k}"
        for f in FOLD_FILES:
            assert (d / f).exists(), f
        assert not (d / "checkpoint").exists()
        oof = pd.read_csv(d / "oof.csv", dtype={"id": str})
        assert list(oof.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
        assert set(oof["id"]) == _fold_ids(tiny_project, k) and oof["id"].is_unique
        np.testing.assert_allclose(oof.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-9)
        m = json.loads((d / "metrics.json").read_text())
        for key in ("val_log_loss", "val_log_loss_no_tta", "val_accuracy", "val_per_class_accuracy", "swap_flip_rate",
                    "best_step", "epochs_run", "wall_time_s", "train_samples_per_s", "truncation"):
            assert key in m
        assert 0 <= m["truncation"]["train"]["share_truncated"] <= 1
        assert set(m["truncation"]["train"]["retention"]) == {"prompt", "response_a", "response_b"}
        log = pd.read_csv(d / "train_log.csv")
        assert list(log.columns) == ["step", "epoch", "lr", "train_loss", "val_loss"] and log["val_loss"].notna().any()
    # the saved config rebuilds the fold: adapter config names the pooler and classifier as trained heads
    adapter = json.loads((tiny_run / "fold_0" / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) >= {"classifier", "pooler"}


def test_pooler_is_trained_and_saved(tiny_run, tiny_project):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    saved = load_file(str(tiny_run / "fold_0" / "adapter_model.safetensors"))
    pooler = [k for k in saved if "pooler" in k and k.endswith("dense.weight")]
    assert pooler, list(saved)[:10]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_project / "deberta", num_labels=3)
    assert not np.allclose(saved[pooler[0]].numpy(), base.pooler.dense.weight.detach().numpy())


def test_decoder_backbone_trains(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "train.max_steps=3", arch="llama")
    m = train_fold(cfg, 1, tmp_path / "run")
    assert m["steps"] == 3
    oof = pd.read_csv(tmp_path / "run" / "fold_1" / "oof.csv", dtype={"id": str})
    assert set(oof["id"]) == _fold_ids(tiny_project, 1)


def test_it_learns(tmp_path):
    """On data with a learnable signal the fold ends clearly below the class prior: fails when training is broken."""
    from kagglekit.config import load_config
    from kagglekit.data import load_train
    from kagglekit.folds import make_folds
    from kagglekit.synthetic import make_synthetic
    from kagglekit.tiny import build_tiny_model

    make_synthetic(600, seed=1).to_csv(tmp_path / "train.csv", index=False)
    make_folds(load_train(tmp_path / "train.csv")[0], 3, 42).to_csv(tmp_path / "folds.csv", index=False)
    build_tiny_model(tmp_path / "model", "deberta-v2", str(tmp_path / "train.csv"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.train={tmp_path / 'train.csv'}",
                                                      f"data.folds={tmp_path / 'folds.csv'}",
                                                      f"model.backbone={tmp_path / 'model'}"])
    m = train_fold(cfg, 0, tmp_path / "run")
    assert m["val_log_loss"] < m["prior_log_loss"] - 0.1, m


def test_cpu_training_is_deterministic(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "train.max_steps=4", "lora.dropout=0.1")
    train_fold(cfg, 0, tmp_path / "a")
    train_fold(cfg, 0, tmp_path / "b")
    assert (tmp_path / "a/fold_0/oof.csv").read_bytes() == (tmp_path / "b/fold_0/oof.csv").read_bytes()


def test_resume_continues_from_the_checkpoint_exactly(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "train.epochs=2", "train.eval_every=3", "lora.dropout=0.1")
    full = train_fold(cfg, 2, tmp_path / "full")

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="continue with --resume"):
        train_fold(cfg, 2, tmp_path / "cut", on_step=interrupt)
    assert (tmp_path / "cut/fold_2/checkpoint/state.pt").exists()
    assert not (tmp_path / "cut/fold_2/metrics.json").exists()
    with pytest.raises(KKError, match="unfinished run; pass --resume"):
        train_fold(cfg, 2, tmp_path / "cut")
    resumed = train_fold(cfg, 2, tmp_path / "cut", resume=True)
    log = pd.read_csv(tmp_path / "cut/fold_2/train_log.csv")
    assert log["step"].tolist() == list(range(1, full["steps"] + 1))  # no step repeated or lost
    assert resumed["val_log_loss"] == full["val_log_loss"]
    assert (tmp_path / "cut/fold_2/oof.csv").read_bytes() == (tmp_path / "full/fold_2/oof.csv").read_bytes()


def test_finished_fold_is_not_overwritten(tiny_run, tiny_project):
    before = (tiny_run / "fold_0" / "oof.csv").read_bytes()
    with pytest.raises(KKError, match="already trained .* --force"):
        train_fold(tiny_config(tiny_project), 0, tiny_run)
    assert (tiny_run / "fold_0" / "oof.csv").read_bytes() == before
    with pytest.raises(KKError, match="nothing to resume"):
        train_fold(tiny_config(tiny_project), 1, tiny_run.parent / "other", resume=True)


def test_swap_batches_keep_pairs_together():
    lengths = [5, 9, 3, 7, 5, 9, 3, 7]
    units = [[i, i + 4] for i in range(4)]
    plan = plan_batches(lengths, units, 4, seed=0, epoch=0)
    for b in plan:
        for i in b:
            partner = i + 4 if i < 4 else i - 4
            assert partner in b
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert plan == plan_batches(lengths, units, 4, seed=0, epoch=0)
    assert plan_batches(lengths, [[i] for i in range(8)], 2, 0, 0) != plan_batches(lengths, [[i] for i in range(8)], 2, 0, 1)


def test_swap_augmented_targets_are_mapped(tiny_project, tmp_path, monkeypatch):
    """Train with swap_same_batch: every batch holds a pair and its mirror with A/B labels exchanged."""
    import torch.nn.functional as F

    seen = []
    real = F.cross_entropy

    def spy(logits, target, **kw):
        seen.append(target.detach().clone())
        return real(logits, target, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    cfg = tiny_config(tiny_project, "train.max_steps=2", "train.swap_same_batch=true", "train.batch_size=4")
    train_fold(cfg, 0, tmp_path / "run")
    t = seen[0].tolist()  # hard class per row (A 0, B 1, tie 2)
    assert len(t) == 4
    # rows come as (original, swapped) pairs sharing a length; their labels mirror A and B, a tie stays a tie
    for c in t:
        assert [1, 0, 2][c] in t
    assert t.count(0) == t.count(1)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_qlora_loads_and_trains_one_step(tiny_project, tmp_path, quant):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tiny_project, f"model.quantization={quant}", "train.max_steps=1")
    m = train_fold(cfg, 0, tmp_path / quant)
    assert m["steps"] == 1 and np.isfinite(m["val_log_loss"])


def test_gradient_checkpointing_trains_with_lora(tiny_project, tmp_path):
    m = train_fold(tiny_config(tiny_project, "model.gradient_checkpointing=true", "train.max_steps=2"), 0, tmp_path / "run")
    assert m["steps"] == 2 and np.isfinite(m["val_log_loss"])


def test_full_finetuning_saves_full_weights(tiny_project, tmp_path):
    cfg = tiny_config(tiny_project, "lora.enabled=false", "train.max_steps=1")
    train_fold(cfg, 0, tmp_path / "run")
    d = tmp_path / "run" / "fold_0"
    assert (d / "model.safetensors").exists() and not (d / "adapter_config.json").exists()


def test_soft_labels_distillation(tiny_project, tmp_path):
    train = pd.read_csv(tiny_project / "train.csv", dtype={"id": str})
    soft = pd.DataFrame({"id": train["id"], "winner_model_a": 0.5, "winner_model_b": 0.3, "winner_tie": 0.2})
    soft.to_csv(tmp_path / "soft.csv", index=False)
    m = train_fold(tiny_config(tiny_project, f"data.soft_labels={tmp_path / 'soft.csv'}", "train.max_steps=2"), 0, tmp_path / "run")
    assert m["steps"] == 2
    soft.iloc[:5].to_csv(tmp_path / "few.csv", index=False)
    with pytest.raises(KKError, match="no soft label for train id"):
        train_fold(tiny_config(tiny_project, f"data.soft_labels={tmp_path / 'few.csv'}"), 0, tmp_path / "run2")


# --- bad input ----------------------------------------------------------------------------------------------------


def _errors(result) -> list[str]:
    """stderr lines that are not warnings: exactly one is expected."""
    return [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]


def test_fold_not_in_folds_file(tiny_project, tmp_path):
    r = run_cli("train", "--fold", "7", "--config", REPO / "configs/tiny.yaml", "--train", tiny_project / "train.csv",
                "--folds", tiny_project / "folds.csv", "--run", tmp_path / "r", "--set", f"model.backbone={tiny_project / 'deberta'}")
    assert r.exit_code == 1
    assert _errors(r) == [f"error: fold 7 is not in {tiny_project / 'folds.csv'} (folds: 0, 1, 2)"]


def test_missing_backbone(tiny_project, tmp_path):
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--train", tiny_project / "train.csv",
                "--folds", tiny_project / "folds.csv", "--run", tmp_path / "r", "--set", f"model.backbone={tmp_path / 'nope'}")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert _errors(r) == [f"error: model.backbone {tmp_path / 'nope'} does not exist"]


def test_non_finite_loss_stops_with_a_clear_message(tiny_project, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(tiny_project / "deberta", num_labels=3)
    with torch.no_grad():
        m.classifier.weight.fill_(float("nan"))
    m.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_project / "deberta").save_pretrained(tmp_path / "nan")
    r = run_cli("train", "--fold", "0", "--config", REPO / "configs/tiny.yaml", "--train", tiny_project / "train.csv",
                "--folds", tiny_project / "folds.csv", "--run", tmp_path / "r", "--set", f"model.backbone={tmp_path / 'nan'}")
    assert r.exit_code == 1
    assert "non-finite loss at step 1 of fold 0" in r.stderr and "Traceback" not in r.output


def test_ddp_with_torchrun_on_cpu(tiny_project, tmp_path):
    """Two DDP processes (gloo on CPU) train one fold; rank 0 writes the fold folder."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "kagglekit.cli", "--", "train", "--fold", "1",
           "--config", str(REPO / "configs/tiny.yaml"), "--train", str(tiny_project / "train.csv"),
           "--folds", str(tiny_project / "folds.csv"), "--run", str(tmp_path / "ddp"),
           "--set", f"model.backbone={tiny_project / 'deberta'}", "--set", "model.max_length=96",
           "--set", "train.max_steps=3", "--set", "train.grad_accum=2", "--set", "train.eval_every=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "KK_QUIET": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    d = tmp_path / "ddp" / "fold_1"
    m = json.loads((d / "metrics.json").read_text())
    assert m["steps"] == 3
    assert set(pd.read_csv(d / "oof.csv", dtype={"id": str})["id"]) == _fold_ids(tiny_project, 1)
    assert pd.read_csv(d / "train_log.csv")["step"].tolist() == [1, 2, 3]
