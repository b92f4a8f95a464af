#!/usr/bin/env bash
# Evaluate a CLIP2Video checkpoint on the msrvtt_1ka protocol with the paper's flags (configs/eval/msrvtt_1ka.yaml).
# Paths come from the environment:
#   DATA      annotation files (see data/README.md)       FEATURES  frame folders (sample_frame.py output)
#   CKPT      folder holding pytorch_model.bin.N           MODEL_NUM N (default 2)
#   OUT       output folder (default runs/eval_msrvtt_1ka)         extra flags are passed through, e.g. --precision bf16
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CKPT:?set CKPT}"
OUT=${OUT:-runs/eval_msrvtt_1ka}
mkdir -p "$OUT"
python infer_retrieval.py --config configs/eval/msrvtt_1ka.yaml --val_csv "$DATA/MSRVTT_JSFUSION_test.csv" --data_path "$DATA/MSRVTT_data.json" \
  --features_path "$FEATURES" --checkpoint "$CKPT" --model_num "${MODEL_NUM:-2}" --do_eval \
  --output_dir "$OUT/eval.log" --metrics_json "$OUT/metrics.json" "$@"
