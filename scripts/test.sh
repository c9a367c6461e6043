#!/usr/bin/env bash
# Runs every check: formatting, lints, all tests (unit, property, integration,
# network-namespace, interop, browser). This is the README's test command.
#
# As root it first installs the prerequisites (scripts/setup.sh). Tests that
# need root, TUN, namespaces, wireguard-go, strongSwan, PostgreSQL or chromium
# skip with a one-line reason when those are missing, except when CI is set:
# then a missing prerequisite fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/setup.sh
elif [ -n "${CI:-}" ]; then
  echo "test.sh: CI must run as root" >&2
  exit 1
fi

if [ -n "${CI:-}" ]; then
  # A fresh clone gains nothing from incremental state, and it doubles the
  # size of target/ (the CI disk is not large).
  export CARGO_INCREMENTAL=0
fi

step() { printf '\n==> %s\n' "$*"; }
start=$(date +%s)

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --workspace --bins"
# The namespace, interop and e2e tests start the programs from target/debug/.
# `cargo test` builds a package's binaries only for that package's own
# integration tests, so on a fresh clone the root package's tests would find
# no `gateway`: build every binary first (same profile, shared artifacts).
cargo build --workspace --bins --locked

step "cargo test --workspace"
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${VPNNAT_TEST_THREADS:-4}"

printf '\n==> all checks passed in %ss\n' "$(( $(date +%s) - start ))"
