#!/usr/bin/env bash
# Pretrain a Llama-2-7B-shaped model with Megatron-Core on a GPU cluster.
#
#   DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_7b.sh [key=value ...]
#
# Layout and paths from the environment (see launch/_launch.sh for the distributed ones):
#   TP (default 2), PP (default 1)       tensor / pipeline parallel sizes
#   DATA_BLEND                           blend.yaml written by `python -m data.preprocess tokenize`
#   MOCK=1                               train on mock data instead (refused unless asked for)
#   RUN_DIR (default runs/llama2_7b)     checkpoints, TensorBoard, metrics.jsonl, save/stop trigger files
#   LOAD (optional)                      a `tools/convert hf2mcore` release to continue pretraining from
# Multi-node: set NNODES/NODE_RANK/MASTER_ADDR on every node, or run under Slurm (srun) where the
# SLURM_* variables provide them. Any key=value argument overrides launch/configs/llama2_7b.yaml.
# The config's transformer_impl=auto picks Transformer Engine where the training interpreter imports
# it on CUDA, else the local spec with SDPA attention; the printed plan names the choice.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/_launch.sh"

TP="${TP:-2}"
PP="${PP:-1}"
RUN_DIR="${RUN_DIR:-runs/llama2_7b}"
args=(
    "parallel.tensor_model_parallel_size=$TP"
    "parallel.pipeline_model_parallel_size=$PP"
    "run_dir=$RUN_DIR"
)
data_in_args=0
for arg in "$@"; do
    case "$arg" in data.blend=* | data.data_path=* | data.mock=*) data_in_args=1 ;; esac
done
if [ -n "${DATA_BLEND:-}" ]; then
    args+=("data.blend=$DATA_BLEND")
elif [ "${MOCK:-0}" = 1 ]; then
    args+=("data.mock=true")
elif [ "$data_in_args" = 0 ]; then
    echo "pretrain_7b.sh: error: DATA_BLEND is not set; point it at the blend.yaml of" \
        "\`python -m data.preprocess tokenize\`, or set MOCK=1 to train on mock data on purpose" >&2
    exit 2
fi
if [ -n "${LOAD:-}" ]; then args+=("checkpoint.pretrained_checkpoint=$LOAD"); fi
echo "run dir: $RUN_DIR   (touch $RUN_DIR/save: checkpoint now;  touch $RUN_DIR/stop: checkpoint and exit)"
launch_training "$here/configs/llama2_7b.yaml" "${args[@]}" "$@"
