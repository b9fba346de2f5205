#!/usr/bin/env bash
# One request's trace in a local tracing UI (Arize Phoenix), and a screenshot of it.
#
#   bash scripts/trace_ui.sh [OUT.png]
#
# Installs Phoenix into its own virtual environment (.venv-phoenix; pip), starts it on
# loopback (UI and OTLP/HTTP on port 6006), serves the demo with
# --otlp-traces-endpoint http://127.0.0.1:6006/v1/traces, sends one streamed chat request
# with a known W3C traceparent, waits until Phoenix has the trace, and takes a screenshot of
# the trace's page with headless Chromium (Debian's `chromium`). With KEEP=1 everything
# stays up for you to browse http://127.0.0.1:6006; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/trace-phoenix.png}
PHX_PORT=${PHX_PORT:-6006}
PORT=${PORT:-8010}
TRACE_ID=${TRACE_ID:-5d1b6e8f0c3a4b2e9f7a6c5d4e3b2a19}

bash scripts/setup.sh
if [[ ! -x .venv-phoenix/bin/phoenix ]]; then
  python3 -m venv .venv-phoenix
  .venv-phoenix/bin/pip install -q arize-phoenix
fi
command -v chromium >/dev/null || { echo "chromium not found (apt-get install chromium)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait || true; rm -rf "$work"; }
trap cleanup EXIT

PHOENIX_WORKING_DIR="$work/phoenix" PHOENIX_HOST=127.0.0.1 PHOENIX_PORT=$PHX_PORT \
  .venv-phoenix/bin/phoenix serve > "$work/phoenix.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PHX_PORT/" >/dev/null && break; sleep 0.5; done

.venv/bin/dspark serve --port "$PORT" \
  --otlp-traces-endpoint "http://127.0.0.1:$PHX_PORT/v1/traces" > "$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done

curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -H "traceparent: 00-$TRACE_ID-00f067aa0ba902b7-01" \
  -d '{"model": "dspark-demo", "stream": true, "max_tokens": 48, "temperature": 0,
       "stream_options": {"include_usage": true},
       "messages": [{"role": "user", "content": "What is 12 * 7?"}]}' > "$work/reply.txt"

# the trace's page: Phoenix's GraphQL names the project that holds it
query='{"query": "{ projects { edges { node { id name trace(traceId: \"'$TRACE_ID'\") { id } } } } }"}'
project=""
for _ in $(seq 60); do
  project=$(curl -sf "http://127.0.0.1:$PHX_PORT/graphql" -H 'Content-Type: application/json' \
    -d "$query" | .venv/bin/python -c '
import json, sys
edges = json.load(sys.stdin)["data"]["projects"]["edges"]
print(next((e["node"]["id"] for e in edges if e["node"]["trace"]), ""))') || true
  [[ -n "$project" ]] && break
  sleep 1
done
[[ -n "$project" ]] || { echo "Phoenix never showed trace $TRACE_ID" >&2; cat "$work/phoenix.log" >&2; exit 1; }
url="http://127.0.0.1:$PHX_PORT/projects/$project/traces/$TRACE_ID"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=15000 --screenshot="$OUT" "$url" 2>"$work/chromium.log"
echo "trace $TRACE_ID: $url"
echo "screenshot: $OUT"
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "Phoenix: http://127.0.0.1:$PHX_PORT (Ctrl-C stops everything)"
  wait
fi
