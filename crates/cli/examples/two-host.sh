#!/usr/bin/env bash
# The two-host flow, to copy and adapt: run the DESTINATION half on the destination host and
# the SOURCE half on the source host. Paths and the address are examples; every flag shown
# has a default (see `qmigrate <command> --help`).
#
#   crates/cli/examples/two-host.sh dest   DEST_LISTEN_ADDR          # e.g. 0.0.0.0:8765
#   crates/cli/examples/two-host.sh source ws://DEST_HOST:8765/      # the server's URL
#
# Both hosts need the same token file (TOKEN_FILE, default ./token), private to its owner.
# Make it once and copy it over a trusted channel, keeping the mode:
#   head -c 32 /dev/urandom | base64 > token; chmod 600 token; scp -p token DEST_HOST:
# Every tunnel connection proves it knows the token; it never crosses the network.
set -euo pipefail
role=${1:?usage: two-host.sh dest LISTEN_ADDR | source SERVER_URL}
addr=${2:?usage: two-host.sh dest LISTEN_ADDR | source SERVER_URL}
token=${TOKEN_FILE:-./token}

case "$role" in
  dest)
    # 1. The destination QEMU: same machine type and devices as the source, waiting for
    #    migrate-incoming, QMP on a Unix socket.
    #      qemu-system-x86_64 ... -qmp unix:/run/qemu/dest.qmp,server=on,wait=off -incoming defer
    # 2. The tunnel server: each tunnel connection becomes one connection to QEMU's socket.
    #    Without a token it would refuse to listen on anything but 127.0.0.1.
    qmigrate tunnel-server --ws --listen "$addr" --token-file "$token" \
      --socket /tmp/qemu_migration_dest.sock --once &
    server=$!
    # 3. Prepare QEMU: capabilities, parameters, migrate-incoming on that socket.
    qmigrate receive --qmp /run/qemu/dest.qmp --socket /tmp/qemu_migration_dest.sock
    wait "$server"
    ;;
  source)
    # 1. The tunnel client: QEMU connects to this Unix socket, each connection is tunnelled.
    ready=$(mktemp)
    qmigrate tunnel-client --ws --connect "$addr" --token-file "$token" \
      --socket /tmp/qemu_migration_source.sock --once >"$ready" &
    client=$!
    # It prints one line, "listening on unix:PATH -> URL", once the socket is there.
    until grep -q 'listening on' "$ready"; do kill -0 "$client" || exit 1; sleep 0.1; done
    # 2. Migrate, with progress; exit code 0 only when QEMU says completed.
    qmigrate send --qmp /run/qemu/src.qmp --socket /tmp/qemu_migration_source.sock
    wait "$client"
    ;;
  *) echo "role must be dest or source" >&2; exit 2 ;;
esac
