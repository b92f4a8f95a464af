#!/usr/bin/env bash
# Evaluate on the msrvtt_1ka protocol (configs/eval/msrvtt_1ka.yaml); environment and flags as in scripts/eval.sh.
exec bash "$(dirname "$0")/eval.sh" msrvtt_1ka "$@"
