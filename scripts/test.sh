#!/usr/bin/env bash
# The test command: installs QEMU (and the other test prerequisites) if missing, then runs the
# whole workspace's tests, real-QEMU end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
exec cargo test --workspace --all-targets "$@"
