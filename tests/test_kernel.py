from __future__ import annotations

import json
import os
import stat

import nbformat
import pandas as pd
import pytest

from conftest import run_cli
from kagglekit.errors import KKError
from kagglekit.kernel import CELL_FIND, build_kernel, dry_run, push

SECRET = "0123456789abcdef-super-secret-key"


@pytest.fixture(scope="module")
def kernel_dir(tiny_run, tmp_path_factory):
    home = tmp_path_factory.mktemp("kaggle-home")
    (home / "kaggle.json").write_text(json.dumps({"username": "alice", "key": SECRET}))
    old = os.environ.get("KAGGLE_CONFIG_DIR")
    os.environ["KAGGLE_CONFIG_DIR"] = str(home)
    os.environ.pop("KAGGLE_USERNAME", None)
    try:
        out = build_kernel([tiny_run], "Tiny Test", tmp_path_factory.mktemp("kernels") / "tiny-test")
    finally:
        if old is None:
            os.environ.pop("KAGGLE_CONFIG_DIR", None)
        else:
            os.environ["KAGGLE_CONFIG_DIR"] = old
    return out


def test_notebook_and_metadata(kernel_dir):
    nb = nbformat.read(str(kernel_dir / "kernel" / "tiny-test.ipynb"), as_version=4)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5) and all("id" in c for c in nb.cells)
    meta = json.loads((kernel_dir / "kernel" / "kernel-metadata.json").read_text())
    assert meta == {
        "id": "alice/tiny-test",
        "title": "tiny-test",
        "code_file": "tiny-test.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "machine_shape": "NvidiaTeslaT4",
        "enable_internet": False,
        "dataset_sources": ["alice/tiny-test-artifacts", "alice/tiny-test-wheels"],
        "competition_sources": ["llm-classification-finetuning"],
        "kernel_sources": [],
        "model_sources": [],
    }
    for ds in ("tiny-test-artifacts", "tiny-test-wheels"):
        dm = json.loads((kernel_dir / "datasets" / ds / "dataset-metadata.json").read_text())
        assert dm["id"] == f"alice/{ds}" and dm["licenses"] and dm["title"]
    assert list((kernel_dir / "datasets" / "tiny-test-wheels").glob("kagglekit-*.whl"))
    manifest = json.loads((kernel_dir / "datasets" / "tiny-test-artifacts" / "kk_manifest.json").read_text())
    assert manifest["runs"][0]["folds"] == [0, 1, 2] and "path" in manifest["runs"][0]["backbone"]
    assert not list(kernel_dir.rglob("checkpoint"))


def test_credentials_are_never_copied(kernel_dir):
    for f in kernel_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert SECRET.encode() not in data, f


def test_dry_run_offline_on_the_real_test_file(kernel_dir, shared_arena):
    res = dry_run(kernel_dir, shared_arena / "test.csv")
    sub = pd.read_csv(res["submission"], dtype={"id": str})
    sample = pd.read_csv(shared_arena / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns) and sub["id"].tolist() == sample["id"].tolist()
    assert res["passes_per_row"] == 6 and res["estimate_hidden_h"] > 0
    est = res["model_estimate"]  # from the model's size and the test's tokens, not from this CPU's speed
    assert est is not None and est["runs"][0]["passes"] == 6 and est["runs"][0]["mean_tokens"] > 10
    # 2 x params x tokens x passes x 25,000 rows, plus attention: the FLOPs follow the formula, not a timing
    r = est["runs"][0]
    assert est["tflop"] >= 2 * r["params"] * r["mean_tokens"] * 6 * 25_000 / 1e12
    assert 0 < est["hours"] < 1 and "T4" in est["assumption"]


def test_dry_run_synthetic_fallback_is_offline(kernel_dir):
    res = dry_run(kernel_dir)
    assert res["rows"] == 50
    if res["network"] == "isolated":
        # The kernel could not have reached anything: prove the namespace really has no network.
        import subprocess

        probe = subprocess.run(["unshare", "-n", "python3", "-c", "import socket; socket.create_connection(('1.1.1.1', 443), 2)"],
                               capture_output=True, text=True)
        assert probe.returncode != 0


@pytest.mark.parametrize("layout", ["classic", "competitions", "datasets"])
def test_notebook_finds_inputs_in_every_mount_layout(tmp_path, layout, monkeypatch):
    root = tmp_path / "kaggle"
    comp = {"classic": "input/llm-classification-finetuning", "competitions": "input/competitions/llm-classification-finetuning",
            "datasets": "input/competitions/llm-classification-finetuning"}[layout]
    art = {"classic": "input/x-artifacts", "competitions": "input/x-artifacts", "datasets": "input/datasets/alice/x-artifacts"}[layout]
    whl = {"classic": "input/x-wheels", "competitions": "input/x-wheels", "datasets": "input/datasets/alice/x-wheels"}[layout]
    for d, files in ((comp, ["test.csv", "sample_submission.csv"]), (art, ["kk_manifest.json"]), (whl, ["kk_wheels.json"])):
        (root / d).mkdir(parents=True)
        for f in files:
            (root / d / f).write_text("x")
    # a decoy test.csv without a sample submission beside it must not be taken for the competition's
    (root / "input" / "aaa-other").mkdir()
    (root / "input" / "aaa-other" / "test.csv").write_text("x")
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    ns: dict = {}
    exec(CELL_FIND, ns)
    assert ns["COMPETITION"] == root / comp and ns["ARTIFACTS"] == root / art and ns["WHEELS"] == root / whl


def test_push_uses_the_kaggle_cli_with_zip_dir_mode(kernel_dir, tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "kaggle"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho ok\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    push(kernel_dir)
    calls = log.read_text().splitlines()
    assert sum("datasets create" in c and "--dir-mode zip" in c for c in calls) == 2
    assert calls[-1].startswith("kernels push -p") and calls[-1].endswith("kernel")


def test_push_without_the_kaggle_cli(kernel_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KKError, match="kaggle CLI is not installed"):
        push(kernel_dir)


def test_errors_are_one_line(kernel_dir, tiny_run, tiny_project, tmp_path):
    r = run_cli("kernel", "--run", tmp_path / "nope", "--name", "x-y-z", "--user", "bob", "--out", tmp_path / "k")
    assert r.exit_code == 1 and "run folder" in r.stderr and "does not exist" in r.stderr
    # a hub backbone cannot be reached offline: the build says what to do
    import shutil

    run = tmp_path / "hub"
    shutil.copytree(tiny_run, run)
    for cfg in run.glob("fold_*/config.yaml"):
        cfg.write_text(cfg.read_text().replace(str(tiny_project / "deberta"), "microsoft/deberta-v3-base"))
    r = run_cli("kernel", "--run", run, "--name", "hub-kernel", "--user", "bob", "--out", tmp_path / "k2")
    assert r.exit_code == 1 and "--backbone-source" in r.stderr
    r = run_cli("kernel", "--run", run, "--name", "hub-kernel", "--user", "bob", "--out", tmp_path / "k3",
                "--backbone-source", "bob/deberta-v3-base")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "k3" / "kernel" / "kernel-metadata.json").read_text())
    assert "bob/deberta-v3-base" in meta["dataset_sources"]
    # a test file lacking a column
    bad = pd.read_csv(tiny_project / "test.csv").drop(columns=["prompt"])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    r = run_cli("kernel", "--dry-run", kernel_dir, "--test", tmp_path / "bad.csv")
    assert r.exit_code == 1 and "missing column prompt" in r.stderr and "Traceback" not in r.output
    r = run_cli("kernel", "--run", tiny_run, "--name", "Tiny Test", "--user", "bob", "--out", kernel_dir)
    assert r.exit_code == 1 and "--force" in r.stderr


def test_unsupported_gpu_is_one_line(monkeypatch):
    import torch

    from kagglekit.kernel.offline import check_gpus_usable

    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla P100-PCIE-16GB")
    with pytest.raises(KKError, match=r"sm_60\) is not supported .*NvidiaTeslaT4"):
        check_gpus_usable()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    check_gpus_usable()


@pytest.mark.parametrize("layout", ["classic", "competitions", "datasets"])
def test_competition_wins_over_a_decoy_dataset_with_the_same_files(tmp_path, monkeypatch, layout):
    root = tmp_path / "kaggle"
    comp = {"classic": "input/llm-classification-finetuning", "competitions": "input/competitions/llm-classification-finetuning",
            "datasets": "input/competitions/llm-classification-finetuning"}[layout]
    decoy = {"classic": "input/aaa-decoy", "competitions": "input/aaa-decoy", "datasets": "input/datasets/bob/aaa-decoy"}[layout]
    for d in (comp, decoy):
        (root / d).mkdir(parents=True)
        for f in ("test.csv", "sample_submission.csv"):
            (root / d / f).write_text("x")
    for d, f in (("input/a", "kk_manifest.json"), ("input/w", "kk_wheels.json")):
        (root / d).mkdir(parents=True)
        (root / d / f).write_text("x")
    from kagglekit.kernel.notebook import make_notebook

    cell = make_notebook("x").cells[1].source
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    ns: dict = {}
    exec(cell, ns)
    assert ns["COMPETITION"] == root / comp
    # two candidates and neither is the competition: a clear error listing both
    import shutil

    shutil.rmtree(root / comp)
    (root / "input" / "zzz-decoy2").mkdir()
    for f in ("test.csv", "sample_submission.csv"):
        (root / "input" / "zzz-decoy2" / f).write_text("x")
    with pytest.raises(RuntimeError, match="2 folders .* hold test.csv"):
        exec(cell, {})


def test_backbone_lookup_follows_the_recorded_name(tmp_path):
    from kagglekit.kernel.offline import check_source_handle, find_backbone

    inp = tmp_path / "input"
    for d in ("datasets/alice/deberta-models/deberta-base", "datasets/alice/deberta-models/deberta-v3-base",
              "models/google/gemma-2/transformers/gemma-2-9b/1"):
        (inp / d).mkdir(parents=True)
        (inp / d / "config.json").write_text("{}")
    got = find_backbone(inp, "alice/deberta-models", "microsoft/deberta-v3-base")
    assert got == inp / "datasets/alice/deberta-models/deberta-v3-base"  # not the alphabetically first deberta-base
    with pytest.raises(KKError, match="2 model folders could be"):
        find_backbone(inp, "alice/deberta-models", None)
    assert find_backbone(inp, "google/gemma-2/transformers/gemma-2-9b/1", "google/gemma-2-9b") == \
        inp / "models/google/gemma-2/transformers/gemma-2-9b/1"
    with pytest.raises(KKError, match="not attached"):
        find_backbone(inp, "carol/nothing", "x")
    assert check_source_handle("google/gemma-2/transformers/gemma-2-9b/1")
    for bad in ("gemma-2", "google/gemma-2/transformers", "google/gemma-2/transformers/9b/latest"):
        with pytest.raises(KKError, match="owner/model/framework/variation/version"):
            check_source_handle(bad)


def test_quantized_run_needs_bitsandbytes_in_the_kernel(tiny_project, tmp_path, monkeypatch):
    """Kaggle's image has no bitsandbytes: the wheel travels with the kernel, or the build refuses in one line."""
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_config
    from kagglekit.train import train_fold

    run = tmp_path / "q4"
    train_fold(tiny_config(tiny_project, "model.quantization=4bit", "train.max_steps=1"), 0, run)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no download possible: the refusal names what to attach
    with pytest.raises(KKError, match="no bitsandbytes.*--wheel bitsandbytes-"):
        build_kernel([run], "q4-kernel", tmp_path / "k1", folds="0")
    assert not (tmp_path / "k1").exists()
    from test_kernel_inputs import make_wheel

    fake = make_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "bitsandbytes")
    out = build_kernel([run], "q4-kernel", tmp_path / "k2", folds="0", extra_wheels=[fake])
    wheels = json.loads((out / "datasets/q4-kernel-wheels/kk_wheels.json").read_text())["wheels"]
    assert fake.name in wheels
    manifest = json.loads((out / "datasets/q4-kernel-artifacts/kk_manifest.json").read_text())
    versions = manifest["runs"][0]["versions"]
    assert manifest["runs"][0]["quantization"] == "4bit" and versions["transformers"] and versions["torch"]


def test_version_mismatch_is_warned(capsys):
    from kagglekit.versions import library_versions, major_mismatches

    here = library_versions()
    old = dict(here, transformers="4.57.6")
    assert major_mismatches(here, here) == []
    assert major_mismatches(old, here) == [f"transformers 4.57.6 (trained) vs {here['transformers']} (here)"]


# Kaggle's image (docker-python, 2026-08) as far as this machine can reproduce it: its transformers, peft,
# tokenizers, accelerate, pandas and numpy exactly. Nearest used: Python 3.11 (this machine's; the image
# has 3.12) and torch 2.13.0 CPU (the build on this disk; the image has 2.10/2.11 for CUDA 12.8).
KAGGLE_PINS = ["transformers==5.0.0", "peft==0.19.1", "tokenizers==0.22.2", "accelerate==1.13.0", "pandas==2.2.2",
               "numpy==2.0.2", "pydantic>=2.12,<2.13", "pyyaml==6.0.3", "rich", "scipy", "scikit-learn", "safetensors",
               "sentencepiece", "ipykernel"]


@pytest.mark.slow
def test_dry_run_under_kaggles_package_versions(kernel_dir, tmp_path_factory):
    """The kernel, installed the way the notebook installs it (--no-index --no-deps from the wheels
    dataset), runs under Kaggle's library versions in a venv of its own, offline."""
    import subprocess
    import sys
    import venv

    env_dir = os.environ.get("KK_KAGGLE_VENV") or str(tmp_path_factory.mktemp("kaggle-venv") / "venv")
    py = os.path.join(env_dir, "bin", "python")
    if not os.path.exists(py):
        venv.create(env_dir, with_pip=True)
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for args in (["torch==2.13.0"], KAGGLE_PINS):
            r = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200)
            if r.returncode != 0:
                pytest.fail(f"cannot build the Kaggle-versions venv: {(r.stderr or r.stdout)[-1500:]}")
    versions = subprocess.run([py, "-c", "import transformers, peft, tokenizers; print(transformers.__version__, peft.__version__, "
                                         "tokenizers.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    assert versions == ["5.0.0", "0.19.1", "0.22.2"]
    assert "kagglekit" not in subprocess.run([py, "-m", "pip", "list"], capture_output=True, text=True).stdout
    res = dry_run(kernel_dir, python=py)
    assert res["rows"] == 50 and sys.executable != py
    sub = pd.read_csv(res["submission"])
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert (sub.iloc[:, 1:].sum(axis=1) - 1).abs().max() < 1e-6


def test_dry_run_python_without_ipykernel(kernel_dir, tmp_path):
    with pytest.raises(KKError, match="--python .*not a Python that can run the notebook"):
        dry_run(kernel_dir, python=str(tmp_path / "no-python"))
