#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite.
#   bash scripts/test.sh [pytest args...]
# Uses the active virtualenv/conda env if there is one, else creates ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[test.sh] creating .venv"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! python -c "import torch, open_clip" 2>/dev/null; then
  echo "[test.sh] installing requirements"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  mkdir -p .venv && echo "$want" > "$stamp"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q "$@"
