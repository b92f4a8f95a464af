#!/usr/bin/env bash
# Evaluate on the msvd protocol (configs/eval/msvd.yaml); environment and flags as in scripts/eval.sh.
exec bash "$(dirname "$0")/eval.sh" msvd "$@"
