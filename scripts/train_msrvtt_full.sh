#!/usr/bin/env bash
# Train CLIP2Video: MSR-VTT full split (7k train, val for selection) (configs/train/msrvtt_full.yaml), with torchrun.
# Paths and launch come from the environment:
#   DATA      annotation files (see data/README.md)      FEATURES  frame folders (sample_frame.py output)
#   CLIP      OpenAI ViT-B-32.pt                          OUT       output folder (default runs/train_msrvtt_full)
#   NPROC     processes on this node (default: number of GPUs, else 1); --batch_size 128 is the GLOBAL batch
#   NNODES, RDZV  multi-node: set NNODES=M and RDZV=HOST:PORT and run this same script on every node
#   (torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT; OUT on a shared file system).
# Extra flags are passed through, e.g. --precision bf16 --grad_checkpointing --resume latest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CLIP:?set CLIP}"
OUT=${OUT:-runs/train_msrvtt_full}
source scripts/launch.sh
"${LAUNCH[@]}" train.py --config configs/train/msrvtt_full.yaml --do_train \
  --train_csv "$DATA/MSRVTT_train.full.csv" --val_csv "$DATA/MSRVTT_val.full.csv" --data_path "$DATA/MSRVTT_data.json" \
  --features_path "$FEATURES" --clip_path "$CLIP" --output_dir "$OUT" "$@"
