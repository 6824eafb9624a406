# Shared by the examples' run.sh scripts (sourced, not run): the repository's Python, the
# example package installed into it, and a local coordinator + aggregator on free ports.
#
# After sourcing: ROOT (the repository), PY (its Python), and the functions below. Every
# process started here is stopped by `stop_all` (installed as the EXIT trap by `init_run`).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
PIDS=()

log() { printf '\033[1m[%s]\033[0m %s\n' "${EXAMPLE:-example}" "$*" >&2; }
die() { log "error: $*"; exit 2; }

stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

init_run() {  # init_run DIR: a fresh run directory; stop everything on exit
    RUN=$1
    rm -rf "$RUN" && mkdir -p "$RUN"
    trap stop_all EXIT
    trap 'exit 130' INT TERM
}

# ensure_example PACKAGE_DIR MODULES...: the SDK and the example installed (editable) into the
# repository's virtualenv, unless MODULES already import. Installs only what is missing.
ensure_example() {
    local dir=$1; shift
    if [[ ! -x $PY ]]; then
        log "no virtualenv at $ROOT/.venv: running scripts/setup"
        "$ROOT/scripts/setup" >&2
    fi
    if ! "$PY" -c "import rondo" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps -e "$ROOT/python/sdk"
    fi
    if ! "$PY" -c "import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]" \
        "$@" 2>/dev/null; then
        log "installing $(basename "$dir") and its dependencies into $ROOT/.venv"
        "$PY" -m pip install -q -e "$dir"
    fi
}

_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

_wait_for() {  # _wait_for FILE PID
    for _ in $(seq 1 600); do
        [[ -s $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || die "a service exited at start-up; see $RUN/*.log"
        sleep 0.1
    done
    die "timed out waiting for $1"
}

# start_services [NAME=VALUE...]: an aggregator and a coordinator from target/release (built by
# `scripts/setup --release` when missing; BIN_DIR overrides), on free ports (port 0), with the
# dev configs (the binaries' embedded defaults); the NAME=VALUE settings (RONDO__...) go to
# the coordinator only (each service refuses keys it does not know). Sets COORDINATOR_URL and
# AGGREGATOR_URL. Logs go to $RUN.
start_services() {
    local bin=${BIN_DIR:-$ROOT/target/release}
    if [[ ! -x $bin/coordinator || ! -x $bin/aggregator ]]; then
        [[ -n ${BIN_DIR:-} ]] && die "no coordinator/aggregator binaries in $BIN_DIR"
        log "building the release binaries (scripts/setup --release)"
        "$ROOT/scripts/setup" --release >&2
    fi
    RONDO__API__PORT=0 RONDO__RPC__PORT=0 RONDO__RUNTIME__ADDRESSES_FILE=$RUN/aggregator.json \
        "$bin/aggregator" -c "$ROOT/configs/dev-aggregator.toml" >"$RUN/aggregator.log" 2>&1 &
    PIDS+=($!)
    _wait_for "$RUN/aggregator.json" "${PIDS[-1]}"
    env "$@" RONDO__API__PORT=0 RONDO__RPC__PORT=0 \
        RONDO__RUNTIME__ADDRESSES_FILE="$RUN/coordinator.json" \
        RONDO__AGGREGATOR__RPC_ADDRESS="$(_field "$RUN/aggregator.json" rpc)" \
        "$bin/coordinator" -c "$ROOT/configs/dev-coordinator.toml" >"$RUN/coordinator.log" 2>&1 &
    PIDS+=($!)
    _wait_for "$RUN/coordinator.json" "${PIDS[-1]}"
    COORDINATOR_URL="http://$(_field "$RUN/coordinator.json" api)"
    AGGREGATOR_URL="http://$(_field "$RUN/aggregator.json" api)"
}

# wait_for_report REPORT_PID FINISHED_FILE PARTICIPANT_PIDS...: wait for the report; if every
# participant has exited while the federation is not finished (the report writes
# FINISHED_FILE once it is), the participants crashed or were refused: stop it and fail.
wait_for_report() {
    local report=$1 finished=$2; shift 2
    local quiet=0
    while kill -0 "$report" 2>/dev/null; do
        local alive=0
        [[ -e $finished ]] && alive=1
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        if (( alive )); then quiet=0; else quiet=$((quiet + 1)); fi
        # A few seconds of grace: the last participants exit as the federation finishes.
        if (( quiet > 100 )); then
            kill "$report" 2>/dev/null || true
            die "every participant has exited but the federation is not finished; see $RUN/"
        fi
        sleep 0.1
    done
    wait "$report"
}

# check_participants PIDS...: fail (naming the logs) if any participant failed.
check_participants() {
    local failed=0
    for pid in "$@"; do wait "$pid" || failed=$((failed + 1)); done
    (( failed == 0 )) || die "$failed participant(s) failed; see $RUN/participant-*.log"
}
