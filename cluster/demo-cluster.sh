#!/usr/bin/env bash
# `make demo-cluster`: the demo pipeline as one Ray job on a local head, submitted the way a laptop submits to a
# cluster. Starts a head with cluster/local-up.sh (on free ports, its state in a fresh /tmp folder, so any other Ray
# on this machine is left alone), submits jobs/pipeline.py with `ray job submit`, follows the job's log
# (`ray job logs --follow`), checks that `ray job status` says it succeeded, prints where the report is, and stops
# the head it started (cluster/local-down.sh, by its PID; also after an error or Ctrl-C). Exit 0 when the job
# succeeded, 1 when it did not, 2 when this script cannot start.
#
# Paths: a job runs in an uploaded copy of this checkout, which cluster/runtime_env.yaml ships without outputs/ and
# data/, so configs/demo.yaml's relative paths would name nothing there (dermray refuses them in a job). This script
# passes absolute ones instead (--set, under DEMO_DIR): on a one-machine cluster the local disk is a filesystem every
# node mounts, hence also storage.shared_filesystem=true. On a real cluster, use s3:// URIs. The run id is
# demo-cluster: a run of its own beside `make demo`'s (run id demo), from the same data, all five stages.
#
# Settings (environment): DEMO_DIR (default outputs/demo; when DEMO_DIR/data holds no manifest, `dermray synth`
# draws it, with SYNTH_ARGS), NUM_CPUS (all), RAY_PORT, DASHBOARD_PORT, AGENT_PORT, METRICS_PORT, CLIENT_PORT (free
# ports unless set), KEEP_STATE=1 (keep the head's state folder, with its logs, after a success too). Arguments are
# passed on to the job (`--set key=value ...`; with make: DEMO_ARGS="--set train.epochs=1").
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in ray python dermray; do
  if ! command -v "$tool" >/dev/null; then
    echo "demo-cluster: '$tool' is not on PATH: run this from dermray's virtual environment (make demo-cluster does)" >&2
    exit 2
  fi
done
unset RAY_ADDRESS  # the job API address is given explicitly; a stray RAY_ADDRESS would point `ray` elsewhere

DEMO_DIR="$(python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${DEMO_DIR:-outputs/demo}")"
DATA="$DEMO_DIR/data"
if [[ ! -f "$DATA/manifest.parquet" ]]; then
  echo "demo-cluster: no demo data in $DATA yet: drawing it (dermray synth ${SYNTH_ARGS:-})"
  # shellcheck disable=SC2086 # SYNTH_ARGS is a list of flags
  dermray synth --output "$DATA" ${SYNTH_ARGS:-}
fi

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DERMRAY_RAY_DIR="$(mktemp -d /tmp/dr-demo-XXXXXX)"  # short: Ray's socket paths are limited to ~100 characters
export DERMRAY_RAY_DIR
export RAY_PORT="${RAY_PORT:-$(free_port)}" DASHBOARD_PORT="${DASHBOARD_PORT:-$(free_port)}"
export AGENT_PORT="${AGENT_PORT:-$(free_port)}" METRICS_PORT="${METRICS_PORT:-$(free_port)}"
export CLIENT_PORT="${CLIENT_PORT:-$(free_port)}" RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"

stop_head() {
  local rc=$?
  trap - EXIT
  bash cluster/local-down.sh || rc=1
  if [[ $rc -eq 0 && -z "${KEEP_STATE:-}" ]]; then
    rm -rf "$DERMRAY_RAY_DIR"
  else
    echo "demo-cluster: the head's state and logs stay in $DERMRAY_RAY_DIR" >&2
  fi
  exit "$rc"
}
trap stop_head EXIT
trap 'exit 130' INT TERM

echo "demo-cluster: starting a local Ray head (state in $DERMRAY_RAY_DIR)"
bash cluster/local-up.sh
[[ "$RAY_AUTH_MODE" == "token" ]] && export RAY_AUTH_TOKEN_PATH="$DERMRAY_RAY_DIR/auth_token"

SID="dermray-demo-$(date +%Y%m%d-%H%M%S)"
job=(python jobs/pipeline.py --config configs/demo.yaml
     --set "output=$DEMO_DIR" --set "data.manifest=$DATA/manifest.parquet"
     --set "data.taxonomy=$DATA/taxonomy.parquet" --set "data.tasks=$DATA/tasks.yaml"
     --set "evaluate.readers=$DATA/readers.parquet" --set "pipeline.test_manifest=$DATA/test_manifest.parquet"
     --set storage.shared_filesystem=true --set run_id=demo-cluster "$@")
echo "demo-cluster: ray job submit --address $ADDRESS --submission-id $SID -- ${job[*]}"
submitted=""
for _ in $(seq 1 30); do  # a head's job agent can answer a little after it does on a busy machine
  if out="$(ray job submit --address "$ADDRESS" --submission-id "$SID" --no-wait \
              --runtime-env cluster/runtime_env.yaml --working-dir . -- "${job[@]}" 2>&1)"; then
    submitted=1
    break
  fi
  if [[ "$out" != *"No available agent"* ]]; then
    break
  fi
  sleep 2
done
if [[ -z "$submitted" ]]; then
  echo "$out" >&2
  echo "demo-cluster: the job could not be submitted" >&2
  exit 1
fi

ray job logs --address "$ADDRESS" "$SID" --follow | tee "$DERMRAY_RAY_DIR/job.log"
status=""
for _ in $(seq 1 30); do  # the log ends when the driver exits; the status follows a moment later
  status="$(ray job status --address "$ADDRESS" "$SID" 2>&1 || true)"
  [[ "$status" =~ Job\ \'[^\']+\'\ (succeeded|failed|stopped) ]] && break
  sleep 1
done
if [[ ! "$status" =~ Job\ \'[^\']+\'\ succeeded ]]; then
  echo "$status" >&2
  echo "demo-cluster: job $SID did not succeed (its log is above)" >&2
  exit 1
fi
echo "demo-cluster: job $SID SUCCEEDED on $ADDRESS"
report="$(sed -n 's/^ *report: //p' "$DERMRAY_RAY_DIR/job.log" | tail -n 1)"
gallery="$(sed -n 's/^ *saliency gallery: //p' "$DERMRAY_RAY_DIR/job.log" | tail -n 1)"
echo "demo-cluster: outputs in $DEMO_DIR"
[[ -n "$report" ]] && echo "demo-cluster: report: $report"
[[ -n "$gallery" ]] && echo "demo-cluster: saliency gallery: $gallery"
exit 0
