#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): brings the lab up (packages,
# libvirtd, guests; idempotent), checks formatting and lints, builds, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash lab/up.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the built vmsnapd and vmsnapctl binaries.
cargo build --workspace --locked
cargo test --workspace --locked
