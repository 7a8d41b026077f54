#!/usr/bin/env bash
# Installs what qmigrate's tests, demo and benchmark need on a Debian bookworm machine:
# QEMU 10 from bookworm-backports (bookworm's own 7.2 has no `channels`), socat for the
# benchmark, iproute2 for the demo's network namespace, and QEMU 7.2 unpacked into
# target/qemu-7.2 for the uri-fallback tests, and promtool into target/prometheus for the metrics
# tests. Idempotent; safe to run again.
set -euo pipefail

say() { echo "install-deps: $*" >&2; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { say "need root (or sudo) to install packages"; exit 1; }
  SUDO=sudo
fi

root=$(cd "$(dirname "$0")/.." && pwd)

need_update=1
apt_update() { if [ $need_update = 1 ]; then $SUDO apt-get update -q >&2; need_update=0; fi; }

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null || return 1
  local major
  major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
  [ "${major:-0}" -ge 9 ]
}

add_backports() {
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then return; fi
  # Same mirror, components and key as the existing bookworm entry.
  local src=/etc/apt/sources.list.d/debian.sources uris comps key
  if [ -f "$src" ]; then
    uris=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/) {print u; exit} }' "$src")
    comps=$(awk '/^Suites:/{s=$0} /^Components:/{ if (s ~ /bookworm( |$)/) {sub(/^Components: */,""); print; exit} }' "$src")
    key=$(awk '/^Suites:/{s=$0} /^Signed-By:/{ if (s ~ /bookworm( |$)/) {print $2; exit} }' "$src")
  fi
  uris=${uris:-http://deb.debian.org/debian}
  comps=${comps:-main}
  key=${key:-/usr/share/keyrings/debian-archive-keyring.gpg}
  say "adding bookworm-backports ($uris, $comps)"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: %s\nSigned-By: %s\n' \
    "$uris" "$comps" "$key" | $SUDO tee /etc/apt/sources.list.d/qmigrate-backports.sources >/dev/null
}

if ! qemu_ok; then
  add_backports
  apt_update
  say "installing qemu-system-x86 from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -t bookworm-backports \
    --no-install-recommends qemu-system-x86 >&2
fi

# The real-guest tests (crates/testkit/src/guest/) make their disk with qemu-img (a Recommends of
# qemu-system-x86, which --no-install-recommends leaves out), build the static workload with gcc
# and static glibc, and fetch Debian's cloud kernel and busybox-static with `apt-get download`,
# which needs package lists that know them.
if ! command -v qemu-img >/dev/null; then
  apt_update
  from=()
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    from=(-t bookworm-backports)
  fi
  say "installing qemu-utils (qemu-img)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${from[@]}" \
    qemu-utils >&2
fi
if ! apt-cache show linux-image-cloud-amd64 busybox-static >/dev/null 2>&1; then
  apt_update
fi

missing=()
command -v gcc >/dev/null || missing+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
command -v socat >/dev/null || missing+=(socat)
# The relay benchmark's tls and wss variants make their certificate with openssl.
command -v openssl >/dev/null || missing+=(openssl)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# QEMU 7.2 beside QEMU 10, unpacked, never installed: the uri-fallback tests run it with
# `-L DIR/usr/share/qemu`.
old="$root/target/qemu-7.2"
if [ "${QMIGRATE_SKIP_QEMU72:-0}" != 1 ] && [ ! -x "$old/usr/bin/qemu-system-x86_64" ]; then
  apt_update
  tmp=$(mktemp -d)
  say "fetching QEMU 7.2 from bookworm into $old"
  (cd "$tmp" && apt-get download -q qemu-system-x86/bookworm qemu-system-data/bookworm >&2)
  mkdir -p "$old"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$old"; done
  rm -rf "$tmp"
fi

# promtool (Debian's prometheus package, unpacked into target/prometheus, never installed: no
# service, no user) checks the metrics of `tunnel-server --metrics` in the tests.
prom="$root/target/prometheus"
if ! command -v promtool >/dev/null && [ ! -x "$prom/usr/bin/promtool" ]; then
  apt_update
  tmp=$(mktemp -d)
  say "fetching promtool (prometheus) into $prom"
  (cd "$tmp" && apt-get download -q prometheus >&2)
  mkdir -p "$prom"
  dpkg -x "$tmp"/prometheus_*.deb "$prom"
  rm -rf "$tmp"
fi

qemu-system-x86_64 --version | head -n1 >&2
