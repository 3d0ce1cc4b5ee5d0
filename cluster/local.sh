#!/usr/bin/env bash
# Start and stop a local Ray cluster for `ray job submit`, with token authentication on.
#
#   cluster/local.sh start [--num-cpus N] [--num-gpus N] [--object-store-mb M] [--port P]
#                          [--dashboard-port P] [--resources JSON] [--node-ip IP]
#   cluster/local.sh join  [--num-cpus N] [--object-store-mb M] [--resources JSON]
#   cluster/local.sh env | address | status | stop
#
#   eval "$(cluster/local.sh env)"        # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python -m jobs.train_contrastive \
#       --config jobs/configs/train_contrastive/smoke.yaml
#
# Why it looks like this:
# - Every node runs as `ray start --block` in its own process group, and its PID is recorded.
#   `stop` signals exactly those PIDs (Ray then stops its own children); it never runs
#   `ray stop`, which would kill every Ray on the machine, including other users' clusters.
# - Ports default to free ones picked at start (GCS, dashboard, client server, agent), so
#   several clusters can share one machine; pass --port/--dashboard-port to pin them.
# - Ray 2.60 turns token auth on for `ray start --head` only when a token already exists;
#   this script makes sure one does and sets RAY_AUTH_MODE=token explicitly, so auth is on
#   whatever the environment says. The token is read from RAY_AUTH_TOKEN if set, else from
#   RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created with mode 600 when missing).
# - Logical CPUs default to max(8, cores): Train workers, Serve replicas and Ray Data tasks
#   each reserve CPUs, and on a 2-core laptop an honest count deadlocks them.
#
# Settings may also come from the environment: WHETSTONE_CLUSTER_DIR (state and logs),
# WHETSTONE_NUM_CPUS, WHETSTONE_NUM_GPUS, WHETSTONE_OBJECT_STORE_MB, WHETSTONE_RAY_PORT,
# WHETSTONE_DASHBOARD_PORT, WHETSTONE_NODE_IP, WHETSTONE_RAY_BIN (the `ray` executable).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
STATE_DIR="${WHETSTONE_CLUSTER_DIR:-${TMPDIR:-/tmp}/whetstone-cluster-$(id -u)}"
START_TIMEOUT_S="${WHETSTONE_START_TIMEOUT_S:-180}"

die() { echo "local.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

find_ray() {
    if [[ -n "${WHETSTONE_RAY_BIN:-}" ]]; then
        RAY_BIN="$WHETSTONE_RAY_BIN"
    elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
        RAY_BIN="$REPO_ROOT/.venv/bin/ray"
    else
        RAY_BIN="$(command -v ray || true)"
    fi
    [[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no 'ray' executable found (install the project, or set WHETSTONE_RAY_BIN)"
    # The python beside `ray` has the same Ray installed; used for free ports and tokens.
    PYTHON_BIN="$(dirname "$RAY_BIN")/python"
    [[ -x "$PYTHON_BIN" ]] || PYTHON_BIN="$(command -v python3)"
}

free_port() {
    "$PYTHON_BIN" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Make sure a token exists and export what Ray reads, so every child process agrees.
setup_token() {
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        TOKEN_SOURCE="env"
        return
    fi
    local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$path" ]]; then
        mkdir -p "$(dirname "$path")"
        (umask 077 && "$PYTHON_BIN" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$path")
        echo "local.sh: generated a new Ray auth token in $path" >&2
    fi
    export RAY_AUTH_TOKEN_PATH="$path"
    TOKEN_SOURCE="$path"
}

load_head() {
    [[ -f "$STATE_DIR/head.env" ]] || die "no cluster recorded in $STATE_DIR (run: cluster/local.sh start)"
    # shellcheck disable=SC1091
    source "$STATE_DIR/head.env"
    pid_alive "$STATE_DIR/head.pid" || die "the head recorded in $STATE_DIR is not running (run: cluster/local.sh stop; cluster/local.sh start)"
}

# Commands that talk to a running head use the token it was started with.
use_recorded_token() {
    export RAY_AUTH_MODE=token
    if [[ "$TOKEN_SOURCE" == env ]]; then
        [[ -n "${RAY_AUTH_TOKEN:-}" ]] || die "the head was started with RAY_AUTH_TOKEN; set it again"
    else
        export RAY_AUTH_TOKEN_PATH="$TOKEN_SOURCE"
    fi
}

# Alive and not a zombie (an exited child whose parent has not reaped it yet).
running() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

pid_alive() {
    [[ -f "$1" ]] && running "$(cat "$1")"
}

# Launch `ray start ... --block` detached in its own session; wait for it to come up.
# A raylet gets 30 s to register with the GCS; on a loaded machine it can miss that, so a node
# that exits during startup is tried again (WHETSTONE_START_ATTEMPTS times in all).
launch_node() {
    local attempt
    for (( attempt = 1; attempt <= ${WHETSTONE_START_ATTEMPTS:-3}; attempt++ )); do
        try_launch_node "$@" && return 0
        echo "local.sh: $1 exited during startup (attempt $attempt)" >&2
    done
    tail -n 30 "$STATE_DIR/logs/$1.log" >&2
    die "$1 failed to start (log: $STATE_DIR/logs/$1.log)"
}

try_launch_node() {
    local name="$1"; shift
    local log="$STATE_DIR/logs/$name.log"
    mkdir -p "$STATE_DIR/logs"
    # Truncate here, not in the background child: the readiness grep below must never see the
    # previous run's "started" line before the child gets round to opening the file.
    : >"$log"
    # PATH first lists Ray's own bin dir: job entrypoints say `python ...`, and that python
    # must be the one with Ray and the project installed, not whatever the shell found first.
    # HF_HUB_OFFLINE/TOKENIZERS_PARALLELISM: every worker on the node inherits them (models come
    # from packages or storage; Ray Data already parallelises tokenization).
    PATH="$(dirname "$RAY_BIN"):$PATH" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}" \
        HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}" \
        setsid "$RAY_BIN" start --block --disable-usage-stats "$@" >>"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$STATE_DIR/$name.pid"
    local waited=0
    until grep -q "Ray runtime started" "$log" 2>/dev/null; do
        if ! running "$pid"; then
            rm -f "$STATE_DIR/$name.pid"
            return 1
        fi
        if (( waited >= START_TIMEOUT_S )); then
            tail -n 30 "$log" >&2
            die "$name did not start within ${START_TIMEOUT_S}s (log: $log); run: cluster/local.sh stop"
        fi
        sleep 1; waited=$((waited + 1))
    done
}

# `ray start` reports success before the dashboard (the Jobs API) listens; wait for it.
wait_for_port() {
    local port="$1" waited=0
    until "$PYTHON_BIN" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$port" 2>/dev/null; do
        if (( waited >= START_TIMEOUT_S )); then
            die "the dashboard did not open port $port within ${START_TIMEOUT_S}s (logs: $STATE_DIR/ray/session_latest/logs)"
        fi
        sleep 1; waited=$((waited + 1))
    done
}

cmd_start() {
    local num_cpus="${WHETSTONE_NUM_CPUS:-}" num_gpus="${WHETSTONE_NUM_GPUS:-0}"
    local store_mb="${WHETSTONE_OBJECT_STORE_MB:-512}" resources="{}"
    local port="${WHETSTONE_RAY_PORT:-}" dash_port="${WHETSTONE_DASHBOARD_PORT:-}"
    local node_ip="${WHETSTONE_NODE_IP:-127.0.0.1}"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --num-cpus) num_cpus="$2"; shift 2 ;;
            --num-gpus) num_gpus="$2"; shift 2 ;;
            --object-store-mb) store_mb="$2"; shift 2 ;;
            --port) port="$2"; shift 2 ;;
            --dashboard-port) dash_port="$2"; shift 2 ;;
            --resources) resources="$2"; shift 2 ;;
            --node-ip) node_ip="$2"; shift 2 ;;
            *) die "start: unknown option '$1'" ;;
        esac
    done
    mkdir -p "$STATE_DIR"
    if pid_alive "$STATE_DIR/head.pid"; then
        die "a head is already running (pid $(cat "$STATE_DIR/head.pid"), state $STATE_DIR); run: cluster/local.sh stop"
    fi
    local cores; cores="$(nproc 2>/dev/null || echo 2)"
    num_cpus="${num_cpus:-$(( cores > 8 ? cores : 8 ))}"
    port="${port:-$(free_port)}"
    dash_port="${dash_port:-$(free_port)}"
    setup_token
    launch_node head --head \
        --node-ip-address "$node_ip" --port "$port" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
        --ray-client-server-port "$(free_port)" \
        --dashboard-agent-listen-port "$(free_port)" \
        --num-cpus "$num_cpus" --num-gpus "$num_gpus" --resources "$resources" \
        --object-store-memory "$(( store_mb * 1024 * 1024 ))" \
        --temp-dir "$STATE_DIR/ray"
    wait_for_port "$dash_port"
    cat >"$STATE_DIR/head.env" <<EOF
GCS_ADDRESS=$node_ip:$port
DASHBOARD_PORT=$dash_port
TOKEN_SOURCE=$TOKEN_SOURCE
EOF
    echo "local.sh: head started (pid $(cat "$STATE_DIR/head.pid"), $num_cpus CPUs, GCS $node_ip:$port)" >&2
    cmd_env
}

cmd_join() {
    local num_cpus="${WHETSTONE_NUM_CPUS:-4}" num_gpus=0 store_mb="${WHETSTONE_OBJECT_STORE_MB:-256}"
    local resources="{}"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --num-cpus) num_cpus="$2"; shift 2 ;;
            --num-gpus) num_gpus="$2"; shift 2 ;;
            --object-store-mb) store_mb="$2"; shift 2 ;;
            --resources) resources="$2"; shift 2 ;;
            *) die "join: unknown option '$1'" ;;
        esac
    done
    load_head
    use_recorded_token
    local n=1
    while [[ -e "$STATE_DIR/worker-$n.pid" ]]; do n=$((n + 1)); done
    # A second raylet on the same host needs its own agent port (the rest default to random)
    # and its own temp dir: each node's runtime-env agent deletes job packages (working_dir,
    # py_modules) it no longer uses, and in a shared dir it would delete the ones that the
    # other node's driver and workers are still running in.
    launch_node "worker-$n" --address "$GCS_ADDRESS" \
        --node-ip-address "${GCS_ADDRESS%:*}" \
        --dashboard-agent-listen-port "$(free_port)" \
        --num-cpus "$num_cpus" --num-gpus "$num_gpus" --resources "$resources" \
        --object-store-memory "$(( store_mb * 1024 * 1024 ))" \
        --temp-dir "$STATE_DIR/ray-worker-$n"
    echo "local.sh: worker-$n joined $GCS_ADDRESS (pid $(cat "$STATE_DIR/worker-$n.pid"), $num_cpus CPUs)" >&2
}

cmd_env() {
    load_head
    echo "# Ray Jobs API of the local cluster; token auth is on (token: $TOKEN_SOURCE)."
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=token"
    if [[ "$TOKEN_SOURCE" == env ]]; then
        echo "# the token is the RAY_AUTH_TOKEN already in your environment"
    else
        echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_SOURCE"
    fi
}

cmd_address() {
    load_head
    echo "http://127.0.0.1:$DASHBOARD_PORT"
}

cmd_status() {
    load_head
    local nodes=0 f
    for f in "$STATE_DIR"/*.pid; do pid_alive "$f" && nodes=$((nodes + 1)); done
    echo "local.sh: $nodes node process(es) running; state in $STATE_DIR" >&2
    use_recorded_token
    "$RAY_BIN" status --address "$GCS_ADDRESS"
}

# Stop workers before the head, each by its recorded PID, then by its process group.
cmd_stop() {
    local f pid stopped=0
    shopt -s nullglob
    local pidfiles=("$STATE_DIR"/worker-*.pid "$STATE_DIR"/head.pid)
    for f in "${pidfiles[@]}"; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f")"
        if running "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            local waited=0
            while running "$pid" && (( waited < 30 )); do sleep 1; waited=$((waited + 1)); done
            # `ray start --block` ran under setsid, so its PID is its process group's id.
            kill -KILL -- "-$pid" 2>/dev/null || true
            stopped=$((stopped + 1))
        fi
        rm -f "$f"
    done
    rm -f "$STATE_DIR/head.env"
    echo "local.sh: stopped $stopped node(s) recorded in $STATE_DIR" >&2
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        start) find_ray; cmd_start "$@" ;;
        join) find_ray; cmd_join "$@" ;;
        stop) cmd_stop ;;
        status) find_ray; cmd_status ;;
        address) cmd_address ;;
        env) cmd_env ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
