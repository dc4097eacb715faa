# Shared by the launch scripts: resolve the distributed layout from torchrun/Slurm-style
# environment variables, validate the config once (printing the plan), then start torchrun.
#
#   launch_training CONFIG.yaml [key=value ...]
#
# Under Slurm, start it once per node (`srun --ntasks-per-node=1 bash launch/pretrain_7b.sh`):
# torchrun then starts one process per GPU of its node. More tasks per node are refused.
#
# Environment (all optional):
#   GPUS_PER_NODE  processes per node    (default: the node's GPUs (launch_gpu_count), else NPROC or 2 on CPU)
#   NNODES         nodes                 (default: $SLURM_NNODES or 1)
#   NODE_RANK      this node's index     (default: $SLURM_NODEID or 0)
#   MASTER_ADDR    rendezvous host       (default: first host of $SLURM_JOB_NODELIST, else localhost)
#   MASTER_PORT    rendezvous port       (default: 29500)
#   PYTHON         interpreter           (default: .venv/bin/python if present, else python3)
#   MAX_RESTARTS   torchrun --max-restarts (default 0): when a rank dies, restart every rank of this
#                  node from the newest checkpoint (the run resumes by itself), at most this many times

# GPUs this node gives the job: those CUDA_VISIBLE_DEVICES names (what Slurm binds for --gpus, or
# the user's choice), else SLURM_GPUS_ON_NODE, else every GPU `nvidia-smi -L` lists; 0 without any.
launch_gpu_count() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | NoDevFiles | -*) echo 0 ;;  # Slurm's and CUDA's ways of saying "no GPU"
            *) echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . ;;
        esac
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# One launcher per node: a step with more tasks than nodes would start torchrun several times per node.
launch_check_slurm_tasks() {
    local tasks="${SLURM_STEP_NUM_TASKS:-}" nodes="${SLURM_STEP_NUM_NODES:-}"
    if [ -n "$tasks" ] && [ -n "$nodes" ] && [ "$tasks" -gt "$nodes" ]; then
        echo "launch: error: srun started $tasks tasks on $nodes node(s); start one per node" \
            "(srun --ntasks-per-node=1): torchrun starts each node's GPU processes" >&2
        return 2
    fi
}

launch_training() {
    local config="$1"; shift
    launch_check_slurm_tasks || return $?
    local repo; repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local python="${PYTHON:-}"
    if [ -z "$python" ]; then
        if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
    fi
    local gpus
    gpus="$(launch_gpu_count)"
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
    # torchrun forwards SIGTERM to the ranks, which then checkpoint and exit 0; give them time for
    # that before torchrun's SIGKILL (30 s by default).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

    echo "nodes ${NNODES} x ${GPUS_PER_NODE} processes = world ${world}; this node ${NODE_RANK}; master ${MASTER_ADDR}:${MASTER_PORT}"
    # Validate everything (config, layout, data, checkpoint) before any GPU is touched; print the plan.
    if [ "$NODE_RANK" = 0 ]; then
        WORLD_SIZE="$world" "$python" -m megatron_patches.training --config "$config" "$@" --dry-run || return $?
    fi
    # Preemption: SIGUSR1 (`sbatch --signal=USR1@120`) asks every rank to checkpoint and exit 0. The
    # ranks handle it themselves; this shell and torchrun ignore it rather than die of it.
    trap '' USR1
    "$python" -m torch.distributed.run \
        --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}" \
        -m megatron_patches.training --config "$config" "$@"
}

# The GPU-cluster pretraining scripts' common body (pretrain_7b.sh, pretrain_moe.sh): the layout from
# TP/PP/EP (each only where set; the config holds the shipped layout), the data from DATA_BLEND (or
# MOCK=1, or a data.* override; refused otherwise), LOAD, RUN_DIR (default runs/<config name>).
#
#   launch_pretrain SCRIPT_NAME CONFIG.yaml [key=value ...]
launch_pretrain() {
    local script="$1" config="$2"; shift 2
    RUN_DIR="${RUN_DIR:-runs/$(basename "$config" .yaml)}"
    local args=("run_dir=$RUN_DIR") arg data_in_args=0
    if [ -n "${TP:-}" ]; then args+=("parallel.tensor_model_parallel_size=$TP"); fi
    if [ -n "${PP:-}" ]; then args+=("parallel.pipeline_model_parallel_size=$PP"); fi
    if [ -n "${EP:-}" ]; then args+=("parallel.expert_model_parallel_size=$EP"); fi
    for arg in "$@"; do
        case "$arg" in data.blend=* | data.data_path=* | data.mock=*) data_in_args=1 ;; esac
    done
    if [ -n "${DATA_BLEND:-}" ]; then
        args+=("data.blend=$DATA_BLEND")
    elif [ "${MOCK:-0}" = 1 ]; then
        args+=("data.mock=true")
    elif [ "$data_in_args" = 0 ]; then
        echo "$script: error: DATA_BLEND is not set; point it at the blend.yaml of" \
            "\`python -m data.preprocess tokenize\`, or set MOCK=1 to train on mock data on purpose" >&2
        return 2
    fi
    if [ -n "${LOAD:-}" ]; then args+=("checkpoint.pretrained_checkpoint=$LOAD"); fi
    echo "run dir: $RUN_DIR   (touch $RUN_DIR/save: checkpoint now;  touch $RUN_DIR/stop: checkpoint and exit)"
    launch_training "$config" "${args[@]}" "$@"
}
