#!/usr/bin/env bash
# Creates one virtual environment per client tool under .clients/ (or $CLIENTS) and installs
# the versions run.sh was written against (latest on PyPI at the time). guidellm depends on
# torch: the CPU build torch==2.13.0 goes in first, so pip does not pull a CUDA build.
#   bash bench/clients/setup.sh            # all four
#   bash bench/clients/setup.sh guidellm   # one
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "${CLIENTS:-$REPO/.clients}"
cd "${CLIENTS:-$REPO/.clients}"
PY=${PYTHON:-python3}
mk() { [[ -x $1/bin/python ]] || "$PY" -m venv "$1"; "$1/bin/python" -m pip install -q --upgrade pip; }
for t in ${@:-aiperf guidellm lm_eval schemathesis}; do
  mk "$t"
  case $t in
    aiperf)       aiperf/bin/pip install -q 'aiperf==0.13.0' ;;
    guidellm)     guidellm/bin/pip install -q 'torch==2.13.0'
                  guidellm/bin/pip install -q 'guidellm==0.8.1' ;;
    lm_eval)      lm_eval/bin/pip install -q 'lm_eval[api]==0.4.13' transformers ;;  # transformers: HF tokenizer for local-completions (no torch needed)
    schemathesis) schemathesis/bin/pip install -q 'schemathesis==4.32.5' ;;
  esac
  echo "$t: $("$t/bin/pip" list 2>/dev/null | grep -iE "^(aiperf|guidellm|lm.eval|schemathesis|torch|transformers) " | tr -s ' ' | paste -sd, -)"
done
