#!/usr/bin/env bash
# Train CLIP2Video with one config of configs/train/, with torchrun.
#   bash scripts/train.sh CONFIG [extra flags]      CONFIG: a name in configs/train/ without .yaml, e.g.
#   msrvtt_9k, msrvtt_full, msvd, vatex, msrvtt_9k_ablation_tdb, msvd_vip (the config names the annotation
#   files it reads inside DATA: its annotations: entry)
# Paths and launch come from the environment:
#   DATA      annotation files (see data/README.md)      FEATURES  frame folders (sample_frame.py output)
#   CLIP      OpenAI ViT-B-32.pt                          OUT       output folder (default runs/train_CONFIG)
#   NPROC     processes on this node (default: number of GPUs, else 1); --batch_size 128 is the GLOBAL batch
#   NNODES, RDZV  multi-node: set NNODES=M and RDZV=HOST:PORT and run this same script on every node
#   (torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT; OUT on a shared file system).
#   VAL_CSV   MSR-VTT 9k runs: optional held-out video list (video_id column) for best.pt; never the test split
# Extra flags are passed through, e.g. --precision bf16 --grad_checkpointing --resume latest.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: scripts/train.sh CONFIG [flags] (a name in configs/train/, e.g. msrvtt_9k)}
shift
[[ -f "configs/train/$CONFIG.yaml" ]] || { echo "scripts/train.sh: no configs/train/$CONFIG.yaml" >&2; exit 2; }
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CLIP:?set CLIP}"
source scripts/env.sh
OUT=${OUT:-runs/train_$CONFIG}
source scripts/launch.sh
"${LAUNCH[@]}" train.py --config "configs/train/$CONFIG.yaml" --do_train --data_root "$DATA" \
  ${VAL_CSV:+--val_csv "$VAL_CSV"} --features_path "$FEATURES" --clip_path "$CLIP" --output_dir "$OUT" "$@"
