#!/usr/bin/env bash
# Evaluate on the vatex_1k5 protocol (configs/eval/vatex_1k5.yaml); environment and flags as in scripts/eval.sh.
exec bash "$(dirname "$0")/eval.sh" vatex_1k5 "$@"
