#!/usr/bin/env bash
# The built-in demo: synthetic videos → frames → training (mean pooling, TDB, TDB+TAB, CLIP-ViP) →
# evaluation → a results table (printed and in demo_out/report.md) and a retrieval picture.
#   bash scripts/demo.sh [--out DIR] [--seed N] [--epochs N] [--quick]
# CPU only, no downloads beyond the Python packages; README ("The demo") gives the time it took.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python scripts/demo.py "$@"
