#!/usr/bin/env bash
# The prepared GPU check: one script, at most GPU_CHECK_BUDGET_S seconds (default 420) on an H100/H200, every
# table appended to benchmarks/RESULTS.md (copied to $OUT/RESULTS.md after every step when $OUT is set, so a run
# cut short still brings back what it measured). The steps run most important first: the GPU-only code paths
# (correctness) before the speed tables. A step starts only while the budget lasts and is stopped at the budget
# plus GPU_CHECK_GRACE_S (default 90); the end prints one table of steps, seconds and outcome, and the exit
# status is 1 if a step failed, 2 if none failed but some were skipped or stopped for time.
# In the order they run:
#   1. benchmarks/gpu_paths.py: every GPU-only path for real, one table (QLoRA kk train + kk predict of a Gemma-2
#      architecture, a real out-of-memory in training and inference, a real fp16 overflow recomputed in fp32 for
#      fp16 and 4-bit weights, flash-attention packing or its refusal, one fold model at a time, DDP on 2+ GPUs).
#   1b. benchmarks/strategy_check.sh: one 2-step `kk train` per train.strategy the machine can run, 1 process each
#      under torchrun (ddp, fsdp; deepspeed zero2/zero3 when DeepSpeed is installed).
#   2. The Gemma-2 preset (configs/gemma2-9b-qlora.yaml) on that architecture: a few training steps at 4-bit, then the
#      adapter predicting at 8-bit and the preset's predict.max_length (8,192): tokens/s and peak memory of both.
#   3. A Gemma-2-9B-architecture classifier (random weights) through kagglekit's 4-bit QLoRA path: training
#      samples/s padded and packed (train.packing), inference with max_tokens auto, peak memory.
#   4. Inference of the Gemma-2-9B width in fp16, 8-bit and 4-bit, GPTQ 8-bit through HF and vLLM beside vLLM fp16
#      (bench_quant.py; compressed-tensors from $WHEELS; the vLLM rows only where vllm is already installed: it pins
#      its own torch): the throughput ratios the
#      kernel's time estimate assumes (kagglekit/kernel/plan.py THROUGHPUT), measured.
#   5. DeBERTa-v3-base architecture (random weights), LoRA r16, 1,280 tokens, lengths of the real rows:
#      kagglekit's training loop in bf16 and in fp16 (as on a T4), with and without gradient checkpointing
#      (samples/s, MFU, peak memory), and the Hugging Face Trainer beside it in bf16.
#   6. Inference: kagglekit's path (the one the kernel runs) vs Trainer.predict, the bare sorted loop and
#      fixed padding, fp16; flashdeberta too when its wheel is given.
#   7. The training loop's host syncs per optimizer step at grad_accum 8 (torch's sync debug mode), beside its speed.
# Wheels the GPU image lacks (bitsandbytes, flashdeberta + einops) are installed from $WHEELS (default: wheels/)
# with --no-index when present: `make gpu-wheels` downloads them here, and the device tool carries the folder.
#   bash benchmarks/gpu_check.sh            # on the GPU
#   bash benchmarks/gpu_check.sh --smoke    # the same commands at toy size on CPU (the test suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
WHEELS=${WHEELS:-wheels}
if [ "${1:-}" = "--smoke" ]; then
  LEN=64; ROWS=24; STEPS=2; ROUNDS=1; IB=4; TRAIN_PRECS="fp32"; IPREC=fp32; REC=""
  LLM="--layers 2 --scale 64 --quantization none --steps 2 --max-length 64 --infer-rows 8"; GP="--smoke"
  GA="--batch-size 2"  # 24 rows: at batch 8 x grad_accum 8 the epoch holds no timed optimizer step
  PRESET="--layers 2 --scale 64 --steps 2 --max-length 64 --predict-max-length 128 --infer-rows 4"
else
  LEN=1280; ROWS=400; STEPS=12; ROUNDS=1; IB=32; TRAIN_PRECS="bf16 fp16"; IPREC=fp16; REC="--record"
  LLM="--steps 4 --batch-size 4"; GP=""; GA="--batch-size 8"
  PRESET="--steps 4 --infer-rows 32"
  if [ -d "$WHEELS" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" bitsandbytes flashdeberta einops 2>&1 | tail -2 || true
    $PY -m pip install -q --no-index --find-links "$WHEELS" compressed-tensors loguru 2>&1 | tail -2 || true
  fi
fi
export PYTHONUNBUFFERED=1 KK_QUIET=1
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "${1:-}" = "--smoke" ] && echo 3600 || echo 420)}
GRACE=${GPU_CHECK_GRACE_S:-90}
START=0  # the budget counts from the script's start: installing the wheels spends it too
status=0
SUMMARY=""
step() {
  local used=$((SECONDS - START)) t0=$SECONDS rc outcome
  if [ "$used" -ge "$BUDGET" ]; then
    echo "== SKIPPED (budget ${BUDGET}s spent): $*"
    SUMMARY+="skipped	-	$*"$'\n'; [ "$status" -eq 0 ] && status=2; return
  fi
  echo "== $*"
  timeout --signal=INT --kill-after=20 $((BUDGET - used + GRACE)) "$@"; rc=$?
  if [ "$rc" -eq 0 ]; then outcome=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then outcome="stopped (time)"; echo "STOPPED (time): $*"; [ "$status" -eq 0 ] && status=2
  else outcome="FAILED ($rc)"; echo "FAILED: $*"; status=1; fi
  SUMMARY+="$outcome	$((SECONDS - t0))	$*"$'\n'
  [ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  return 0
}
step $PY benchmarks/gpu_paths.py $GP $REC
step env PY=$PY bash benchmarks/strategy_check.sh
if $PY -c "import bitsandbytes" 2>/dev/null || [ "${1:-}" = "--smoke" ]; then
  step $PY benchmarks/bench_llm.py --preset configs/gemma2-9b-qlora.yaml --quantization 4bit --predict-quantization 8bit $PRESET $REC
  step $PY benchmarks/bench_llm.py $LLM $REC
else
  echo "bitsandbytes is not installed: the Gemma-2-9B QLoRA rows are missing (put its wheel in $WHEELS/)"
  [ -n "$REC" ] && printf '\n### bench_llm: %s\n\nnot run: no bitsandbytes wheel on the GPU machine\n' "$(date '+%Y-%m-%d %H:%M')" >> benchmarks/RESULTS.md
fi
[ "${1:-}" = "--smoke" ] || step $PY benchmarks/bench_quant.py $REC  # fp16/8-bit/4-bit ratios vs the kernel plan's factors (CPU smoke: tests/test_benchmarks.py)
for prec in $TRAIN_PRECS; do
  for ck in "" "--grad-ckpt"; do
    step $PY benchmarks/bench_train.py --arch deberta-v3-base --data sim --rows $ROWS --steps $STEPS --rounds $ROUNDS \
        --max-length $LEN --precision $prec --batch-size 8 --contenders kagglekit $ck $REC
  done
done
step $PY benchmarks/bench_train.py --arch deberta-v3-base --data sim --rows $ROWS --steps $STEPS --rounds $ROUNDS \
    --max-length $LEN --precision ${TRAIN_PRECS%% *} --batch-size 8 --contenders kagglekit,hf-trainer $REC
step $PY benchmarks/bench_infer.py --arch deberta-v3-base --data sim --rows $ROWS --max-length $LEN --precision $IPREC \
    --batch-size $IB --rounds $ROUNDS $REC
step $PY benchmarks/bench_train.py --arch deberta-v3-base --data sim --rows $ROWS --steps 4 --rounds 1 \
    --max-length $LEN --precision ${TRAIN_PRECS%% *} $GA --grad-accum 8 --contenders kagglekit $REC
echo
echo "gpu_check steps (budget ${BUDGET}s, used $((SECONDS - START))s):"
printf 'outcome\tseconds\tcommand\n%s' "$SUMMARY" | sed 's/^/  /'
[ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
