#!/usr/bin/env bash
# Installs dspark and serves the committed demo models (DSpark drafter, Algorithm 1 budget)
# over the OpenAI API on a local Ray cluster with an embedded Redis; prints the URL and a
# curl to paste. Ctrl-C stops everything. Extra arguments go to `dspark serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/dspark serve "$@"
