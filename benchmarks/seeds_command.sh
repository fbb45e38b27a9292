#!/usr/bin/env bash
# Issue 19's target command, 8 seeds of FedMerge and FedAvg on the offline default, one run
# at a time (--replicas=1) against replica groups (--replicas=auto), alternating
# 1, auto, auto, 1 so that a drift in the machine's speed hits both alike. Prints each
# command's wall and CPU seconds, then the ratio of the means (auto / one at a time).
#
#   bash benchmarks/seeds_command.sh                 # ~8 minutes on 2 idle cores
#   SEEDS=0,1 ORDER="1 auto" bash benchmarks/seeds_command.sh   # a quick check
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-0,1,2,3,4,5,6,7}
ORDER=${ORDER:-1 auto auto 1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for mode in $ORDER; do
  rm -rf "$WORK/runs"
  /usr/bin/time -f "%e %U" -o "$WORK/time" python -m fedmerge_jax.compare \
    --config=configs/default.py --algorithms=fedmerge,fedavg --seeds="$SEEDS" \
    --replicas="$mode" --workdir="$WORK/runs" > "$WORK/log" 2>&1 || { tail "$WORK/log"; exit 1; }
  read -r wall cpu < "$WORK/time"
  echo "replicas=$mode wall ${wall} s cpu ${cpu} s"
  echo "$mode $wall" >> "$WORK/walls"
done
awk '{s[$1]+=$2; n[$1]++} END {if (n["1"] && n["auto"]) printf "ratio of the means (auto / 1): %.3f\n", (s["auto"]/n["auto"]) / (s["1"]/n["1"])}' "$WORK/walls"
