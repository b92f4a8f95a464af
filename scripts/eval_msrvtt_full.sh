#!/usr/bin/env bash
# Evaluate on the msrvtt_full protocol (configs/eval/msrvtt_full.yaml); environment and flags as in scripts/eval.sh.
exec bash "$(dirname "$0")/eval.sh" msrvtt_full "$@"
