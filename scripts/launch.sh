# Sourced by scripts/train_*.sh: builds LAUNCH, the torchrun command for this node, from the environment.
#   NPROC   processes on this node (default: number of GPUs, else 1)
#   NNODES, RDZV  multi-node: NNODES=M and RDZV=HOST:PORT on every node (torchrun's c10d rendezvous);
#                 RDZV_ID names the job (default clip2video). OUT must then be on a shared file system.
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
LAUNCH=(torchrun --nproc_per_node "$NPROC")
if [[ -n "${NNODES:-}" ]]; then
  : "${RDZV:?set RDZV=HOST:PORT for multi-node}"
  LAUNCH+=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV" --rdzv_id "${RDZV_ID:-clip2video}")
else
  LAUNCH+=(--standalone)
fi
