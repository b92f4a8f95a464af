#!/usr/bin/env bash
# Train CLIP2Video: one Table-1 ablation row on MSR-VTT 9k (configs/train/msrvtt_9k_ablation_$VARIANT.yaml), with torchrun.
# Paths and launch come from the environment:
#   DATA      annotation files (see data/README.md)      FEATURES  frame folders (sample_frame.py output)
#   CLIP      OpenAI ViT-B-32.pt                          OUT       output folder (default runs/train_ablation_$VARIANT)
#   NPROC     processes on this node (default: number of GPUs, else 1); --batch_size 128 is the GLOBAL batch
#   NNODES, RDZV  multi-node: set NNODES=M and RDZV=HOST:PORT and run this same script on every node
#   (torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT; OUT on a shared file system).
#   VARIANT   meanP | seqTransf | tdb_sub | tdb_mlp | tdb | tdb_all | tab_base | tab_transformer | tab_tdb
# Extra flags are passed through, e.g. --precision bf16 --grad_checkpointing --resume latest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
: "${VARIANT:?set VARIANT}" "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CLIP:?set CLIP}"
OUT=${OUT:-runs/train_ablation_$VARIANT}
source scripts/launch.sh
"${LAUNCH[@]}" train.py --config "configs/train/msrvtt_9k_ablation_${VARIANT}.yaml" --do_train \
  --train_csv "$DATA/MSRVTT_train.9k.csv" --data_path "$DATA/MSRVTT_data.json" \
  --features_path "$FEATURES" --clip_path "$CLIP" --output_dir "$OUT" "$@"
