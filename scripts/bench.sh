#!/usr/bin/env bash
# The benchmark command: installs what it needs (socat, QEMU), builds the release binaries and
# runs `qmigrate-bench` with the given arguments, e.g.
#   ./scripts/bench.sh relay --size 2GiB --reps 3
# Run it on an otherwise idle machine: every variant shares the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --quiet --bin qmigrate --bin qmigrate-bench
exec target/release/qmigrate-bench "${@:-relay}"
