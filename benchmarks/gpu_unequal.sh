#!/usr/bin/env bash
# Unequal clients on one GPU (issue 10, item 7): EMNIST CNN and ResNet-9, equal and
# FEMNIST-like sizes, `vmap` in chunks of 8/32/128 clients against one client at a time.
# About 6 minutes in all (each run capped by PER_RUN_S). Writes JSON lines (the benchmark's
# `round` rows) to $OUT/gpu.jsonl and prints a table: examples/s (computed, padding
# included), useful examples/s (real examples x epochs / s), the real fraction and the
# fraction of the GPU's measured f32 matmul peak.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_unequal.sh          # on the GPU machine
#   GPU_UNEQUAL_TINY=1 OUT=/tmp/gpu bash benchmarks/gpu_unequal.sh   # a CPU smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_unequal}
mkdir -p "$OUT"
JSONL="$OUT/gpu.jsonl"
: > "$JSONL"
PYTHON=${PYTHON:-python}
if [[ -n "${GPU_UNEQUAL_TINY:-}" ]]; then  # Tiny and CPU-sized: checks the script, not speed.
  MODELS=mlp CLIENTS=4 CHUNKS="2 4" ROUNDS=1 PEAK=128 PER_RUN_S=${PER_RUN_S:-300}
  EXTRA="--examples_per_client=8 --batch_size=4"
else
  MODELS=emnist_cnn,resnet9 CLIENTS=128 CHUNKS="8 32 128" ROUNDS=2 PEAK=8192
  PER_RUN_S=${PER_RUN_S:-85} EXTRA="--examples_per_client=206 --batch_size=20"
fi
COMMON="--algorithm=fedavg --model=$MODELS --client_sizes=equal,femnist --clients=$CLIENTS \
  --local_epochs=1 --rounds=$ROUNDS --reference=false --peak_size=$PEAK $EXTRA"

run() {  # $1: label; the rest: extra flags. Appends the run's JSON lines to $JSONL.
  local label=$1; shift
  echo "== $label ($(date +%T))"
  timeout "$PER_RUN_S" $PYTHON -m fedmerge_jax.benchmark $COMMON "$@" 2>"$OUT/stderr_$label.txt" \
    | grep --line-buffered '^{' | tee -a "$JSONL" \
    | $PYTHON -c 'import json,sys
for l in sys.stdin: r=json.loads(l); print("  ", r["model"], r["workload"], "useful ex/s %.0f" % r["useful_examples_per_s"])'
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || echo "   (exit $rc; 124 = stopped at PER_RUN_S=$PER_RUN_S; see $OUT/stderr_$label.txt)"
}

$PYTHON -c 'import jax; print("backend", jax.default_backend(), jax.devices())'
for chunk in $CHUNKS; do
  run "vmap_$chunk" --client_parallelism=vmap --client_chunk_size="$chunk"
done
run sequential --client_parallelism=sequential

$PYTHON - "$JSONL" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r.get("kind") == "round"]
head = ("model", "sizes", "parallelism", "chunk", "ex/s", "useful ex/s", "real", "of peak", "round s")
print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
for r in sorted(rows, key=lambda r: (r["model"], r["workload"], r["client_parallelism"],
                                    r["client_chunk_size"])):
  peak = r["fraction_of_peak"]
  print(f"| {r['model']} | {r['workload']} | {r['client_parallelism']} | "
        f"{r['client_chunk_size'] if r['client_parallelism'] == 'vmap' else 1} | "
        f"{r['examples_per_s']:,.0f} | {r['useful_examples_per_s']:,.0f} | "
        f"{r['real_fraction']:.2f} | {'-' if peak is None else f'{peak:.3f}'} | {r['round_s']:.3f} |")
if rows:
  print(f"matmul peak (f32, {rows[0]['backend']}): {rows[0]['matmul_peak_gflops']:,.0f} GFLOP/s")
PY
