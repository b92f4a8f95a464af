#!/usr/bin/env bash
# One Table-1 row on MSR-VTT 9k (configs/train/msrvtt_9k_ablation_$VARIANT.yaml); as scripts/train.sh, plus
#   VARIANT   meanP | seqTransf | tdb_sub | tdb_mlp | tdb | tdb_all | tab_base | tab_transformer | tab_tdb
: "${VARIANT:?set VARIANT (meanP seqTransf tdb_sub tdb_mlp tdb tdb_all tab_base tab_transformer tab_tdb)}"
OUT=${OUT:-runs/train_ablation_$VARIANT} exec bash "$(dirname "$0")/train.sh" "msrvtt_9k_ablation_$VARIANT" "$@"
