#!/usr/bin/env bash
# Installs dspark and streams a reply from the committed demo target. Extra arguments go to
# `dspark generate` (default: the GSM8K Natalia problem with the chat template).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
if [[ $# -eq 0 ]]; then
  set -- --chat "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?"
fi
exec .venv/bin/dspark generate "$@"
