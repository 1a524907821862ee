#!/usr/bin/env bash
# The prepared GPU check (issue: benchmarks on an H100 when the device tool lends one).
# One script, about 10 minutes on an H100: DeBERTa-v3-base architecture (random weights) at 1280 tokens,
# LoRA r=16, bf16, batch 8/16/32 with and without gradient checkpointing; then fp16 inference.
# Every run appends its table to benchmarks/RESULTS.md (and $OUT/RESULTS.md when $OUT is set).
#   bash benchmarks/gpu_check.sh            # on the GPU
#   bash benchmarks/gpu_check.sh --smoke    # the same commands at toy size, on CPU, to keep it from rotting
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${1:-}" = "--smoke" ]; then
  LEN=64; STEPS=2; BATCHES="1"; N=8; IB=4; PREC=fp32; REC=""
else
  LEN=1280; STEPS=10; BATCHES="8 16 32"; N=512; IB=32; PREC=bf16; REC="--record"
fi
export PYTHONUNBUFFERED=1 KK_QUIET=1
status=0
for b in $BATCHES; do
  for ck in "" "--grad-ckpt"; do
    $PY benchmarks/bench_train.py --arch deberta-v3-base --max-length $LEN --precision $PREC --lora-r 16 \
        --batch-size $b --steps $STEPS $ck $REC || status=1
  done
done
IPREC=$([ "$PREC" = bf16 ] && echo fp16 || echo "$PREC")
$PY benchmarks/bench_infer.py --arch deberta-v3-base --max-length $LEN --precision $IPREC --n $N --batch-size $IB $REC || status=1
[ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
