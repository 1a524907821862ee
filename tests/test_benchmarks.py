"""Smoke tests: each benchmark runs a couple of steps on CPU, so the scripts never rot.
(Speed targets live in the benchmarks themselves, never in tests.)"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "benchmarks"


def _run(*args, timeout=600, **extra_env):
    env = dict(os.environ, KK_QUIET="1", COLUMNS="200", **extra_env)
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def test_bench_infer_smoke():
    r = _run(sys.executable, BENCH / "bench_infer.py", "--data", "sim", "--rows", "6", "--max-length", "96", "--batch-size", "4",
             "--rounds", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    for contender in ("Trainer.predict", "bare sorted loop", "kagglekit max_tokens"):
        assert f"kagglekit/{contender} =" in r.stdout


def test_bench_train_smoke():
    r = _run(sys.executable, BENCH / "bench_train.py", "--data", "sim", "--rows", "8", "--steps", "2", "--max-length", "64",
             "--batch-size", "4", "--rounds", "1", "--contenders", "hf-trainer,bare-loop,kagglekit,naive")
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"kagglekit/{c} =" in r.stdout for c in ("hf-trainer", "bare-loop", "naive")), r.stdout[-2000:]


def test_bench_scaling_smoke():
    r = _run(sys.executable, BENCH / "bench_scaling.py", "--data", "sim", "--rows", "4", "--repeats", "1,2", "--lengths", "32,64",
             "--batch-size", "4", "--steps", "2", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2x rows: training" in r.stdout and "(linear = 2.00x)" in r.stdout


def test_bench_startup_smoke():
    kk = os.path.join(os.path.dirname(sys.executable), "kk")
    r = _run("bash", BENCH / "bench_startup.sh", "1", timeout=120, KK=kk, PY=sys.executable) if os.path.exists(kk) else None
    if r is None:
        import pytest

        pytest.skip("no kk entry point beside this python")
    assert "kk --help: best" in r.stdout and "ratio:" in r.stdout


def test_bench_quant_smoke():
    """fp32 and GPTQ 8-bit through HF measured on CPU; the bitsandbytes and vLLM rows say what they need and show the
    plan's factors."""
    r = _run(sys.executable, BENCH / "bench_quant.py", "--smoke", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped (no CUDA, or its library missing)" in r.stdout and "kernel plan's factor" in r.stdout
    assert "quantized/fp16 inference seq/s: gptq8 (hf) " in r.stdout and "under vLLM" not in r.stdout


def test_gpu_check_script_smoke():
    """The prepared GPU script at toy size on CPU: the real DeBERTa-v3-base architecture, one step each."""
    r = _run("bash", BENCH / "gpu_check.sh", "--smoke", timeout=1500, PY=sys.executable)  # this interpreter, venv or not
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "FAILED" not in r.stdout, r.stdout[-3000:]
    # 2 kagglekit-only runs + 1 vs HF + the host-sync run (grad_accum 8)
    assert r.stdout.count("samples/s ratios:") == 1 and r.stdout.count("one contender") == 3
    assert "kagglekit/Trainer.predict =" in r.stdout and "packed/padded training samples/s" in r.stdout
    # the Gemma-2 preset: trained at 4-bit, its adapter predicting at 8-bit
    assert "preset gemma2-9b-qlora: training" in r.stdout and "tokens/s at 4bit" in r.stdout and "tokens/s at 8bit" in r.stdout
    assert "gpu paths:" in r.stdout and "FAILED" not in r.stdout
    # the closing table: every step ran and ended ok
    table = r.stdout[r.stdout.index("gpu_check steps (budget"):].splitlines()[2:]
    assert len(table) == 9 and all(line.strip().startswith("ok\t") for line in table), table


def test_gpu_check_keeps_to_its_budget():
    """A device run has minutes: a step is stopped at the budget plus the grace, the rest are skipped, the table
    says which, and the exit status (2) tells "cut short" apart from a failure (1) and success (0)."""
    r = _run("bash", BENCH / "gpu_check.sh", "--smoke", timeout=300, PY=sys.executable,
             GPU_CHECK_BUDGET_S="1", GPU_CHECK_GRACE_S="1")
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    table = r.stdout[r.stdout.index("gpu_check steps (budget 1s"):].splitlines()[2:]
    assert table[0].strip().startswith("stopped (time)\t") and "gpu_paths.py" in table[0], table
    assert len(table) == 9 and all(line.strip().startswith("skipped\t-\t") for line in table[1:]), table
    assert "FAILED" not in r.stdout



def test_bench_distill_smoke(tmp_path):
    """The distillation benchmark end to end at toy size: teacher, leaky OOF labels, per-fold labels, three students."""
    r = _run(sys.executable, BENCH / "bench_distill.py", "--smoke", "--limit", "120", "--bootstrap", "50", "--workdir", tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for model in ("student: hard labels", "student: OOF soft labels (leaky)", "student: per-fold soft labels"):
        assert model in r.stdout, r.stdout[-3000:]
    assert "leak optimism" in r.stdout and "also labels" in r.stderr  # the leaky student was warned about
    assert sorted(p.name for p in (tmp_path / "labels").glob("fold_*.csv")) == ["fold_0.csv", "fold_1.csv"]
