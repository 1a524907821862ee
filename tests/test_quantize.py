"""kk quantize: a merged tiny llama in 8-bit GPTQ (compressed-tensors) predicts close to the fp model and runs in
the kernel's dry run; what cannot be quantized is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, tiny_config
from kagglekit.errors import KKError

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def merged_llama(tiny_project, tmp_path_factory):
    from kagglekit.merge import merge_run

    root = tmp_path_factory.mktemp("quant")
    from kagglekit.train import train_fold

    for k in (0, 1):
        train_fold(tiny_config(tiny_project, "train.max_steps=3", arch="llama"), k, root / "run")
    return merge_run(root / "run", root / "merged", method="delta", check_rows=0)


def _bare_wheel(folder, name):
    """A wheel of only the installed package's metadata (transformers checks compressed-tensors' version)."""
    import zipfile
    from importlib.metadata import version

    v = version(name)
    with zipfile.ZipFile(folder / f"{name}-{v}-py3-none-any.whl", "w") as z:
        for f, text in (("METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {v}\n"), ("WHEEL", "Wheel-Version: 1.0\n"), ("RECORD", "")):
            z.writestr(f"{name}-{v}.dist-info/{f}", text)
    return folder / f"{name}-{v}-py3-none-any.whl"


def test_gptq_solves_the_layer_better_than_rounding():
    import torch

    from kagglekit.quantize import gptq

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: where GPTQ beats round-to-nearest
    w = torch.randn(32, 64)
    q, s = gptq(w, x.T @ x / len(x), 4, 32)
    assert s.shape == (32, 2)
    grid = (q.reshape(32, 2, 32) / s[:, :, None])
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)  # on the scaled grid
    rtn = (w.reshape(32, 2, 32) / s[:, :, None]).round().clamp(-8, 7).mul(s[:, :, None]).reshape(32, 64)
    assert ((x @ (q - w).T) ** 2).mean() < 0.8 * ((x @ (rtn - w).T) ** 2).mean()


def test_quantized_merged_llama_predicts_close_and_runs_in_the_kernel(merged_llama, tiny_project, tmp_path, monkeypatch):
    from kagglekit.kernel import build_kernel, dry_run
    from kagglekit.predict import predict_fold

    r = run_cli("quantize", "--run", merged_llama, "--bits", "8", "--out", tmp_path / "q8", "--rows", "32", "--group-size", "32")
    assert r.exit_code == 0, r.output
    fold = tmp_path / "q8" / "fold_0"
    conf = json.loads((fold / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "compressed-tensors" and conf["format"] == "pack-quantized"
    assert conf["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert json.loads((fold / "metrics.json").read_text())["quantized"]["calibration_rows"] == 32
    fp = predict_fold(merged_llama, 0, tiny_project / "test.csv").iloc[:, 1:].to_numpy()
    q8 = predict_fold(tmp_path / "q8", 0, tiny_project / "test.csv").iloc[:, 1:].to_numpy()
    assert 0 < np.abs(q8 - fp).max() < 0.002  # 8-bit: within 0.002 of the fp model (measured 2.1e-4; 4-bit: 3.7e-3)
    from kagglekit.kernel.plan import THROUGHPUT, estimate_run
    from kagglekit.runs import open_run

    plans = [estimate_run(open_run(tmp_path / "q8").folds, str(fold), "NvidiaTeslaT4", tiny_project / "test.csv", o)
             for o in (None, ["predict.engine=vllm"])]  # HF decompresses it; vLLM serves the 8-bit weights
    assert [p["placement"].weights for p in plans] == ["fp32", "gptq8"]
    assert plans[1]["hours"]["total_h"] / plans[0]["hours"]["total_h"] == pytest.approx(1 / THROUGHPUT["gptq8"])
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no download: the refusal names the wheel to attach
    with pytest.raises(KKError, match="needs compressed-tensors.*--wheel compressed_tensors-"):
        build_kernel([tmp_path / "q8"], "q8-kernel", tmp_path / "k0")
    # metadata-only wheels: the dry run's Python imports the real packages, the kernel carries the names
    wheels = [_bare_wheel(tmp_path, n) for n in ("compressed_tensors", "loguru")]
    out = build_kernel([tmp_path / "q8"], "q8-kernel", tmp_path / "k", extra_wheels=wheels)
    manifest = json.loads((out / "datasets/q8-kernel-artifacts/kk_manifest.json").read_text())
    assert manifest["runs"][0]["gptq"] == 8 and manifest["runs"][0]["engine"] == "hf"
    res = dry_run(out, tiny_project / "test.csv")
    assert res["rows"] == 40


def test_what_cannot_be_quantized_is_one_line(merged_llama, tiny_project, tmp_path):
    r = run_cli("quantize", "--run", merged_llama.parent / "run", "--out", tmp_path / "a")
    assert r.exit_code == 1 and "is a LoRA adapter" in r.stderr
    r = run_cli("quantize", "--run", merged_llama, "--bits", "3", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "--bits must be 8 or 4" in r.stderr


class FakeVLLM:
    """A ``vllm`` module: ``LLM`` records what it receives and classifies with the HF model at the path."""

    def __init__(self):
        self.inits, self.calls = [], []
        fake = self

        class LLM:
            def __init__(self, model, **kw):
                import os

                from transformers import AutoModelForSequenceClassification
                fake.inits.append({"model": model, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), **kw})
                self.model = AutoModelForSequenceClassification.from_pretrained(model).eval()

            def classify(self, prompts, use_tqdm=True):
                from types import SimpleNamespace

                import torch

                fake.calls.append([p["prompt_token_ids"] for p in prompts])
                with torch.no_grad():
                    probs = [self.model(input_ids=torch.tensor([p["prompt_token_ids"]])).logits.softmax(-1)[0].tolist() for p in prompts]
                return [SimpleNamespace(outputs=SimpleNamespace(probs=p)) for p in probs]

        self.LLM = LLM


def test_vllm_engine_predicts_as_hf_in_length_sorted_chunks(merged_llama, tiny_project, monkeypatch):
    import sys

    import kagglekit.vllm_engine as ve
    from kagglekit.predict import predict_fold

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(ve, "CHUNK", 16)
    hf = predict_fold(merged_llama, 0, tiny_project / "test.csv").iloc[:, 1:].to_numpy()
    vl = predict_fold(merged_llama, 0, tiny_project / "test.csv", overrides=["predict.engine=vllm"]).iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(vl, hf, atol=1e-5)
    kw = fake.inits[0]
    assert kw["runner"] == "pooling" and kw["convert"] == "classify" and kw["enable_prefix_caching"] is True
    assert kw["dtype"] == "half" and kw["tensor_parallel_size"] == 1
    assert [len(c) for c in fake.calls] == [16, 16, 8] * 2  # both orders of the 40 rows
    lengths = [len(s) for c in fake.calls[:3] for s in c]
    assert lengths == sorted(lengths)


def test_vllm_engine_refusals_and_gpus(merged_llama, tmp_path, monkeypatch):
    import sys

    from cudasim import simulated_cuda

    from kagglekit.runs import open_fold
    from kagglekit.vllm_engine import VLLMEngine

    fold = open_fold(merged_llama / "fold_0")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(KKError, match="predict.engine=vllm needs vllm"):
        VLLMEngine([fold], device="cpu")
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    with simulated_cuda(devices=2, capability=(7, 5)):
        VLLMEngine([fold], device="cuda:1")
        VLLMEngine([fold], device="cuda:0", device_map={"model.layers.0": 0, "model.layers.1": 1})
        conf = json.loads((fold.path / "config.json").read_text())
        monkeypatch.setattr(json, "loads", lambda text, _l=json.loads: {**_l(text), "model_type": "gemma2"})
        with pytest.raises(KKError, match="no Gemma-2 logit softcap.*vllm #8929"):
            VLLMEngine([fold], device="cuda:0")
    assert conf["model_type"] == "llama"
    assert fake.inits[0]["visible"] == "1" and fake.inits[0]["tensor_parallel_size"] == 1
    assert fake.inits[1]["tensor_parallel_size"] == 2
    adapter = open_fold(merged_llama.parent / "run" / "fold_0")
    with pytest.raises(KKError, match="serves one plain model"):
        VLLMEngine([adapter], device="cpu")
