#!/usr/bin/env bash
# The GPU check: one script, <= 8 minutes on one H100/H200, every step timed, each failure reported
# while the later steps still run. Results go to $1, else $OUT, else runs/gpu_check.
#
#   bash bench/gpu_check.sh [RESULT_DIR]
#
# Steps: `pytest -m gpu`; the `1b` preset of bench/train_throughput.py (local spec + SDPA: tokens/s/GPU,
# MFU, peak memory vs the memory plan); the converters' logits check on the GPU (test_logits_gpu.py); recompute of
# the 1b model on one GPU (loss, MFU, peak memory; sequence parallel needs TP > 1, so not on one GPU).
#
# The lent machine has Python 3.12 with a CUDA torch but no megatron-core and no network: prepare the
# wheel here (and any other missing dependency the same way), it travels with the tree:
#   pip download megatron-core==0.16.1 --python-version 3.12 --only-binary :all: --no-deps -d .whl
# The script installs every wheel in .whl/ offline (--no-index) when megatron.core does not import.
set -uo pipefail  # no -e: a failing step is recorded, the next one still runs

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
summary="$out/summary.txt"
: >"$summary"
failures=0

# step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $out/NAME.log, one summary line.
step() {
    local name="$1" limit="$2"; shift 2
    local start rc
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    local line
    line="$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$(($(date +%s) - start))")"
    [ "$rc" -eq 0 ] || { failures=$((failures + 1)); line="$line  FAILED (see $name.log)"; }
    echo "$line" | tee -a "$summary"
    return 0
}

# (timeout runs programs, not shell functions: each step is a command line)
install_wheels='"$0" -c "import megatron.core" 2>/dev/null && exit 0
ls .whl/*.whl >/dev/null 2>&1 || { echo "no megatron-core and no .whl/ wheels (see the header)"; exit 1; }
"$0" -m pip install --no-index --no-deps .whl/*.whl'

preset_1b=(
    --config launch/configs/llama2_7b.yaml data.mock=true "patches={}" parallel.sequence_parallel=null
    model.num_layers=22 model.hidden_size=2048 model.ffn_hidden_size=5632 model.num_attention_heads=32
    model.num_query_groups=4 data.seq_length=2048 train.micro_batch_size=4 train.global_batch_size=32
    logging.eval_interval=null checkpoint.save_interval=null checkpoint.save_at_end=false
    train.train_iters=20 logging.log_interval=10
)

# the 1b model with recompute on one GPU: the log's iteration lines have MFU and peak memory
train_1b=("$python" -m megatron_patches.training "${preset_1b[@]}")

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$python" -V; } >"$out/machine.txt" 2>&1
step install 60 bash -c "$install_wheels" "$python"
step pytest_gpu 90 "$python" -m pytest -m gpu -q -p no:cacheprovider --ignore tests/tools/convert/test_logits_gpu.py
step throughput_1b 150 "$python" bench/train_throughput.py --preset 1b --iters 20 --warmup 5 --backends sdpa
step logits 60 "$python" -m pytest -q -p no:cacheprovider tests/tools/convert/test_logits_gpu.py
step recompute_full 60 "${train_1b[@]}" "run_dir=$out/recompute_full" model.recompute_granularity=full \
    model.recompute_method=uniform model.recompute_num_layers=1
step recompute_sel 60 "${train_1b[@]}" "run_dir=$out/recompute_sel" model.recompute_granularity=selective
for name in throughput_1b recompute_full recompute_sel; do  # the figures, in the summary
    grep -E "^sdpa|MFU|memory per GPU" "$out/$name.log" | tail -n 3 | sed "s/^/$name: /" >>"$summary"
done
echo "failed steps: $failures" | tee -a "$summary"
exit $((failures > 0))
