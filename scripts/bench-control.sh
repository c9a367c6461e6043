#!/usr/bin/env bash
# Control-plane benchmark (not a test): maintenance requests per second and
# p50/p99 latency of POST /api/v1/agent/requests against a release build of
# maintenance-server, with 1 000 enrolled sites, on SQLite and on PostgreSQL,
# without and with one desired-state long-poll held per site.
#
# Everything runs on this machine and talks to 127.0.0.1 only; the server,
# its temporary state and the PostgreSQL database bench_<pid> are removed at
# the end (also on failure).
#
#   scripts/bench-control.sh                  # all four runs
#   DBS=sqlite LONG_POLLS=no scripts/bench-control.sh
#   SITES=1000 REQUESTS=20000 CONCURRENCY=8 scripts/bench-control.sh
#
# Prints one markdown table row per run (the format of docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SITES=${SITES:-1000}
REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-8}
DBS=${DBS:-"sqlite postgres"}
LONG_POLLS=${LONG_POLLS:-"no yes"}
PG_ADMIN=${PG_ADMIN:-postgres://postgres:postgres@localhost:5432/postgres}
export PGOPTIONS="--client-min-messages=warning"

cargo build --release --quiet -p maintenance-server --bin maintenance-server --example bench_control
server_bin=target/release/maintenance-server
bench_bin=target/release/examples/bench_control

tmp=$(mktemp -d)
server_pid=""
pg_db="bench_$$"
pg_created=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$pg_created" ]; then psql "$PG_ADMIN" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

start_server() { # $1 = database url ("" for SQLite in $tmp)
  local run_dir="$tmp/run$RANDOM"
  mkdir -p "$run_dir"
  cat >"$run_dir/server.toml" <<EOF
[http]
listen = "127.0.0.1:0"
[state]
dir = "$run_dir/state"
[database]
url = "$1"
max_connections = 16
# The benchmark opens many requests per site and ends none: it measures the
# control plane, not the per-site limits.
[quotas]
open_requests_per_site = 100000
terminals_per_site = 100000
requests_per_minute = 1000000
EOF
  RUST_LOG=warn,maintenance_server=info "$server_bin" --config "$run_dir/server.toml" serve >"$run_dir/log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/.*listening addr=\([0-9.:]*\).*/\1/p' "$run_dir/log" | head -1)
    [ -n "$addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$run_dir/log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "server did not start" >&2; cat "$run_dir/log" >&2; exit 1; }
  token=$("$server_bin" --config "$run_dir/server.toml" operator-token)
}

stop_server() {
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
}

echo "| database | sites | long-polls held | requests | in flight | requests/s | p50 ms | p99 ms | max ms | long-poll answers |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for db in $DBS; do
  for lp in $LONG_POLLS; do
    url=""
    if [ "$db" = postgres ]; then
      psql "$PG_ADMIN" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null
      psql "$PG_ADMIN" -qAtc "CREATE DATABASE $pg_db" >/dev/null
      pg_created=1
      url="${PG_ADMIN%/*}/$pg_db"
    fi
    start_server "$url"
    flag=""; [ "$lp" = yes ] && flag="--long-polls"
    "$bench_bin" --url "http://$addr" --operator-token "$token" --sites "$SITES" \
      --requests "$REQUESTS" --concurrency "$CONCURRENCY" --label "$db" $flag
    stop_server
  done
done
