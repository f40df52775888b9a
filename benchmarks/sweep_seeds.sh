#!/usr/bin/env bash
# Runs `fp8_vs_bf16_sft.py` for every seed and variant, P runs at a time, and appends each run's
# JSON line to LOG (the lines `paired_seeds.py` reads). One variant per process: the runs of a
# seed are independent (same data, order and initialisation), and small processes balance better
# across cores or on one GPU (P=14 on a 16-core H200 machine; P=2 on the 2-core CPU machine).
#
#   P=2 benchmarks/sweep_seeds.sh LOG STEPS LR VARIANTS FIRST_SEED LAST_SEED
#   e.g. P=2 benchmarks/sweep_seeds.sh /tmp/sweep.log 600 3e-4 bf16_masters,fp8_bf16_masters 0 19
#
# ARGS, if set, is passed on to every run (split at spaces), e.g.
#   ARGS="--tiny hidden_size=512 --eval-device cuda" benchmarks/sweep_seeds.sh ...
# Each run takes one thread (`--threads 1`), so P runs use P cores. A run that fails leaves its
# output in LOG.errors and no line in LOG.
set -euo pipefail
if [ $# -ne 6 ]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
log=$1 steps=$2 lr=$3 variants=$4 first=$5 last=$6
here=$(dirname "$0")
python=${PYTHON:-python3}
args=${ARGS:-}
export here python log steps lr args
for seed in $(seq "$first" "$last"); do
    for variant in ${variants//,/ }; do
        echo "$seed $variant"
    done
done | xargs -P "${P:-2}" -L 1 bash -c '
    out=$("$python" "$here/fp8_vs_bf16_sft.py" --steps "$steps" --seed "$0" --lr "$lr" --threads 1 --variants "$1" $args 2>&1) \
        && tail -n 1 <<<"$out" >>"$log" \
        || { echo "seed $0 $1 failed:"; tail -n 20 <<<"$out"; } >>"$log.errors"'
