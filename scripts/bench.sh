#!/usr/bin/env bash
# The benchmark command: installs what it needs (socat, QEMU), builds the release binaries and
# runs `qmigrate-bench` with the given arguments, e.g.
#   ./scripts/bench.sh relay --size 2GiB --reps 3
# Run it on an otherwise idle machine: every variant shares the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# The benchmark (package qmigrate-bench) runs the qmigrate next to it: target/release/qmigrate.
cargo build --release --quiet -p qmigrate -p qmigrate-bench
exec target/release/qmigrate-bench "${@:-relay}"
