"""patches.moe_load at EP=2 on 2 gloo ranks: tokens per expert per layer add up to tokens x top-k each
log window, a router forced to send every token to one expert is warned about once with its layer
named, expert biases and loads reach TensorBoard, and the heat map PNG is written."""

import contextlib
import io

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.test_moe import MOE
from tests.megatron_patches.training.test_train import tiny_args, two_channels

COLLAPSED_LAYER = 1  # its router sends every token to expert 0
ITERATIONS = 3
TOKENS_PER_ITERATION = 8 * 32  # global batch x seq_length of tiny_args
TOPK = 2
PATCH = (
    "patches.moe_load={collapse_fraction: 0.9, collapse_windows: 2}",
    "logging.log_interval=1",
    f"train.train_iters={ITERATIONS}",
    "model.moe_router_score_function=sigmoid",
    "model.moe_router_enable_expert_bias=true",
    "model.moe_router_bias_update_rate=0.01",
)


def _train_with_one_collapsed_router(args: list[str]) -> tuple[int, list, str]:
    """Train with layer COLLAPSED_LAYER's router always choosing expert 0 first; return the exit
    code, the summed loads of every log window and what the rank printed."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_patches import moe_load
    from megatron_patches.training import run

    windows, gating, reduce_window = [], TopKRouter.gating, moe_load.MoeLoad._reduce_window

    def collapsed(self, input):
        logits = gating(self, input)
        if self.layer_number - 1 == COLLAPSED_LAYER:
            favour = torch.zeros(logits.shape[-1], dtype=logits.dtype)
            favour[0] = 1e4
            logits = logits + favour
        return logits

    def recording(self):
        loads, bias = reduce_window(self)
        windows.append(loads.clone())
        return loads, bias

    TopKRouter.gating, moe_load.MoeLoad._reduce_window = collapsed, recording
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run.main(args)
    return code, windows, out.getvalue()


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_load")
    args = tiny_args(root / "run", two_channels(root), *MOE, *PATCH)
    return root / "run", run_on_ranks(_train_with_one_collapsed_router, 2, args, timeout=300)


def test_loads_sum_to_tokens_times_topk_every_window(collapsed_run):
    _, results = collapsed_run
    assert [code for code, _, _ in results] == [0, 0]
    windows = results[0][1]
    assert len(windows) == ITERATIONS
    for loads in windows:
        assert loads.sum(dim=1).tolist() == [TOKENS_PER_ITERATION * TOPK] * 2
        assert loads[COLLAPSED_LAYER, 0] == TOKENS_PER_ITERATION  # every token, once
    assert all((mine == theirs).all() for mine, theirs in zip(windows, results[1][1], strict=True))


def test_a_collapsed_router_is_warned_about_once_naming_its_layer(collapsed_run):
    _, results = collapsed_run
    printed = results[1][2]  # the logging rank is the last one
    warnings = [line for line in printed.splitlines() if "MoE router" in line]
    assert len(warnings) == 1
    assert f"router of layer {COLLAPSED_LAYER} has collapsed: expert 0 took 100%" in warnings[0]
    assert "MoE router" not in results[0][2]


def test_load_metrics_expert_biases_and_heatmap_are_written(collapsed_run):
    run_dir, _ = collapsed_run
    collapsed = tensorboard_scalars(run_dir, f"moe/load_max_over_mean/{COLLAPSED_LAYER}")
    assert sorted(collapsed) == list(range(1, ITERATIONS + 1))
    assert all(value == pytest.approx(4 / TOPK) for value in collapsed.values())  # experts / top-k
    cv = tensorboard_scalars(run_dir, "moe/load_cv/0")
    assert len(cv) == ITERATIONS and all(0 <= value < 1 for value in cv.values())
    bias = tensorboard_scalars(run_dir, f"moe/expert_bias_range/{COLLAPSED_LAYER}")
    assert bias[ITERATIONS] > 0  # aux-loss-free balancing pushes the overloaded expert's bias down
    png = (run_dir / "expert_load.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_moe_load_on_a_dense_model_is_refused_in_one_line(tmp_path):
    cfg = load_config(None, tiny_args(tmp_path, two_channels(tmp_path), "patches.moe_load=true"))
    with pytest.raises(ConfigError, match="patches.moe_load needs an MoE model") as error:
        plan_run(cfg, 2)
    assert "\n" not in str(error.value)
