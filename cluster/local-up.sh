#!/usr/bin/env bash
# Start a local Ray head on loopback with token authentication, for trying `ray job submit` on one machine.
# Run it from dermray's virtual environment (the head starts job drivers with the `python` on PATH).
#
# How to submit to it: docs/cluster.md, "Submit from a laptop" (tests/system/test_docs.py runs those commands as
# written); `make demo-cluster` (cluster/demo-cluster.sh) does the whole demo pipeline that way and stops the head.
# A job runs in an uploaded copy of the working directory without outputs/ and data/ (cluster/runtime_env.yaml),
# so its config's paths must be absolute (here: this machine's disk) or s3:// URIs; relative ones are refused.
#
# Settings (environment): DERMRAY_RAY_DIR (state: token, pid, logs; default ~/.dermray/local-ray), RAY_PORT (6379),
# DASHBOARD_PORT (8265), NUM_CPUS (all), RAY_AUTH_MODE (token; "disabled" turns authentication off), and for a
# machine that already runs another Ray: AGENT_PORT (the dashboard agent, Ray's default 52365; the job API needs
# it), METRICS_PORT, CLIENT_PORT (10001).
# The token is generated once into $DERMRAY_RAY_DIR/auth_token (mode 600) and never printed.
set -euo pipefail
DIR="${DERMRAY_RAY_DIR:-$HOME/.dermray/local-ray}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
mkdir -p "$DIR"
chmod 700 "$DIR"
if [[ -f "$DIR/head.pid" ]] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
  echo "a local head started by this script is already running (pid $(cat "$DIR/head.pid")); cluster/local-down.sh stops it" >&2
  exit 1
fi
if [[ "$RAY_AUTH_MODE" == "token" ]]; then
  if [[ ! -s "$DIR/auth_token" ]]; then
    (umask 077; python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$DIR/auth_token")
  fi
  export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
fi
args=(--head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" --dashboard-host 127.0.0.1
      --dashboard-port "$DASHBOARD_PORT" --include-dashboard true --disable-usage-stats
      --temp-dir "$DIR/tmp")
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${AGENT_PORT:-}" ]] && args+=(--dashboard-agent-listen-port "$AGENT_PORT")
[[ -n "${METRICS_PORT:-}" ]] && args+=(--metrics-export-port "$METRICS_PORT")
[[ -n "${CLIENT_PORT:-}" ]] && args+=(--ray-client-server-port "$CLIENT_PORT")
# --block keeps `ray start` in the foreground as the parent of the head's processes: stopping that one process
# (local-down.sh, by its PID) stops this head and nothing else on the machine.
# On SIGTERM (cluster/local-down.sh) Ray 2.60 first drains the node for Serve proxies, up to 30 s by default; this
# head runs batch jobs only, so it stops at once (measured: local-down.sh took ~30 s, now ~3 s).
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}" \
  nohup ray start "${args[@]}" > "$DIR/head.log" 2>&1 &
echo $! > "$DIR/head.pid"
for _ in $(seq 1 120); do
  # Up = the dashboard and the head's job agent both answer (`ray job submit` needs the agent: without it the head
  # says "No available agent to submit job").
  if python - "$DASHBOARD_PORT" "${AGENT_PORT:-52365}" <<'PY' 2>/dev/null; then
import sys, urllib.error, urllib.request
for port in sys.argv[1:]:
    try:  # any HTTP answer means the server is up (401 without a token is one)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
    except urllib.error.HTTPError:
        pass
PY
    echo "Ray head up: dashboard and job API at http://127.0.0.1:$DASHBOARD_PORT (pid $(cat "$DIR/head.pid"), log $DIR/head.log)"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
      echo "clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
    fi
    exit 0
  fi
  if ! kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "the Ray head exited while starting; see $DIR/head.log" >&2
    exit 1
  fi
  sleep 1
done
echo "the Ray head did not answer within 120 s; see $DIR/head.log" >&2
exit 1
