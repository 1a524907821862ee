#!/usr/bin/env bash
# One short `kk train` per train.strategy this machine can run, each under torchrun with 1 process (a tiny Llama,
# 2 optimizer steps, full fine-tuning): ddp, fsdp (torch's fully_shard), and deepspeed when it is installed (ZeRO-2
# and ZeRO-3). Each prints its fold's val log loss and the files it wrote; the exit status is 1 if one failed.
#   bash benchmarks/strategy_check.sh            # on a GPU (bf16 where the GPU has it)
#   bash benchmarks/strategy_check.sh --smoke    # on CPU (gloo), as gpu_check.sh --smoke runs it
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export KK_QUIET=1 PYTHONUNBUFFERED=1
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
kk() { $PY -m kagglekit.cli "$@"; }
kk synth --n 120 --out "$W/train.csv" >/dev/null && kk make-folds --train "$W/train.csv" --k 3 --out "$W/folds.csv" >/dev/null \
  && kk tiny-model "$W/llama" --arch llama --train "$W/train.csv" >/dev/null || { echo "FAILED: the tiny project"; exit 1; }
runs="ddp fsdp"
if $PY -c "import deepspeed" 2>/dev/null; then runs+=" deepspeed:zero2 deepspeed:zero3"; else echo "deepspeed: not installed, skipped"; fi
status=0
for r in $runs; do
  strategy=${r%%:*}; ds=${r#*:}; [ "$ds" = "$r" ] && ds=zero2
  port=$((29500 + RANDOM % 2000))
  timeout 300 $PY -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port $port -m kagglekit.cli -- \
    train --fold 0 --config configs/tiny.yaml --train "$W/train.csv" --folds "$W/folds.csv" --run "$W/run-$r" \
    --set model.backbone="$W/llama" --set model.max_length=64 --set lora.enabled=false --set train.max_steps=2 \
    --set train.eval_every=2 --set train.strategy=$strategy --set train.deepspeed=$ds > "$W/$r.log" 2>&1
  if [ $? -eq 0 ] && [ -f "$W/run-$r/fold_0/metrics.json" ]; then
    echo "strategy $r: ok, val log loss $($PY -c "import json,sys; print(round(json.load(open(sys.argv[1]))['val_log_loss'], 4))" "$W/run-$r/fold_0/metrics.json"), files: $(ls "$W/run-$r/fold_0" | tr '\n' ' ')"
  else
    echo "strategy $r: FAILED"; tail -5 "$W/$r.log"; status=1
  fi
done
exit $status
