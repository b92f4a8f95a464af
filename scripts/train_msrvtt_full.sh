#!/usr/bin/env bash
# Train with configs/train/msrvtt_full.yaml; environment and flags as in scripts/train.sh.
exec bash "$(dirname "$0")/train.sh" msrvtt_full "$@"
