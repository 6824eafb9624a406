#!/usr/bin/env bash
# A scikit-learn federation on this machine: a coordinator and an aggregator (or the running
# ones you name), N participants each training an SGDClassifier on its shard of the digits;
# accuracy per round as each closes, then the final federated test accuracy beside the same
# classifier trained centrally.
#
#   python/client_examples/sklearn_digits/run.sh N [--rounds R] [--epochs E] [--seed S]
#       [--run-directory DIR] [--coordinator-url URL [--aggregator-url URL]] [--threads]
#
# Defaults: 10 participants, the coordinator's configured rounds (the embedded default: 5),
# 2 local epochs per round, seed 0, run/sklearn-digits/. Services as in
# keras_house_prices/run.sh (release binaries, or BIN_DIR, or yours). --threads runs the N
# participants as threads of one process (one scikit-learn import instead of N: quicker to
# start on a small machine; scripts/demo uses it) instead of N processes.
set -euo pipefail
EXAMPLE=sklearn-digits
source "$(dirname "$0")/../lib.sh"

usage() { sed -n '7,8p' "$0" | sed 's/^#  *//' >&2; exit 2; }
n=10 rounds="" epochs=2 seed=0 run_dir=$ROOT/run/sklearn-digits
coordinator_url="" aggregator_url="" threads=false
if [[ $# -gt 0 && $1 != -* ]]; then n=$1; shift; fi
while [[ $# -gt 0 ]]; do
    if [[ $1 == --threads ]]; then threads=true; shift; continue; fi
    [[ $# -ge 2 ]] || usage
    case $1 in
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
for value in "$n" "${rounds:-1}" "$epochs"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || die "N, --rounds and --epochs must be positive integers"
done
[[ $seed =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer"

ensure_example "$ROOT/python/client_examples/sklearn_digits" sklearn_digits sklearn tqdm
bin=$(dirname "$PY")
init_run "$run_dir"

if [[ -z $coordinator_url ]]; then
    settings=(
        # Round 1 waits for all N participants (the embedded default starts with 2), so that
        # every round trains on all the data, as the central baseline does.
        RONDO__FEDERATION__MIN_CLIENTS="$n"
        RONDO__FEDERATION__PARTICIPANTS_RATIO=1.0
    )
    [[ -n $rounds ]] && settings+=(RONDO__FEDERATION__ROUNDS="$rounds")
    start_services "${settings[@]}"
    coordinator_url=$COORDINATOR_URL
    aggregator_url=$AGGREGATOR_URL
    log "coordinator $coordinator_url, aggregator $aggregator_url; logs in $RUN/"
fi

report_args=(--number-of-participants "$n" --seed "$seed" --epochs "$epochs"
    --coordinator-url "$coordinator_url" --results "$RUN/results.json"
    --status-file "$RUN/status.json")
[[ -n $aggregator_url ]] && report_args+=(--aggregator-url "$aggregator_url")
if $threads; then
    log "$n participants in one process (seed $seed, $epochs local epochs per round)"
    "$bin/digits-report" "${report_args[@]}" --with-participants  # services stop on exit
    exit 0
fi

participants=()
for k in $(seq 0 $((n - 1))); do
    "$bin/digits-participant" --participant "$k" --number-of-participants "$n" --seed "$seed" \
        --epochs "$epochs" --coordinator-url "$coordinator_url" >"$RUN/participant-$k.log" 2>&1 &
    participants+=($!)
    PIDS+=($!)
done
log "$n participants started (seed $seed, $epochs local epochs per round)"

"$bin/digits-report" "${report_args[@]}" &
report=$!
PIDS+=("$report")
wait_for_report "$report" "$RUN/status.json" "${participants[@]}"
check_participants "${participants[@]}"
