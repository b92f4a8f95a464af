#!/usr/bin/env bash
# Train with configs/train/msvd.yaml; environment and flags as in scripts/train.sh.
exec bash "$(dirname "$0")/train.sh" msvd "$@"
