#!/usr/bin/env bash
# A tiny Llama trained on CPU with 2 gloo ranks in a few minutes (no GPU needed).
#
#   bash launch/pretrain_tiny.sh [key=value ...]       # mock data
#   DATA_BLEND=runs/demo/data/tokenized/blend.yaml bash launch/pretrain_tiny.sh model.vocab_size=2048
#   CONFIG=launch/configs/demo.yaml bash launch/pretrain_tiny.sh     # another config
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/_launch.sh"

export NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-$here/configs/tiny.yaml}"
RUN_DIR="${RUN_DIR:-runs/tiny}"
args=("run_dir=$RUN_DIR")
if [ -n "${DATA_BLEND:-}" ]; then args+=("data.mock=false" "data.blend=$DATA_BLEND"); fi
echo "run dir: $RUN_DIR   (touch $RUN_DIR/save: checkpoint now;  touch $RUN_DIR/stop: checkpoint and exit)"
launch_training "$CONFIG" "${args[@]}" "$@"
