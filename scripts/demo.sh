#!/usr/bin/env bash
# The demo: migrate a tiny VM with random RAM through qmigrate's WebSocket tunnel on this
# machine, then prove the destination's RAM is byte-identical to the source's.
#
#   ./scripts/demo.sh [--mem MIB] [--tcp] [--multifd N] [--keep]
#
# It installs what is missing (QEMU 10 from bookworm-backports), builds the release binary,
# starts a source VM and a `-incoming defer` destination VM, runs tunnel-server, tunnel-client,
# receive and send, verifies, prints a summary and cleans every process, socket and namespace
# up, also on Ctrl-C or failure. Run as root, the destination side (its QEMU and tunnel-server)
# lives in its own network namespace behind a veth pair, so the tunnel really crosses a network;
# otherwise everything talks over loopback.
set -euo pipefail

MEM=256
TRANSPORT=ws
MULTIFD=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mem) MEM=$2; shift 2 ;;
    --tcp) TRANSPORT=tcp; shift ;;
    --multifd) MULTIFD=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "demo: error: $*" >&2; exit 1; }

step "Installing prerequisites (QEMU 10 from bookworm-backports if missing)"
QMIGRATE_SKIP_QEMU72=1 ./scripts/install-deps.sh

step "Building qmigrate (release)"
cargo build --release --quiet --bin qmigrate
QM="$root/target/release/qmigrate"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after install"

work=$(mktemp -d /tmp/qmigrate-demo.XXXXXX)
pids=()
ns=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$ns" ]; then
    ip link del "qmd-$$-h" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  fi
  if [ $KEEP = 1 ]; then echo "demo: kept $work" >&2; else rm -rf "$work"; fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT TERM

# Network: the destination in its own namespace when we may create one.
dst_exec=()
listen_host=127.0.0.1
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && ip netns add "qmdemo-$$" 2>/dev/null; then
  ns="qmdemo-$$"
  # A private /30 that exists only between this host and the demo's own namespace.
  ip link add "qmd-$$-h" type veth peer name "qmd-$$-d"
  ip link set "qmd-$$-d" netns "$ns"
  ip addr add 10.213.77.1/30 dev "qmd-$$-h"
  ip link set "qmd-$$-h" up
  ip -n "$ns" addr add 10.213.77.2/30 dev "qmd-$$-d"
  ip -n "$ns" link set "qmd-$$-d" up
  ip -n "$ns" link set lo up
  dst_exec=(ip netns exec "$ns")
  listen_host=10.213.77.2
  step "Destination lives in network namespace $ns (10.213.77.2), source on the host (10.213.77.1)"
else
  step "Not root or no network namespaces here: the tunnel runs over loopback"
fi

step "Preparing a ${MEM} MiB guest with random RAM"
fw="$work/fw.bin"
python3 - "$fw" <<'PY'
import sys
fw = bytearray(64 * 1024)
fw[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # reset vector: hlt; jmp back - the vCPU idles, RAM untouched
open(sys.argv[1], "wb").write(fw)
PY
head -c "$((MEM * 1024 * 1024))" /dev/urandom > "$work/ram.src"
truncate -s "${MEM}M" "$work/ram.dst"

qemu_common=(-nodefaults -display none -accel kvm -accel tcg -bios "$fw" -machine q35,memory-backend=m0)
"${dst_exec[@]}" qemu-system-x86_64 "${qemu_common[@]}" \
  -object "memory-backend-file,id=m0,size=${MEM}M,mem-path=$work/ram.dst,share=off" \
  -qmp "unix:$work/dst.qmp,server=on,wait=off" -incoming defer 2>"$work/qemu-dst.log" &
pids+=($!)
qemu-system-x86_64 "${qemu_common[@]}" \
  -object "memory-backend-file,id=m0,size=${MEM}M,mem-path=$work/ram.src,share=off" \
  -qmp "unix:$work/src.qmp,server=on,wait=off" 2>"$work/qemu-src.log" &
pids+=($!)
for s in dst src; do
  for _ in $(seq 100); do [ -S "$work/$s.qmp" ] && break; sleep 0.1; done
  [ -S "$work/$s.qmp" ] || die "QEMU ($s) did not start: $(cat "$work/qemu-$s.log")"
done

# Waits for a tunnel process's ready line and prints the address after "listening on ".
ready() {
  local out=$1 pid=$2
  for _ in $(seq 100); do
    if grep -q 'listening on ' "$out" 2>/dev/null; then sed -n 's/^listening on //p' "$out" | head -n1; return; fi
    kill -0 "$pid" 2>/dev/null || die "$(basename "$out" .out) exited: $(cat "${out%.out}.err")"
    sleep 0.1
  done
  die "$(basename "$out" .out) did not become ready"
}

# The token both tunnel ends prove they know (the server refuses to listen beyond loopback
# without one); private from the start, never on a command line.
(umask 077 && head -c 32 /dev/urandom | base64 >"$work/token")

port=8765; [ $TRANSPORT = tcp ] && port=9999
[ -n "$ns" ] || port=0
ws_flag=(); [ $TRANSPORT = ws ] && ws_flag=(--ws)
step "Destination: qmigrate tunnel-server ${ws_flag[*]} --listen $listen_host:$port --token-file \$WORK/token --socket \$WORK/dest.sock"
"${dst_exec[@]}" "$QM" tunnel-server "${ws_flag[@]}" --listen "$listen_host:$port" \
  --token-file "$work/token" --socket "$work/dest.sock" --once >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
server_url=$(ready "$work/server.out" $!)
echo "    $server_url" >&2

step "Source: qmigrate tunnel-client --connect $server_url --token-file \$WORK/token --socket \$WORK/src.sock"
"$QM" tunnel-client "${ws_flag[@]}" --connect "$server_url" --token-file "$work/token" \
  --socket "$work/src.sock" --once >"$work/client.out" 2>"$work/client.err" &
pids+=($!)
ready "$work/client.out" $! >/dev/null

mf=(); [ -n "$MULTIFD" ] && mf=(--multifd "$MULTIFD")
step "Destination: qmigrate receive --qmp \$WORK/dst.qmp --socket \$WORK/dest.sock ${mf[*]}"
"$QM" receive --qmp "$work/dst.qmp" --socket "$work/dest.sock" "${mf[@]}"

step "Source: qmigrate send --qmp \$WORK/src.qmp --socket \$WORK/src.sock ${mf[*]}"
"$QM" send --qmp "$work/src.qmp" --socket "$work/src.sock" "${mf[@]}"

step "Verifying: destination RAM must equal source RAM (QMP pmemsave on both, SHA-256)"
python3 - "$work" "$MEM" <<'PY'
import hashlib, json, socket, sys
work, mem = sys.argv[1], int(sys.argv[2]) * 1024 * 1024

def qmp(path, *cmds):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    out = []
    for name, args in (("qmp_capabilities", {}),) + cmds:
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
        if "error" in msg:
            sys.exit(f"demo: QMP {name} failed: {msg['error']}")
        out.append(msg["return"])
    s.close()
    return out[1:]

digest = {}
for side in ("src", "dst"):
    dump = f"{work}/{side}.dump"
    status, mig, _ = qmp(f"{work}/{side}.qmp", ("query-status", {}), ("query-migrate", {}),
                         ("pmemsave", {"val": 0, "size": mem, "filename": dump}))
    digest[side] = hashlib.sha256(open(dump, "rb").read()).hexdigest()
    print(f"    {side}: vm {status['status']:<12} migration {mig.get('status', '-'):<10} ram sha256 {digest[side][:16]}...")
if digest["src"] != digest["dst"]:
    sys.exit("demo: FAILED: destination RAM differs from source RAM")
print(f"    OK: {mem >> 20} MiB of guest RAM arrived byte-identical")
PY

step "Tunnel summaries"
cat "$work/server.out" "$work/client.out" | grep -v '^listening on ' | sed 's/^/    /' >&2 || true
step "Demo completed: the VM moved through the ${TRANSPORT^^} tunnel and its RAM verified identical"
