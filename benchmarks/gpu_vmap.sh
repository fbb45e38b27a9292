#!/usr/bin/env bash
# Vectorised clients on one GPU (issue 18, item 5): EMNIST CNN, LEAF CNN and ResNet-9 on
# equal and FEMNIST-like sizes (128 clients a round); one client at a time against vmap
# chunks of 32 / 128 / chosen (client_chunk_size=0); XLA's grouped convolutions against the
# batched-matmul ones ($MATMUL_IMPL); while loop against the static loop, with and without
# command buffers; float32 (TF32) against bfloat16. Every row reports the fraction of the
# dense matmul peak of its dtype, measured in the same process, and the top kernels of one
# profiler trace of its round; the table marks the slowest and the fastest variant's.
# The whole script stops starting runs after TOTAL_S seconds (default 330: with start-up
# and compiles within 6 minutes of device time); runs are in order of importance.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_vmap.sh             # on the GPU machine
#   CPU=1 OUT=/tmp/gpu bash benchmarks/gpu_vmap.sh       # tiny sizes on CPU: checks the script
#   DRY_RUN=1 bash benchmarks/gpu_vmap.sh                # print the runs' commands only
#
# Writes $OUT/gpu_vmap.jsonl (the benchmark's `round` rows, each with a `label`),
# $OUT/table.md and $OUT/stderr_<label>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
MATMUL_IMPL=${MATMUL_IMPL:-batched_matmul}  # The batched-matmul convolution's config.model.conv_impl.
OUT=${OUT:-/tmp/gpu_vmap}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
JSONL="$OUT/gpu_vmap.jsonl"
if [[ -n "${CPU:-}" ]]; then  # Tiny and CPU-sized: checks the script, not speed.
  MODELS=mlp; LOOP_MODEL=mlp; CLIENTS=6; C1=2; C2=4; ROUNDS=1; PEAK=128
  TOTAL_S=${TOTAL_S:-900}; PER_RUN_S=${PER_RUN_S:-300}
  EXTRA="--examples_per_client=8 --batch_size=32"; SIZES="--client_sizes=femnist"
  EQUAL="--client_sizes=equal"; export JAX_PLATFORMS=cpu
else
  MODELS=emnist_cnn,leaf_femnist_cnn,resnet9; LOOP_MODEL=emnist_cnn; CLIENTS=128; C1=32
  C2=128; ROUNDS=2; PEAK=8192; TOTAL_S=${TOTAL_S:-330}; PER_RUN_S=${PER_RUN_S:-80}
  EXTRA="--examples_per_client=206 --batch_size=20"; SIZES="--client_sizes=femnist"
  EQUAL="--client_sizes=equal"
fi
COMMON="--algorithm=fedavg --clients=$CLIENTS --local_epochs=1 --rounds=$ROUNDS \
  --reference=false --peak_size=$PEAK --profile_kernels=8 $EXTRA"
START=$SECONDS

has_impl() {  # Whether this checkout's convolutions know $1.
  $PYTHON -c "import sys; from fedmerge_jax.models.layers import CONV_IMPLS; sys.exit('$1' not in CONV_IMPLS)" 2>/dev/null
}

run() {  # $1: label; the rest: flags. Appends the run's rows, labelled, to $JSONL.
  local label=$1; shift
  local cmd="$PYTHON -m fedmerge_jax.benchmark $COMMON $*"
  if [[ -n "${DRY_RUN:-}" ]]; then echo "$label: $cmd"; return; fi
  local left=$((TOTAL_S - (SECONDS - START)))
  if ((left < 20)); then echo "== $label: skipped (TOTAL_S=$TOTAL_S spent)"; return; fi
  local limit=$((left < PER_RUN_S ? left : PER_RUN_S))
  echo "== $label ($(date +%T), up to ${limit}s)"
  timeout "$limit" $cmd 2>"$OUT/stderr_$label.txt" | grep --line-buffered '^{' \
    | $PYTHON -c 'import json, sys
for line in sys.stdin:
  row = dict(json.loads(line), label=sys.argv[1])
  print(json.dumps(row), flush=True)
  print("  ", row["model"], row["workload"], "useful ex/s %.0f" % row["useful_examples_per_s"],
        file=sys.stderr)' "$label" >>"$JSONL"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || echo "   (exit $rc; 124 = stopped at ${limit}s; see $OUT/stderr_$label.txt)"
}

if [[ -z "${DRY_RUN:-}" ]]; then
  : >"$JSONL"
  $PYTHON -c 'import jax; print("backend", jax.default_backend(), jax.devices())'
fi
MATMUL=$MATMUL_IMPL  # A dry run lists its runs without asking the checkout.
if [[ -z "${DRY_RUN:-}" ]] && ! has_impl "$MATMUL_IMPL"; then
  MATMUL=""; echo "conv_impl=$MATMUL_IMPL is not in this checkout: its runs are skipped."; fi
VMAP="--client_parallelism=vmap"
BEST=${MATMUL:-xla}
# 1. The chosen chunk (client_chunk_size=0): XLA's grouped convolutions, the batched-matmul
#    ones, and bfloat16 (f32 matmuls run as TF32).
run chosen_xla --model=$MODELS $SIZES,equal $VMAP --client_chunk_size=0 --conv_impl=xla
[[ -n $MATMUL ]] && run chosen_matmul --model=$MODELS $SIZES,equal $VMAP --client_chunk_size=0 \
  --conv_impl=$MATMUL
run chosen_bf16 --model=$MODELS $SIZES,equal $VMAP --client_chunk_size=0 --conv_impl=$BEST \
  --compute_dtype=bfloat16
# 2. The loop, one chunk of every client (EMNIST CNN, equal sizes): while / static, with XLA's
#    default command buffers or with WHILE and CONDITIONAL too; unroll.
for loop in while static; do
  for buffers in default loops; do
    run loop_${loop}_cb_$buffers --model=$LOOP_MODEL $EQUAL $VMAP --client_chunk_size=0 \
      --conv_impl=$BEST --local_loop=$loop --command_buffers=$buffers
  done
done
run loop_static_unroll_4 --model=$LOOP_MODEL $EQUAL $VMAP --client_chunk_size=0 \
  --conv_impl=$BEST --local_loop=static --local_unroll=4
# 3. Fixed chunks of 32 and 128 and one client at a time (FEMNIST-like sizes).
run vmap_$C1 --model=$MODELS $SIZES $VMAP --client_chunk_size=$C1 --conv_impl=$BEST
run vmap_$C2 --model=$MODELS $SIZES $VMAP --client_chunk_size=$C2 --conv_impl=$BEST
run sequential --model=$MODELS $SIZES --client_parallelism=sequential --conv_impl=$BEST
[[ -n "${DRY_RUN:-}" ]] && exit 0
$PYTHON benchmarks/gpu_vmap_table.py "$JSONL" | tee "$OUT/table.md"
echo "($((SECONDS - START)) s in all)"
