#!/usr/bin/env bash
# Pretrain a Mixture-of-Experts model with Megatron-Core's MoE layers on a GPU cluster.
#
#   DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_moe.sh CONFIG=deepseek_moe_2b [key=value ...]
#
# CONFIG (an argument or the environment): a file of launch/configs/ without .yaml, or a path:
#   deepseek_moe_2b   DeepSeekMoE-style 2B (9 layers, fine-grained + shared experts; ~0.3B active), 8 GPUs
#   mixtral_8x7b      Mixtral-8x7B shape (8 experts, top-2; 46.7B, 12.9B active), 64 GPUs
#   qwen3_30b_a3b     Qwen3-30B-A3B shape (128 experts, top-8; 30.5B, 3.3B active), 32 GPUs
# Everything else as launch/pretrain_7b.sh (DATA_BLEND or MOCK=1, RUN_DIR, LOAD, multi-node, Slurm),
# plus EP: the expert-parallel size (TP, PP and EP default to the config's layout).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/_launch.sh"

rest=()
for arg in "$@"; do
    case "$arg" in CONFIG=*) CONFIG="${arg#CONFIG=}" ;; *) rest+=("$arg") ;; esac
done
if [ -z "${CONFIG:-}" ]; then
    echo "pretrain_moe.sh: error: CONFIG is not set; name a config, e.g. CONFIG=deepseek_moe_2b" \
        "(deepseek_moe_2b, mixtral_8x7b, qwen3_30b_a3b) or a YAML path" >&2
    exit 2
fi
case "$CONFIG" in */* | *.yaml) config="$CONFIG" ;; *) config="$here/configs/$CONFIG.yaml" ;; esac
if [ ! -f "$config" ]; then
    echo "pretrain_moe.sh: error: no config $config (CONFIG=$CONFIG)" >&2
    exit 2
fi
launch_pretrain pretrain_moe.sh "$config" ${rest[@]+"${rest[@]}"}
