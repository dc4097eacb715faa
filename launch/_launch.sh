# Shared by the launch scripts: resolve the distributed layout from torchrun/Slurm-style
# environment variables, validate the config once (printing the plan), then start torchrun.
#
#   launch_training CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   GPUS_PER_NODE  processes per node    (default: number of GPUs, else NPROC or 2 on CPU)
#   NNODES         nodes                 (default: $SLURM_NNODES or 1)
#   NODE_RANK      this node's index     (default: $SLURM_NODEID or 0)
#   MASTER_ADDR    rendezvous host       (default: first host of $SLURM_JOB_NODELIST, else localhost)
#   MASTER_PORT    rendezvous port       (default: 29500)
#   PYTHON         interpreter           (default: .venv/bin/python if present, else python3)

launch_training() {
    local config="$1"; shift
    local repo; repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local python="${PYTHON:-}"
    if [ -z "$python" ]; then
        if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
    fi
    local gpus
    gpus="$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0)"
    GPUS_PER_NODE="${GPUS_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo "${NPROC:-2}")}"
    NNODES="${NNODES:-${SLURM_NNODES:-1}}"
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
    if [ -z "${MASTER_ADDR:-}" ]; then
        if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
            MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        else
            MASTER_ADDR=localhost
        fi
    fi
    MASTER_PORT="${MASTER_PORT:-29500}"
    local world=$((GPUS_PER_NODE * NNODES))
    # Megatron-Core's TP communication overlap needs one hardware queue (as Megatron-LM's scripts set).
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

    echo "nodes ${NNODES} x ${GPUS_PER_NODE} processes = world ${world}; this node ${NODE_RANK}; master ${MASTER_ADDR}:${MASTER_PORT}"
    # Validate everything (config, layout, data, checkpoint) before any GPU is touched; print the plan.
    if [ "$NODE_RANK" = 0 ]; then
        WORLD_SIZE="$world" "$python" -m megatron_patches.training --config "$config" "$@" --dry-run || return $?
    fi
    "$python" -m torch.distributed.run \
        --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        -m megatron_patches.training --config "$config" "$@"
}
