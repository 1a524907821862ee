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
    assert 0 < np.abs(q8 - fp).max() < 0.01  # 8-bit: probabilities within 0.01 of the fp model's
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
