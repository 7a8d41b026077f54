#!/usr/bin/env bash
# The package's test (.ci/run runs it after the tests; as root): builds the .deb
# (scripts/package.sh), installs it with dpkg -i and checks what it installed:
#   - the files are there, the binary stripped, the group `qmigrate` made (sysusers);
#   - every man page renders with `man -l` without warnings, and the tunnel-server page names
#     every flag of `qmigrate tunnel-server --help`;
#   - the bash completion loads (`complete -p qmigrate`), the zsh and fish ones parse if those
#     shells are here;
#   - `systemd-analyze verify` passes for the unit, and `systemd-analyze security --offline`
#     rates it at most 2.0 (it prints the score);
#   - the example config passes --check-config;
#   - /usr/bin/qmigrate carries a real migration (halting-firmware guests, random RAM) through a
#     tunnel-server run from a config file, and its metrics count it.
# Then it purges the package. Exit 0 only if all of that held.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
say() { echo "package-test: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"

missing=()
command -v man >/dev/null || missing+=(man-db)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v readelf >/dev/null || missing+=(binutils)
command -v qemu-system-x86_64 >/dev/null || fail "QEMU missing: run scripts/install-deps.sh"
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

start=$(date +%s)
deb=$(./scripts/package.sh)
say "built $deb in $(($(date +%s) - start))s: $(du -k "$deb" | cut -f1) KiB, installed size $(dpkg-deb -f "$deb" Installed-Size) KiB, Depends: $(dpkg-deb -f "$deb" Depends)"

work=$(mktemp -d /tmp/qmigrate-package-test.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  dpkg --purge qmigrate >/dev/null 2>&1 || true
  if [ $rc != 0 ] && [ -d "$work" ]; then
    for log in "$work"/*.log; do [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }; done
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

dpkg -i "$deb" >&2
say "installed"

# The files.
for f in /usr/bin/qmigrate /etc/qmigrate/tunnel-server.toml \
  /lib/systemd/system/qmigrate-tunnel-server.service /usr/lib/sysusers.d/qmigrate.conf \
  /usr/share/man/man1/qmigrate.1.gz /usr/share/man/man1/qmigrate-tunnel-server.1.gz \
  /usr/share/man/man1/qmigrate-migrate.1.gz /usr/share/man/man1/qmigrate-completions.1.gz \
  /usr/share/bash-completion/completions/qmigrate /usr/share/zsh/vendor-completions/_qmigrate \
  /usr/share/fish/vendor_completions.d/qmigrate.fish /usr/share/doc/qmigrate/README.md; do
  [ -e "$f" ] || fail "$f is not installed"
done
if readelf -S /usr/bin/qmigrate | grep -q '\.symtab'; then fail "/usr/bin/qmigrate is not stripped"; fi
getent group qmigrate >/dev/null || fail "the group qmigrate was not made"
/usr/bin/qmigrate --version >&2
[ -z "$(dpkg -L qmigrate | grep '^/etc/qmigrate/token')" ] || fail "the package ships a token"

# The man pages: each renders without warnings; tunnel-server's names every flag of its --help.
pages=(/usr/share/man/man1/qmigrate*.1.gz)
[ ${#pages[@]} -ge 7 ] || fail "only ${#pages[@]} man pages: ${pages[*]}"
for page in "${pages[@]}"; do
  warnings=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) || fail "man -l $page failed: $warnings"
  [ -z "$warnings" ] || fail "man -l $page warns: $warnings"
  MANWIDTH=80 man -l "$page" 2>/dev/null | grep -q qmigrate || fail "man -l $page renders nothing"
done
ts_page=$(MANWIDTH=200 man -l /usr/share/man/man1/qmigrate-tunnel-server.1.gz 2>/dev/null)
for flag in $(/usr/bin/qmigrate tunnel-server --help | grep -o -- '--[a-z][a-z-]*' | sort -u); do
  grep -q -- "$flag" <<<"$ts_page" || fail "the tunnel-server man page lacks $flag"
done
say "${#pages[@]} man pages render"

# The completions.
bash -c 'source /usr/share/bash-completion/completions/qmigrate && complete -p qmigrate' >&2 \
  || fail "the bash completion does not load"
if command -v zsh >/dev/null; then zsh -n /usr/share/zsh/vendor-completions/_qmigrate || fail "zsh completion"; fi
if command -v fish >/dev/null; then fish -n /usr/share/fish/vendor_completions.d/qmigrate.fish || fail "fish completion"; fi
say "completions load"

# The unit.
unit=/lib/systemd/system/qmigrate-tunnel-server.service
systemd-analyze verify "$unit" >&2 || fail "systemd-analyze verify $unit"
security=$(systemd-analyze security --offline=true "$unit" 2>&1) || fail "systemd-analyze security: $security"
score=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p' <<<"$security")
[ -n "$score" ] || fail "no exposure score in: $security"
say "systemd-analyze security: exposure $score"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "exposure $score is above 2.0:
$(grep '✗' <<<"$security")"

# The example config, as the service runs it (the token as its credential).
(umask 077 && head -c 32 /dev/urandom | base64 >"$work/token")
/usr/bin/qmigrate tunnel-server --config /etc/qmigrate/tunnel-server.toml --token-file "$work/token" \
  --check-config >&2 || fail "the example config does not pass --check-config"

# A real migration with the installed binary: two halting-firmware guests, 64 MiB of random
# RAM, a tunnel-server from a config file (WebSocket, a token, a route, metrics).
mem=64
head -c 65536 /dev/zero >"$work/fw.bin"
printf '\xf4\xeb\xfd' | dd of="$work/fw.bin" bs=1 seek=$((0xFFF0)) conv=notrunc status=none
head -c $((mem << 20)) /dev/urandom >"$work/ram.src"
common=(-nodefaults -display none -accel kvm -accel tcg -bios "$work/fw.bin" -machine q35,memory-backend=m0)
qemu-system-x86_64 "${common[@]}" -object "memory-backend-ram,id=m0,size=${mem}M" \
  -qmp "unix:$work/dst.qmp,server=on,wait=off" -incoming defer -S 2>"$work/qemu-dst.log" &
pids+=($!)
qemu-system-x86_64 "${common[@]}" \
  -object "memory-backend-file,id=m0,size=${mem}M,mem-path=$work/ram.src,share=off" \
  -qmp "unix:$work/src.qmp,server=on,wait=off" 2>"$work/qemu-src.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/src.qmp" ] && [ -S "$work/dst.qmp" ] && break; sleep 0.1; done
[ -S "$work/dst.qmp" ] || fail "QEMU did not start"

cat >"$work/server.toml" <<TOML
listen = "127.0.0.1:0"
transport = "ws"
token-file = "$work/token"
metrics = "127.0.0.1:0"

[routes]
vm = "$work/dst.qmp"
TOML
/usr/bin/qmigrate tunnel-server --config "$work/server.toml" >"$work/server.out" 2>"$work/server.log" &
server=$!
pids+=($server)
for _ in $(seq 100); do grep -q '^listening on ' "$work/server.out" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$work/server.out")
[ -n "$url" ] || fail "tunnel-server did not start"
metrics=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$work/server.log")

/usr/bin/qmigrate migrate --qmp "$work/src.qmp" --to "${url}vm" --token-file "$work/token" \
  --no-start >"$work/migrate.log" 2>&1 || fail "the migration failed: $(tail -n 20 "$work/migrate.log")"
grep -q 'destination: completed' "$work/migrate.log" || fail "no destination verdict: $(cat "$work/migrate.log")"

scrape() {
  local host=${metrics%:*} port=${metrics##*:}
  exec 3<>"/dev/tcp/$host/$port"
  printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$metrics" >&3
  cat <&3
  exec 3<&-
}
for _ in $(seq 50); do
  scrape >"$work/metrics.txt"
  grep -q '^qmigrate_migrations_completed_total{route="vm"} 1$' "$work/metrics.txt" && break
  sleep 0.1
done
grep -q '^qmigrate_migrations_completed_total{route="vm"} 1$' "$work/metrics.txt" \
  || fail "the metrics do not count the migration: $(grep route= "$work/metrics.txt")"
kill -TERM "$server"
wait "$server" || fail "tunnel-server exited with $? after SIGTERM: $(tail -n 5 "$work/server.log")"
say "a migration through /usr/bin/qmigrate completed and was counted"

dpkg --purge qmigrate >&2
[ ! -e /usr/bin/qmigrate ] || fail "dpkg --purge left /usr/bin/qmigrate"
say "OK ($(($(date +%s) - start))s)"
