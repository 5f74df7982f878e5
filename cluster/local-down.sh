#!/usr/bin/env bash
# Stop the local head that cluster/local-up.sh started (by its PID; other Ray instances are left alone).
set -euo pipefail
DIR="${DERMRAY_RAY_DIR:-$HOME/.dermray/local-ray}"
if [[ ! -f "$DIR/head.pid" ]]; then
  echo "no head started by cluster/local-up.sh (no $DIR/head.pid)"
  exit 0
fi
pid="$(cat "$DIR/head.pid")"
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "the head (pid $pid) did not stop within 60 s; killing it" >&2
    kill -KILL "$pid"
  fi
fi
rm -f "$DIR/head.pid"
echo "Ray head stopped (pid $pid)"
