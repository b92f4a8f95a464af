#!/usr/bin/env bash
# Evaluate a CLIP2Video checkpoint on one protocol with the paper's flags (configs/eval/PROTOCOL.yaml).
#   bash scripts/eval.sh PROTOCOL [extra flags]
#   PROTOCOL  msrvtt_1ka | msrvtt_full | msvd | vatex_1k5 | vatex_hgr (a name in configs/eval/)
# The config holds the protocol (annotation file names, datatype, frame rate, released checkpoint number);
# this script passes the paths, from the environment:
#   DATA      annotation files (see data/README.md)       FEATURES  frame folders (sample_frame.py output)
#   CKPT      folder holding pytorch_model.bin.N           MODEL_NUM N (default: the config's, 2; 22 for VATEX)
#   OUT       output folder (default runs/eval_PROTOCOL)   extra flags are passed through, e.g. --precision bf16
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOLS=$(cd configs/eval && for f in *.yaml; do printf '%s ' "${f%.yaml}"; done)
PROTOCOL=${1:?usage: scripts/eval.sh PROTOCOL [flags] (PROTOCOL: ${PROTOCOLS% })}
shift
[[ -f "configs/eval/$PROTOCOL.yaml" ]] || {
  echo "scripts/eval.sh: unknown protocol '$PROTOCOL' (${PROTOCOLS% })" >&2; exit 2; }
: "${DATA:?set DATA}" "${FEATURES:?set FEATURES}" "${CKPT:?set CKPT}"
source scripts/env.sh
OUT=${OUT:-runs/eval_$PROTOCOL}
mkdir -p "$OUT"
python infer_retrieval.py --config "configs/eval/$PROTOCOL.yaml" --data_root "$DATA" --features_path "$FEATURES" \
  --checkpoint "$CKPT" ${MODEL_NUM:+--model_num "$MODEL_NUM"} --do_eval \
  --output_dir "$OUT/eval.log" --metrics_json "$OUT/metrics.json" "$@"
