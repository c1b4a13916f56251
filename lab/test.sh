#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): brings the lab up (packages,
# libvirtd, guests; idempotent), checks formatting and lints, builds (the Cockpit page too), then
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash lab/up.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the built vmsnapd and vmsnapctl binaries, and the Cockpit page
# (cockpit/dist, installed by install.sh) in a browser.
bash lab/build-cockpit.sh
cargo build --workspace --locked
cargo test --workspace --locked
