#!/usr/bin/env bash
# Install embray, build the demo corpus (Python stdlib docstrings, offline), backfill it on a local Ray
# with MiniLM into ./demo/store (local disk + sqlite MLflow), list the versions and run a sample search.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
E=.venv/bin/embray
$E demo --out demo
$E backfill --config demo/embray.yaml
$E versions --config demo/embray.yaml
$E search --config demo/embray.yaml "parse a JSON document into Python objects" -k 5
$E search --config demo/embray.yaml "compress data with gzip" -k 5
echo
echo "MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/demo/store/mlflow.db --port 5000"
