#!/usr/bin/env bash
# Evaluate a CLIP2Video checkpoint on one protocol with the paper's flags (configs/eval/PROTOCOL.yaml).
#   bash scripts/eval.sh PROTOCOL [extra flags]
#   PROTOCOL  msrvtt_1ka | msrvtt_full | msvd | vatex_1k5 | vatex_hgr
# Paths come from the environment:
#   DATA      annotation files (see data/README.md)       FEATURES  frame folders (sample_frame.py output)
#   CKPT      folder holding pytorch_model.bin.N           MODEL_NUM N (default 2; 22 for VATEX)
#   OUT       output folder (default runs/eval_PROTOCOL)   extra flags are passed through, e.g. --precision bf16
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOL=${1:?usage: scripts/eval.sh PROTOCOL [flags] (PROTOCOL: msrvtt_1ka msrvtt_full msvd vatex_1k5 vatex_hgr)}
shift
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CKPT:?set CKPT}"
case "$PROTOCOL" in
  msrvtt_1ka)  DATA_FLAGS=(--val_csv "$DATA/MSRVTT_JSFUSION_test.csv" --data_path "$DATA/MSRVTT_data.json"); NUM=2 ;;
  msrvtt_full) DATA_FLAGS=(--val_csv "$DATA/MSRVTT_test.full.csv" --data_path "$DATA/MSRVTT_data.json"); NUM=2 ;;
  msvd)        DATA_FLAGS=(--data_path "$DATA"); NUM=2 ;;
  vatex_1k5 | vatex_hgr) DATA_FLAGS=(--data_path "$DATA"); NUM=22 ;;
  *) echo "scripts/eval.sh: unknown protocol '$PROTOCOL' (msrvtt_1ka msrvtt_full msvd vatex_1k5 vatex_hgr)" >&2
     exit 2 ;;
esac
source scripts/env.sh
OUT=${OUT:-runs/eval_$PROTOCOL}
mkdir -p "$OUT"
python infer_retrieval.py --config "configs/eval/$PROTOCOL.yaml" "${DATA_FLAGS[@]}" \
  --features_path "$FEATURES" --checkpoint "$CKPT" --model_num "${MODEL_NUM:-$NUM}" --do_eval \
  --output_dir "$OUT/eval.log" --metrics_json "$OUT/metrics.json" "$@"
