#!/usr/bin/env bash
# Install embray and its test dependencies, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Debian's prometheus (server and promtool) for the alert-rule tests: installed where we may (root with apt-get);
# elsewhere tests/test_alerts.py skips those tests and says why.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
./scripts/lint.sh
.venv/bin/python -m pytest "$@"
