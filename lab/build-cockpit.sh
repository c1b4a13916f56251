#!/usr/bin/env bash
# Builds the Cockpit page (cockpit/ -> cockpit/dist/) with npm and esbuild. Idempotent: npm ci
# runs only when package-lock.json changed since the last install; the build takes a second.
set -euo pipefail
cd "$(dirname "$0")/../cockpit"
command -v npm >/dev/null || { echo "build-cockpit: npm is missing (install Node.js 18+ and npm)" >&2; exit 1; }
if ! cmp -s package-lock.json node_modules/.vmsnap-installed-lock 2>/dev/null; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  cp package-lock.json node_modules/.vmsnap-installed-lock
fi
npm run --silent build
