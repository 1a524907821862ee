#!/usr/bin/env bash
# `kk --help` wall time (target <= 0.5 s): the CLI must not import torch/transformers at start-up.
# usage: bash benchmarks/bench_startup.sh [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
KK=${KK:-.venv/bin/kk}
PY=${PY:-.venv/bin/python}
N=${1:-5}
"$PY" - "$KK" "$N" <<'PY'
import subprocess, sys, time
kk, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run([kk, "--help"], check=True, capture_output=True)
    times.append(time.perf_counter() - t)
t = time.perf_counter()
subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True, capture_output=True)
torch_s = time.perf_counter() - t
best, mean = min(times), sum(times) / len(times)
print(f"kk --help: best {best:.3f} s, mean {mean:.3f} s over {n} runs (target <= 0.5 s)")
print(f"ratio: kk --help / (python -c 'import torch, transformers') = {mean / torch_s:.2f}x ({torch_s:.2f} s)")
sys.exit(0 if best <= 0.5 else 1)
PY
