#!/usr/bin/env bash
# Evaluate a CLIP2Video checkpoint on the vatex_hgr protocol with the paper's flags (configs/eval/vatex_hgr.yaml).
# Paths come from the environment:
#   DATA      annotation files (see data/README.md)       FEATURES  frame folders (sample_frame.py output)
#   CKPT      folder holding pytorch_model.bin.N           MODEL_NUM N (default 22)
#   OUT       output folder (default runs/eval_vatex_hgr)         extra flags are passed through, e.g. --precision bf16
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CKPT:?set CKPT}"
OUT=${OUT:-runs/eval_vatex_hgr}
mkdir -p "$OUT"
python infer_retrieval.py --config configs/eval/vatex_hgr.yaml --data_path "$DATA" \
  --features_path "$FEATURES" --checkpoint "$CKPT" --model_num "${MODEL_NUM:-22}" --do_eval \
  --output_dir "$OUT/eval.log" --metrics_json "$OUT/metrics.json" "$@"
