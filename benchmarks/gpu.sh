#!/usr/bin/env bash
# Every GPU measurement of the project in one run of <= 8 minutes wall (benchmarks/GPU_RUN.md has the device
# command), in priority order: ViT-B/14 and ViT-L/14 LoRA / full / inference in bf16 against the PyTorch peer
# (transformers Dinov2Model, SDPA, eager: torch.compile off), ViT-B full with cuDNN attention, the SSL steps of
# configs/jump_ssl.py and configs/gz2_ssl.py at the recipes' batch, ViT-S/14, then the input pipelines with 16
# workers; compile times (jaxvit's first step; torch's first eager step) with each.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine: every group, as the budget allows
#   bash benchmarks/gpu.sh ssl data        # only these groups (models | ssl | data), e.g. what a run left
#   bash benchmarks/gpu.sh --smoke         # the same items on the CPU at toy sizes (slow test tier)
#
# Each item runs in its own process under its own time cap (and the run's remaining budget); items that no longer
# fit are listed under "Not measured". On the H200 (2026-12-04) a jaxvit compile took 27-38 s per mode, so one
# process per arch measures its three modes. The JSON lines go to gpu_run.jsonl and the markdown table gpu_run.md
# is rewritten after every item, in $OUT if set, else benchmarks/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=0
GROUPS_WANTED=()
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    models|ssl|data) GROUPS_WANTED+=("$arg") ;;
    *) echo "usage: bash benchmarks/gpu.sh [--smoke] [models] [ssl] [data]" >&2; exit 2 ;;
  esac
done
(( ${#GROUPS_WANTED[@]} )) || GROUPS_WANTED=(models ssl data)
wanted() { [[ " ${GROUPS_WANTED[*]} " == *" $1 "* ]]; }
DIR=${OUT:-benchmarks}
mkdir -p "$DIR"
LOG=$DIR/gpu_run.jsonl
TABLE=$DIR/gpu_run.md
: > "$LOG"
START=$SECONDS
ARGS="$*"

if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  BUDGET=${BUDGET:-3600}
  SCALE=5  # caps x 5: the CPU is slower and may be shared
  TOY=(--override=hidden_size=32,depth=1,num_heads=2,mlp_hidden=64 --res=28 --steps=1 --rounds=1 --warmup=0)
  declare -A MODEL_BATCH=([s]=2 [b]=2 [l]=2)
  SSL_ARGS=(--batch_size=2 --steps=1 --warmup=0)
  SSL_VARIANT=":demo"
  DATA_ARGS=(--data_workers=0,2 --data_files=2 --batch_size=2 --steps=1)
  DEVICE="CPU smoke run (toy sizes; not a measurement)"
else
  BUDGET=${BUDGET:-470}  # 8 minutes less the table
  SCALE=1
  TOY=(--steps=10 --rounds=2 --warmup=3)
  declare -A MODEL_BATCH=([s]=128 [b]=64 [l]=32)
  SSL_ARGS=(--steps=5 --warmup=2)
  SSL_VARIANT=""
  DATA_ARGS=(--data_workers=16 --data_files=4 --batch_size=64 --steps=24)
  DEVICE=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi

render() {
  {
    echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ), jaxvit $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    echo "Device: ${DEVICE:-unknown}; $(nproc) CPU cores; $($PY -c 'import jax; print("jax", jax.__version__)' \
      2>/dev/null). Made by \`bash benchmarks/gpu.sh $ARGS\`; raw lines in"
    echo "gpu_run.jsonl. Peer: transformers Dinov2Model (SDPA) + PEFT LoRA, torch.compile off (eager), bf16 autocast."
    echo "Compile s: jaxvit's first step (trace + compile + run); torch: its first eager step. Elapsed $((SECONDS - START)) s."
    echo
    $PY -m jaxvit.benchmark --render="$LOG"
  } > "$TABLE.tmp" && mv "$TABLE.tmp" "$TABLE"
}

note() {  # KIND ITEM REASON: a line for an item that did not finish
  local reason=${3//\"/\'}
  reason=${reason//\\/\/}
  printf '{"impl": "%s", "item": "%s", "reason": "%s"}\n' "$1" "$2" "$reason" >> "$LOG"
}

item() {  # NAME CAP_S ARGS...: one measurement in its own process under min(cap, budget left)
  local name=$1 cap=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 20 )); then
    note skipped "$name" "the run's ${BUDGET} s budget was spent"
    render
    return
  fi
  (( cap > left )) && cap=$left
  echo "== $name (cap ${cap} s, ${left} s left): python -m jaxvit.benchmark $*"
  local tmp
  tmp=$(mktemp)
  timeout -k 10 "$cap" $PY -m jaxvit.benchmark "$@" 2>&1 | tee "$tmp"
  local rc=${PIPESTATUS[0]}
  grep '^{"impl"' "$tmp" >> "$LOG"
  if (( rc == 124 || rc == 137 )); then
    note failed "$name" "over its ${cap} s cap"
  elif (( rc )); then
    note failed "$name" "exit $rc: $(grep -v '^{' "$tmp" | tail -1 | cut -c1-200)"
  fi
  rm -f "$tmp"
  render
}

# Models: one process per arch measures its modes (caps: compile ~30-40 s per mode + the torch peer's start).
models() {  # SIZE CAP
  item "ViT-${1^^}/14 lora, full, infer" "$2" --arch="dinov2_vit${1}14" --mode=lora,full,infer --dtype=bfloat16 \
    --batch_size="${MODEL_BATCH[$1]}" --peer "${TOY[@]}"
}
if wanted models; then
  models b 200
  (( SMOKE )) || item "ViT-B/14 full, cuDNN attention" 80 --arch=dinov2_vitb14 --mode=full --dtype=bfloat16 \
    --batch_size=64 --override=attn_impl=cudnn "${TOY[@]}"
  models l 240
fi
# SSL: the recipes' configs (arch, patch, crops, heads, batch), random weights.
if wanted ssl; then
  item "SSL jump_ssl (ViT-S/8)" 150 --mode=ssl --config="configs/jump_ssl.py$SSL_VARIANT" "${SSL_ARGS[@]}"
  item "SSL gz2_ssl (ViT-S/14)" 120 --mode=ssl --config="configs/gz2_ssl.py$SSL_VARIANT" "${SSL_ARGS[@]}"
fi
wanted models && models s 180
# Input pipelines alone (transform + batching) with 16 workers, on files in each workload's published format
# (terramind_stage3: ~100 s of its cap count the step's FLOPs by tracing it).
if wanted data; then
  for config in jump_ssl dinocell biomass gz2_lora terramind_stage3 gz2_ssl gz2_full cifar10_dinov2; do
    item "data $config" "$([[ $config == terramind_stage3 ]] && echo 120 || echo 50)" --data --config="configs/$config.py" "${DATA_ARGS[@]}"
  done
fi
echo "== done in $((SECONDS - START)) s: $TABLE"
