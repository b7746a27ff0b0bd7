#!/usr/bin/env bash
# Regenerate the MLflow UI screenshots in docs/img/ (see docs/mlflow-ui.md).
#
# Builds a small collection from scratch in a scratch dir (hash model: no download, seconds per build):
#   backfill (v1, active) -> mutate the corpus -> refresh --promote (v2, child of v1, active)
#   -> migrate to a second hash model (v3, new fingerprint, candidate)
# then serves the same sqlite MLflow database with `mlflow server` on a free port of 127.0.0.2 and
# takes screenshots with headless Chromium (URLs and window sizes below; see docs/mlflow-ui.md).
# Nothing is left running; the scratch dir is removed unless KEEP=1.
#
# Usage (from anywhere): bash scripts/mlflow_screenshots.sh
# Needs: .venv (./scripts/setup.sh), chromium (installed with apt-get when missing and running as root),
# pngquant (optional, shrinks the PNGs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY="$REPO/.venv/bin/python"
E="$REPO/.venv/bin/embray"
MLFLOW="$REPO/.venv/bin/mlflow"
OUT="$REPO/docs/img"
BUDGET=${BUDGET:-20000}   # ms of Chromium virtual time for the single-page app to fetch and render

[ -x "$E" ] || { echo "no .venv: run ./scripts/setup.sh first" >&2; exit 2; }
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium pngquant >/dev/null
    else
        echo "chromium is missing: apt-get install chromium (as root)" >&2; exit 2
    fi
fi

SCRATCH=$(mktemp -d /tmp/embray-mlflow-shots.XXXXXX)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        # the server's process group: mlflow, its uvicorn worker and its huey job consumer.
        # mlflow 3.x takes a while to stop on TERM (the huey consumer lingers), so KILL after 5 s.
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 -- "-$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $SCRATCH" >&2; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
T0=$(date +%s)

# Our own local Ray per command, never a cluster found through the environment.
unset RAY_ADDRESS
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

# --- 1. a small collection: config, second model spec, corpus ---------------------------------
cd "$SCRATCH"
cat > embray.yaml <<'EOF'
# screenshot collection: synthetic corpus, hash model (no download), local store + sqlite MLflow
collection: shots
source: {uri: ./corpus, id_column: id, text_column: text}
store: {uri: ./store}
model: {backend: hash, name: words, dims: 64}
index: {metric: cos, dtype: f16, shards: 2}
embed: {batch_size: 512, actors: 1, num_cpus: 1}
mlflow: {tracking_uri: null}
ray: {address: null, num_cpus: 2}
EOF
# another vector space (different name, dims and seed, so a different fingerprint)
cat > other.yaml <<'EOF'
model: {backend: hash, name: words-v2, dims: 96, seed: 1}
EOF

"$PY" - <<'EOF'
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

rng = random.Random(7)
words = ("vector index shard version model fingerprint corpus refresh migrate promote rollback alias "
         "active candidate lineage parent manifest cache embedding query search ray mlflow parquet "
         "batch actor worker driver store bucket checksum verify lease writer").split()
rows = 3000
ids = [f"doc-{i:05d}" for i in range(rows)]
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in ids]
out = Path("corpus")
out.mkdir()
for f in range(4):
    pq.write_table(pa.table({"id": ids[f::4], "text": texts[f::4]}), out / f"part-{f:05d}.parquet")
EOF

# --- 2. backfill, change the corpus, refresh --promote, migrate -------------------------------
echo "== backfill" >&2
"$E" backfill --config embray.yaml --json > backfill.json
V1=$("$PY" -c 'import json;print(json.load(open("backfill.json"))["version"])')

"$PY" - <<'EOF'
# 60 changed texts, 25 deleted rows, 120 new rows: a typical small refresh
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

parts = sorted(Path("corpus").glob("part-*.parquet"))
t = pq.read_table(parts[0]).to_pydict()
ids, texts = t["id"], t["text"]
for i in range(60):
    texts[i] = texts[i] + " (revised)"
ids, texts = ids[:-25], texts[:-25]
pq.write_table(pa.table({"id": ids, "text": texts}), parts[0])
new = [f"doc-new-{i:04d}" for i in range(120)]
pq.write_table(pa.table({"id": new, "text": [f"new document {i} about shard lineage" for i in range(120)]}),
               Path("corpus") / "part-00004.parquet")
EOF

echo "== refresh --promote" >&2
"$E" refresh --config embray.yaml --promote --json > refresh.json
V2=$("$PY" -c 'import json;print(json.load(open("refresh.json"))["version"])')
echo "== migrate" >&2
"$E" migrate --config embray.yaml --model other.yaml --json > migrate.json
V3=$("$PY" -c 'import json;print(json.load(open("migrate.json"))["version"])')
"$E" versions --config embray.yaml >&2

# --- 3. mlflow server on the same sqlite database --------------------------------------------
# Served on 127.0.0.2, not 127.0.0.1: MLflow 3.x opens its "MLflow Assistant" side panel on first
# load when the page's host is localhost/127.0.0.1, and it would cover a third of every picture.
# (Linux routes all of 127/8 to loopback.) A non-localhost host must be allowed explicitly, for the
# Host header and for the UI's own POSTs (CORS origin), or the server answers 403.
HOST=127.0.0.2
DB="sqlite:///$SCRATCH/store/mlflow.db"
PORT=$("$PY" -c 'import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));print(s.getsockname()[1]);s.close()' "$HOST")
URL="http://$HOST:$PORT"
# setsid: a process group of its own (the server, its uvicorn worker and its huey job consumer),
# so cleanup ends exactly those and nothing else
setsid "$MLFLOW" server --backend-store-uri "$DB" --default-artifact-root "$SCRATCH/store/mlflow-artifacts" \
    --host "$HOST" --port "$PORT" --workers 1 \
    --allowed-hosts "$HOST,$HOST:$PORT" --cors-allowed-origins "$URL" > "$SCRATCH/mlflow-server.log" 2>&1 &
SERVER_PID=$!
for i in $(seq 1 120); do
    curl -fsS "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SCRATCH/mlflow-server.log" >&2; exit 1; }
    [ "$i" = 120 ] && { echo "mlflow server did not answer on $URL" >&2; tail -20 "$SCRATCH/mlflow-server.log" >&2; exit 1; }
    sleep 0.5
done
echo "== mlflow server at $URL" >&2

# ids the UI URLs need, asked from the server itself (REST API)
read -r EXP_ID RUN2 MV3 < <("$PY" - "$URL" "$V2" "$V3" <<'PYEOF'
import json, sys, urllib.parse, urllib.request
url, v2, v3 = sys.argv[1:4]
def get(path, **q):
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(q)}") as r:
        return json.load(r)
exp = get("experiments/get-by-name", experiment_name="embray/shots")["experiment"]["experiment_id"]
mvs = get("model-versions/search", filter="name='embray.shots'")["model_versions"]
by_version = {{t["key"]: t["value"] for t in m.get("tags", [])}.get("embray.version"): m for m in mvs}
print(exp, by_version[v2]["run_id"], by_version[v3]["version"])
PYEOF
)

# --- 4. screenshots ---------------------------------------------------------------------------
mkdir -p "$OUT"
shot() {  # shot FILE URL WIDTH,HEIGHT
    local file=$1 url=$2 win=$3
    # a fresh profile per shot, so no state (theme, dismissed banners, UI mode) leaks between runs
    chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
        --user-data-dir="$SCRATCH/chromium-profile" --force-device-scale-factor=1 \
        --window-size="$win" --virtual-time-budget="$BUDGET" --screenshot="$file" "$url" \
        >>"$SCRATCH/chromium.log" 2>&1
    rm -rf "$SCRATCH/chromium-profile"
    [ -s "$file" ] || { echo "no screenshot of $url" >&2; tail -20 "$SCRATCH/chromium.log" >&2; exit 1; }
    if command -v pngquant >/dev/null 2>&1; then
        pngquant --force --skip-if-larger --quality=70-95 --output "$file" -- "$file" || true
    fi
    echo "   $file ($(du -k "$file" | cut -f1) KB) <- $url" >&2
}
# ?workflowType=machine_learning: the "Model training" side of the UI (registry, runs), not GenAI
ML="workflowType=machine_learning"
echo "== screenshots" >&2
rm -f "$OUT"/mlflow-*.png
# the registered model: every version with its tags and aliases (1650 px tall: down to version 1)
shot "$OUT/mlflow-model-versions.png" "$URL/#/models/embray.shots?$ML" 1900,1650
# the candidate's model version: alias, source run, description, first tags (the tag table scrolls:
# alphabetically dims, fingerprint, model, parent, rejected are the ones in view)
shot "$OUT/mlflow-model-version.png" "$URL/#/models/embray.shots/versions/$MV3?$ML" 1500,1000
# the refresh's run: params (parent, fingerprint, model...), metrics, tags, dataset, registered model
shot "$OUT/mlflow-version-run.png" "$URL/#/experiments/$EXP_ID/runs/$RUN2?$ML" 1600,1450
# the experiment's runs: one per build, named <kind>-<version>, with the corpus dataset and its digest
shot "$OUT/mlflow-runs.png" "$URL/#/experiments/$EXP_ID/runs?$ML" 1500,420

echo "versions: $V1 (backfill) -> $V2 (refresh, active) ; $V3 (migrate, candidate)" >&2
echo "MLflow $("$PY" -c 'import mlflow;print(mlflow.__version__)'), $(chromium --version 2>/dev/null)" >&2
echo "done in $(( $(date +%s) - T0 ))s" >&2
