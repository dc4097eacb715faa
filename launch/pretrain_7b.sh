#!/usr/bin/env bash
# Pretrain a Llama-2-7B-shaped model with Megatron-Core on a GPU cluster.
#
#   DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_7b.sh [key=value ...]
#
# Layout and paths from the environment (see launch/_launch.sh for the distributed ones):
#   TP (default 2), PP (default 1)       tensor / pipeline parallel sizes (default: the config's)
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

launch_pretrain pretrain_7b.sh "$here/configs/llama2_7b.yaml" "$@"
