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
    r = _run(sys.executable, BENCH / "bench_infer.py", "--n", "8", "--max-length", "128", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ratios: (c)/(a) =" in r.stdout and "length-sorted" in r.stdout


def test_bench_train_smoke():
    r = _run(sys.executable, BENCH / "bench_train.py", "--steps", "2", "--max-length", "128", "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ratio: kagglekit/naive samples/s =" in r.stdout and "GFLOPs/sample" in r.stdout


def test_bench_startup_smoke():
    kk = os.path.join(os.path.dirname(sys.executable), "kk")
    r = _run("bash", BENCH / "bench_startup.sh", "1", timeout=120, KK=kk, PY=sys.executable) if os.path.exists(kk) else None
    if r is None:
        import pytest

        pytest.skip("no kk entry point beside this python")
    assert "kk --help: best" in r.stdout and "ratio:" in r.stdout


def test_gpu_check_script_smoke():
    """The prepared GPU script at toy size on CPU: the real DeBERTa-v3-base architecture, one step each."""
    r = _run("bash", BENCH / "gpu_check.sh", "--smoke", timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("ratio: kagglekit/naive") == 2 and "ratios: (c)/(a)" in r.stdout
