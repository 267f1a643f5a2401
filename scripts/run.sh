#!/usr/bin/env bash
# `make run`: the pipeline as a Prefect deployment on a local server.
#   1. data: generate the embedded set when missing, check it against data.dvc;
#   2. Prefect: reuse a server answering on PREFECT_PORT (default 4200) or start one (PREFECT_HOME=.prefect);
#      create the process work pool `local` if missing; `prefect deploy --all` (prefect.yaml); start a worker;
#   3. `prefect deployment run wsss/full --watch` (DATASET=..., PROFILE=<profiles.yaml entry>, OVERRIDES="k=v k=v"
#      become its parameters);
#   4. print the metrics table and where to look; stop what this script started (TERM, then KILL), also on
#      failure or Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/${VENV:-.venv}/bin"
export PATH="$BIN:$PATH"
export WSSS_ROOT="$ROOT"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
export MLFLOW_DISABLE_TELEMETRY=true
GRACE_S="${GRACE_S:-15}"
LOGS="$PREFECT_HOME/logs"
mkdir -p "$LOGS"

say() { printf '\n==> %s\n' "$*"; }

STARTED=()  # process-group ids of what this script started, in start order
descendants() {  # every process below pid $1
  local child
  for child in $(pgrep -P "$1"); do
    echo "$child"
    descendants "$child"
  done
}
alive() {  # any of the pids $@ still running
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop_group() {  # TERM, then KILL after GRACE_S
  local pgid=$1 deadline=$((SECONDS + GRACE_S)) nudge=$((SECONDS + 3)) below
  # The worker starts each flow run (and its stage commands) in a session of its own: outside this group, and
  # orphaned once the worker is gone. Listed first, stopped with it.
  below=$(descendants "$pgid")
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  # shellcheck disable=SC2086
  kill -TERM $below 2>/dev/null || true
  # shellcheck disable=SC2086
  while { kill -0 -- "-$pgid" 2>/dev/null || alive $below; } && ((SECONDS < deadline)); do
    # A Prefect 3.9 worker turns TERM into one SIGINT to itself and keeps running; a second one stops it.
    if ((nudge && SECONDS >= nudge)); then
      kill -INT -- "-$pgid" 2>/dev/null || true
      nudge=0
    fi
    sleep 0.2
  done
  # shellcheck disable=SC2086
  if kill -0 -- "-$pgid" 2>/dev/null || alive $below; then
    echo "process group $pgid (or a flow run it started) still running ${GRACE_S}s after TERM: KILL"
    kill -KILL -- "-$pgid" 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -KILL $below 2>/dev/null || true
  fi
}
stop_started() {  # newest first: the worker talks to the server while it shuts down
  local i
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_group "${STARTED[i]}"; done
  STARTED=()
}
# (An `a && b` whose b fails would end the trap with that status under set -e: `if` instead.)
trap 'rc=$?; for pid in ${WATCH:-} ${FOLLOW:-}; do kill "$pid" 2>/dev/null || true; done; stop_started; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

healthy() {
  python - "$PREFECT_API_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
}

# 1. profile and data (a typo in PROFILE ends here, before any server starts) ---------------------------
if [[ -n "${PROFILE:-}" ]]; then  # profiles.yaml's overrides first, then OVERRIDES
  profile=$(wsss profile "$PROFILE") || exit 1
  # shellcheck disable=SC2086
  OVERRIDES="$(echo $profile) ${OVERRIDES:-}"
fi
if [[ ! -f data/embedded/manifest.parquet ]]; then
  say "data/embedded missing: generating the embedded data set (deterministic, hashes to data.dvc)"
  wsss import embedded
fi
if [[ -f data.dvc ]]; then
  python scripts/verify_data.py data.dvc || true  # a user's own data under data/ is fine: DVC records it
fi

# 2. Prefect server, pool, deployment, worker ---------------------------------------------------------
if healthy; then
  say "reusing the Prefect server at $PREFECT_API_URL"
else
  say "starting a Prefect server on 127.0.0.1:$PORT (log: $LOGS/server.log)"
  # The UI asks the API at PREFECT_UI_API_URL (default: port 4200 whatever --port says): point it at ours.
  PREFECT_SERVER_API_PORT="$PORT" PREFECT_UI_API_URL="$PREFECT_API_URL" \
    setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$LOGS/server.log" 2>&1 &
  STARTED+=("$!")
  disown
  for _ in $(seq 240); do
    healthy && break
    kill -0 "${STARTED[-1]}" 2>/dev/null || { tail -n 30 "$LOGS/server.log"; echo "Prefect server exited"; exit 1; }
    sleep 0.5
  done
  healthy || { tail -n 30 "$LOGS/server.log"; echo "Prefect server did not answer within 120 s"; exit 1; }
fi

if ! prefect work-pool inspect local >/dev/null 2>&1; then
  # its output advises starting a worker, which this script does below: into the log
  say "creating the process work pool 'local' (log: $LOGS/pool.log)"
  prefect work-pool create local --type process >"$LOGS/pool.log" 2>&1 || { cat "$LOGS/pool.log"; exit 1; }
fi
say "deploying (prefect.yaml: deployment wsss/full, working dir $WSSS_ROOT; log: $LOGS/deploy.log)"
# Its closing advice (start a worker, run the deployment) is what this script does next: kept in the log.
prefect --no-prompt deploy --all >"$LOGS/deploy.log" 2>&1 || { cat "$LOGS/deploy.log"; exit 1; }

say "starting a worker on pool 'local' (log: $LOGS/worker.log)"
setsid prefect worker start --pool local --type process >"$LOGS/worker.log" 2>&1 &
STARTED+=("$!")
disown  # stopped by stop_started; no job-control notices
# The worker's output is the flow run's log: followed here until the run ends, so the worker's own
# shutdown lines (SIGTERM, SIGKILL) stay in its log file.
tail -n +1 -f "$LOGS/worker.log" &
FOLLOW=$!

# 3. the run ------------------------------------------------------------------------------------------
args=()
[[ -n "${DATASET:-}" ]] && args+=(-p "dataset=$DATASET")
if [[ -n "${OVERRIDES:-}" ]]; then
  # shellcheck disable=SC2086
  args+=(-p "overrides=$(python -c 'import json, sys; print(json.dumps(sys.argv[1:]))' $OVERRIDES)")
fi
say "prefect deployment run wsss/full --watch ${args[*]}"
start=$SECONDS
rc=0
# The worker's output above is the flow run's log; the state events of --watch go to watch.log.
# In the background and `wait`ed for: bash runs a trap only when a foreground command returns, so a TERM sent to
# this script would otherwise wait for the whole flow run; `wait` returns at once and the traps stop everything.
prefect deployment run wsss/full --watch "${args[@]}" >"$LOGS/watch.log" 2>&1 &
WATCH=$!
wait "$WATCH" || rc=$?
WATCH=""
elapsed=$((SECONDS - start))
sleep 1  # the worker's last lines
kill "$FOLLOW" 2>/dev/null || true
FOLLOW=""
tail -n 1 "$LOGS/watch.log"

# 4. results ------------------------------------------------------------------------------------------
stop_started >>"$LOGS/worker.log" 2>&1
say "flow run finished (exit $rc) in $((elapsed / 60)) min $((elapsed % 60)) s (metrics above: final metrics)"
experiment=$(python -c 'import json; print(json.load(open("artifacts/registry.json"))["experiment_id"])' 2>/dev/null || true)
cat <<EOF

Where to look:
  metrics      .venv/bin/dvc metrics show        (dvc metrics diff, dvc exp show)
  plots        make plots                        -> dvc_plots/index.html (renders offline), plots/*.png
  Prefect UI   make prefect-server PREFECT_PORT=$PORT, then http://127.0.0.1:$PORT/runs (flow run, artifact wsss-pipeline)
  MLflow       make mlflow-ui MLFLOW_PORT=${MLFLOW_PORT:-5000}, then http://127.0.0.1:${MLFLOW_PORT:-5000}/#/experiments/${experiment:-0}/runs?viewStateShareKey=headline&workflowType=machine_learning
  flow logs    $LOGS/worker.log
EOF
exit "$rc"
