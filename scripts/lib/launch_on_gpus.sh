# Sourced by scripts/train_phaseformer.sh and scripts/train_dape.sh: a trainer as one `accelerate launch` process
# (DDP) per GPU.
#
#   launch_on_gpus PROGRAM.py ARGS...
#
# $PYTHON runs it (default .venv/bin/python, else python3); $GPUS processes (default: every visible GPU), with
# --multi_gpu from two on. Without a GPU it stops with one line naming the CPU command. Mixed precision is the
# program's own choice (--mixed_precision auto: bf16 where supported, else fp16), so accelerate's stays off.

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

launch_on_gpus() {
  local program=$1
  shift
  GPUS="${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
  if [ "$GPUS" -lt 1 ]; then
    echo "error: no CUDA GPU is visible; on a CPU run: $PYTHON $program $* --device cpu" >&2
    exit 2
  fi
  local multi=()
  if [ "$GPUS" -gt 1 ]; then multi=(--multi_gpu); fi
  echo "$program on $GPUS GPU(s): $*"
  exec "$PYTHON" -m accelerate.commands.launch ${multi[@]+"${multi[@]}"} --num_processes "$GPUS" --num_machines 1 \
    --mixed_precision no --dynamo_backend no "$program" "$@"
}
