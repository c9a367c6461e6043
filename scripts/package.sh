#!/usr/bin/env bash
# Builds the Debian packages of the three programs:
#   vpnnat-maintenance-server, vpnnat-gateway, vpnnat-router-agent
# each with its binary in /usr/bin, its systemd unit, its commented
# configuration as a conffile under /etc/vpnnat/ (dpkg keeps an operator's
# edits on upgrade) and maintainer scripts that create the system user
# `vpnnat` and the state directory /var/lib/vpnnat (owner vpnnat, mode 0700).
#
# Usage: scripts/package.sh [--profile release|dev] [--bin-dir DIR]
#                           [--version V] [--out DIR]
#   --profile  cargo profile to build (default release)
#   --bin-dir  take the binaries from DIR instead of building them
#   --version  package version (default: the workspace version)
#   --out      where the .deb files go (default target/debian)
#   --compress xz (default), gzip or none: the payload's compression
#
# Needs dpkg-deb and dpkg-shlibdeps (dpkg-dev); no root (the files are owned
# by root in the archive all the same: --root-owner-group).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
bin_dir=""
version=""
out=target/debian
compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --compress) compress=${2:?--compress needs a value}; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$compress" in xz|gzip|none) ;; *) echo "package.sh: --compress $compress: xz, gzip or none" >&2; exit 2 ;; esac
for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture strip gzip; do
  command -v "$tool" >/dev/null || { echo "package.sh: needs $tool (apt-get install dpkg-dev binutils)" >&2; exit 1; }
done

if [ -z "$version" ]; then
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
fi
# Debian version syntax (policy §5.6.12): starts with a digit.
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || { echo "package.sh: --version $version is not a Debian version" >&2; exit 2; }

programs=(maintenance-server gateway router-agent)
if [ -z "$bin_dir" ]; then
  target=${CARGO_TARGET_DIR:-target}
  case "$profile" in
    dev) bin_dir=$target/debug ;;
    *) bin_dir=$target/$profile ;;
  esac
  cargo build --locked --profile "$profile" -p maintenance-server -p gateway -p router-agent --bins
fi
for p in "${programs[@]}"; do
  [ -x "$bin_dir/$p" ] || { echo "package.sh: $bin_dir/$p is missing (build it, or leave out --bin-dir)" >&2; exit 1; }
done

arch=$(dpkg-architecture -qDEB_HOST_ARCH)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# Dates (changelog, file times in the archive) are the last commit's, so
# that a package built twice from one commit is the same.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
when=$(date -R -d "@$SOURCE_DATE_EPOCH")
maintainer="vpnnat maintainers <maintainers@vpnnat.invalid>"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

summary() {
  case "$1" in
    maintenance-server) echo "vpnnat center: maintenance requests, NAT-address pool, console" ;;
    gateway) echo "vpnnat gateway: userspace VPN tunnels toward the center LAN" ;;
    router-agent) echo "vpnnat router agent: 1:1 NAT of a customer LAN, customer page" ;;
  esac
}

description() {
  case "$1" in
    maintenance-server) cat <<'EOF'
 The center of vpnnat: sites enroll with it, customers ask for maintenance
 from their router's page, technicians start and end the work in its
 console. It hands out a pooled VPN-NAT address per terminal, picks a
 gateway with free tunnel capacity and moves sites when a gateway fails.
 State is SQLite under /var/lib/vpnnat or PostgreSQL.
EOF
    ;;
    gateway) cat <<'EOF'
 Terminates the customer routers' tunnels (WireGuard over UDP, and over
 TLS on TCP 443 when a site's UDP is blocked) in userspace on a TUN device
 and routes the technicians' traffic to the sites' VPN-NAT addresses,
 each site isolated from every other. Operators scale by starting more.
EOF
    ;;
    router-agent) cat <<'EOF'
 Runs on a customer's router (or a host in its LAN): enrolls the site,
 serves the page where the customer asks for maintenance, dials the
 tunnel to the gateway it is given and installs the 1:1 static NAT of the
 requested terminals in its userspace packet path, only while a
 maintenance is open.
EOF
    ;;
  esac
}

for p in "${programs[@]}"; do
  pkg=vpnnat-$p
  root=$work/$pkg
  doc=$root/usr/share/doc/$pkg
  install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/etc/vpnnat" "$root/lib/systemd/system" "$doc"

  install -m 0755 "$bin_dir/$p" "$root/usr/bin/$p"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$p"
  install -m 0644 "config/$p.toml" "$root/etc/vpnnat/$p.toml"
  # The unit as shipped for a hand install, with the package's paths.
  sed -e 's#/usr/local/bin/#/usr/bin/#' \
      -e "s#^Documentation=.*#Documentation=file:///usr/share/doc/$pkg/OPERATIONS.md.gz#" \
      "config/systemd/vpnnat-$p.service" > "$root/lib/systemd/system/vpnnat-$p.service"
  chmod 0644 "$root/lib/systemd/system/vpnnat-$p.service"
  gzip -9n -c docs/OPERATIONS.md > "$doc/OPERATIONS.md.gz"
  cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vpnnat
Source: https://example.invalid/vpnnat

Files: *
Copyright: 2026 the vpnnat authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can
 be found in the file '/usr/share/common-licenses/Apache-2.0'.
EOF
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from vpnnat commit %s.\n\n -- %s  %s\n' \
    "$pkg" "$version" "$commit" "$maintainer" "$when" | gzip -9n > "$doc/changelog.gz"
  chmod 0644 "$doc"/*

  # The shared libraries the binary links, as dpkg-shlibdeps words them (it
  # wants a debian/control beside it).
  mkdir -p "$work/shlibs-$p/debian"
  printf 'Source: vpnnat\n\nPackage: %s\nArchitecture: any\n' "$pkg" > "$work/shlibs-$p/debian/control"
  shlibs=$(cd "$work/shlibs-$p" && dpkg-shlibdeps -O "$root/usr/bin/$p" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
  [ -n "$shlibs" ] || { echo "package.sh: dpkg-shlibdeps found no libraries for $p" >&2; exit 1; }

  installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: $pkg"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $installed_kb"
    echo "Depends: $shlibs, adduser"
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: https://example.invalid/vpnnat"
    echo "Description: $(summary "$p")"
    description "$p"
  } > "$root/DEBIAN/control"
  echo "/etc/vpnnat/$p.toml" > "$root/DEBIAN/conffiles"

  cat > "$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    # The system user every vpnnat service runs as (the units' User=); its
    # home is the state directory. Left in place on purge, as Debian does.
    if ! getent passwd vpnnat >/dev/null; then
        adduser --quiet --system --group --no-create-home --home /var/lib/vpnnat vpnnat
    fi
    # The state directory (database, identities, credentials): the
    # service's alone. An existing one is left as the operator has it.
    if [ ! -d /var/lib/vpnnat ]; then
        install -d -o vpnnat -g vpnnat -m 0700 /var/lib/vpnnat
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        # An upgrade restarts a running service. A first install starts
        # nothing: the program needs its configuration (and an agent its
        # enrollment) first; then: systemctl enable --now $pkg
        if [ -n "\$2" ]; then
            deb-systemd-invoke try-restart $pkg.service >/dev/null || true
        fi
    fi
fi
exit 0
EOF
  cat > "$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop $pkg.service >/dev/null || true
fi
exit 0
EOF
  cat > "$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = purge ]; then
    # The link "systemctl enable" made; dpkg itself removes the conffile.
    rm -f /etc/systemd/system/multi-user.target.wants/$pkg.service
    rmdir --ignore-fail-on-non-empty /etc/vpnnat 2>/dev/null || true
    # /var/lib/vpnnat stays: it holds the center's database or a site's
    # identity, which a package removal must not lose. Remove it by hand.
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
EOF
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
  (cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

  deb=$out/${pkg}_${version}_${arch}.deb
  dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
  echo "$deb"
done
