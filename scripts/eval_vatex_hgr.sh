#!/usr/bin/env bash
# Evaluate on the vatex_hgr protocol (configs/eval/vatex_hgr.yaml); environment and flags as in scripts/eval.sh.
exec bash "$(dirname "$0")/eval.sh" vatex_hgr "$@"
