#!/usr/bin/env bash
# Two qmigrate builds against each other: OLD as the tunnel-server --qmp and NEW as migrate, then
# the other way round, over the direct data path, the relay, and multifd with zstd (so that every
# control message and setting crosses between the versions), then over ws://, tls:// and wss://
# (where each connection's end differs between tunnel protocol versions 1 and 2). Real QEMU,
# fresh pair per run; both sides must report completed.
#
#   scripts/interop.sh OLD_QMIGRATE NEW_QMIGRATE
#
# Build OLD from an earlier commit, e.g.:
#   git worktree add /tmp/old COMMIT && cargo build --manifest-path /tmp/old/Cargo.toml -p qmigrate
set -euo pipefail
old=$(realpath "${1:?usage: $0 OLD_QMIGRATE NEW_QMIGRATE}")
new=$(realpath "${2:?usage: $0 OLD_QMIGRATE NEW_QMIGRATE}")
dir=$(mktemp -d)
pids=()
listen=127.0.0.1:0
server_args=()
client_args=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no socket $1" >&2; exit 1; }

qemu() { # NAME [EXTRA...]
  local name=$1; shift
  qemu-system-x86_64 -nodefaults -display none -m 128 -accel tcg \
    -qmp "unix:$dir/$name.qmp,server=on,wait=off" "$@" >"$dir/$name.log" 2>&1 &
  pids+=($!)
  wait_socket "$dir/$name.qmp"
}

run() { # SERVER CLIENT LABEL [MIGRATE FLAGS...]
  local server=$1 client=$2 label=$3; shift 3
  rm -f "$dir"/*.qmp
  qemu src; qemu dst -incoming defer
  "$server" tunnel-server --listen "$listen" "${server_args[@]}" --qmp "$dir/dst.qmp" >"$dir/server.out" 2>"$dir/server.err" &
  local spid=$!; pids+=($spid)
  local url=""
  for _ in $(seq 100); do url=$(sed -n 's/^listening on //p' "$dir/server.out"); [ -n "$url" ] && break; sleep 0.1; done
  [ -n "$url" ] || { echo "$label: the server did not start" >&2; cat "$dir/server.err" >&2; exit 1; }
  if timeout 120 "$client" migrate --qmp "$dir/src.qmp" --to "$url" "${client_args[@]}" "$@" 2>"$dir/client.err"; then
    if grep -q "destination: completed" "$dir/client.err"; then
      echo "ok   $label $*"
    else
      echo "FAIL $label $*: no completed verdict"; cat "$dir/client.err"; exit 1
    fi
  else
    echo "FAIL $label $*"; cat "$dir/client.err" "$dir/server.err"; exit 1
  fi
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
}

for flags in "" "--relay" "--multifd 2 --compress zstd"; do
  # shellcheck disable=SC2086
  run "$old" "$new" "old server, new migrate:" $flags
  # shellcheck disable=SC2086
  run "$new" "$old" "new server, old migrate:" $flags
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 2>/dev/null
for scheme in ws tls wss; do
  listen="$scheme://127.0.0.1:0"
  server_args=()
  client_args=()
  case $scheme in
    ws) listen="$listen/" ;;
    wss) listen="$listen/"; server_args=(--tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem"); client_args=(--tls-ca "$dir/cert.pem") ;;
    tls) server_args=(--tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem"); client_args=(--tls-ca "$dir/cert.pem") ;;
  esac
  run "$old" "$new" "old server, new migrate ($scheme):"
  run "$new" "$old" "new server, old migrate ($scheme):"
done
echo "interop: all passed"
