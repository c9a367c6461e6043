#!/usr/bin/env bash
# Install and start everything vpnnat's demo and tests need on a fresh Debian 12
# machine. Idempotent: a second run installs nothing and only makes sure that
# PostgreSQL is running. Run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and starts PostgreSQL)" >&2
  exit 1
fi

packages=(
  iproute2 iputils-ping iputils-arping nftables procps psmisc curl ca-certificates python3 tcpdump socat
  wireguard-go wireguard-tools iperf3
  # the HTTP CONNECT proxy of the TLS-fallback tests and benchmark (started by
  # them in a namespace with their own config, pid and log files; no service)
  tinyproxy
  postgresql
  # strongSwan with userspace ESP (kernel-libipsec): the independent IPsec peer of the interop tests
  charon-systemd strongswan-swanctl libcharon-extra-plugins
  libstrongswan-standard-plugins libstrongswan-extra-plugins
  # the AES-GCM crypto floor of scripts/bench-throughput.sh (openssl speed)
  openssl
  # the customer PC's FTP server of the alg_* tests (started by them in a
  # namespace with their own config, in the foreground; no service)
  vsftpd
  chromium chromium-driver
  # the Debian packages of scripts/package.sh and their checks
  dpkg-dev binutils lintian
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Servers the tests run themselves (vsftpd, tinyproxy) must not start as
  # services in the host's own namespace: without a policy that forbids it,
  # forbid starting services for the time of the install.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    own_policy=1
  fi
  status=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || status=$?
  if [ -n "$own_policy" ]; then
    rm -f "$policy"
  fi
  [ "$status" -eq 0 ] || exit "$status"
fi

# PostgreSQL: the Debian cluster "15 main", started without systemd.
if ! pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
  pg_createcluster 15 main >/dev/null
fi
if ! pg_lsclusters -h | awk '$1==15 && $2=="main"{print $4}' | grep -q online; then
  pg_ctlcluster 15 main start
fi
# Tests connect as the superuser "postgres" over the unix socket and create one
# database per test. A password lets the URL form postgres://postgres:postgres@localhost work too.
su postgres -c "psql -qAtc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null

# axe-core, the accessibility checker the browser tests run inside the pages
# (test-support/src/browser.rs reads it from here): a pinned release from the
# npm registry, kept only when its SHA-256 is the expected one.
AXE_VERSION=4.10.2
AXE_SHA256=9ea2d2d6917da998122bdacfd3b473e31ead53f4b87146c716a12edf89158100
axe_dir=/var/cache/vpnnat-test/axe-core-$AXE_VERSION
if [ ! -s "$axe_dir/axe.min.js" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  curl -sSfL -o "$tmp/axe.tgz" "https://registry.npmjs.org/axe-core/-/axe-core-$AXE_VERSION.tgz"
  echo "$AXE_SHA256  $tmp/axe.tgz" | sha256sum -c --quiet -
  tar -xzf "$tmp/axe.tgz" -C "$tmp" package/axe.min.js
  install -d "$axe_dir"
  install -m 0644 "$tmp/package/axe.min.js" "$axe_dir/axe.min.js"
fi

# cargo-nextest is not needed; the tests run with plain `cargo test`.
echo "setup.sh: prerequisites ready"
