"""MoE load balance you can see: tokens per expert per layer, each log window, and a collapse warning.

What it adds to Megatron-Core: ``TopKRouter.routing`` decides which experts every token goes to
(its ``routing_map``, ``[tokens, experts]``) but keeps no record of it, except the
``local_tokens_per_expert`` it needs for aux-loss-free balancing. This patch puts a forward hook
on each router (``TopKRouter.forward`` returns ``(probs, routing_map)``) and sums
``routing_map`` per expert, on training forwards only (eval and probes run without grad; with
activation recomputation only the recomputed forward has grad, so each token counts once).
Every ``log_interval`` one ``all_reduce`` over all ranks adds the counts of every pipeline stage,
data-parallel (hence expert-parallel), context-parallel and tensor-parallel rank: a MoE layer with
TP > 1 runs with sequence parallel (Megatron-Core's ``MoELayer`` requires it), so each TP rank routes
its own share of the tokens. Then, per MoE layer (the global 0-based layer number ``<layer>``):

* ``moe/load_max_over_mean/<layer>``: the busiest expert's tokens over the mean (1 = balanced,
  ``num_moe_experts`` = every token to one expert);
* ``moe/load_cv/<layer>``: the coefficient of variation (std / mean) of the experts' tokens;
* with ``model.moe_router_enable_expert_bias`` (aux-loss-free balancing)
  ``moe/expert_bias_range/<layer>``: max - min of the router's ``expert_bias``;
* a router that collapses (one expert over ``collapse_fraction`` of the layer's routed tokens
  for ``collapse_windows`` windows in a row) is warned about once per layer, naming it.

At every checkpoint (the end included) the logging rank writes ``<run_dir>/<heatmap>``: the
share of each layer's tokens each expert took since the previous heat map (layer x expert),
next to the expert biases when they are on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from megatron_patches.hooks import Hook, HookContext, number_option, run_dir_file

if TYPE_CHECKING:
    from megatron_patches.training.config import Config as TrainConfig


@dataclass(frozen=True)
class Options:
    """``patches.moe_load``: when a router counts as collapsed, and the heat map's file in run_dir."""

    collapse_fraction: float = 0.9  # one expert taking more than this share of a layer's tokens ...
    collapse_windows: int = 3  # ... for this many log windows in a row: warned once, layer named
    heatmap: str = "expert_load.png"

    def __post_init__(self) -> None:
        number_option("patches.moe_load.collapse_fraction", self.collapse_fraction)
        if self.collapse_fraction >= 1:
            raise ConfigError(
                f"patches.moe_load.collapse_fraction must be below 1, got {self.collapse_fraction!r}"
            )
        number_option("patches.moe_load.collapse_windows", self.collapse_windows, integer=True)


def load_stats(loads: torch.Tensor, topk: int) -> tuple[float, float, float]:
    """(max / mean, std / mean, the busiest expert's share of the layer's tokens) of one layer's tokens
    per expert (all 0 if none). Each token goes to ``topk`` experts: a share of 1 is every token."""
    loads = loads.double()
    routed = float(loads.sum())
    if routed == 0:
        return 0.0, 0.0, 0.0
    mean = loads.mean()
    return (
        float(loads.max() / mean),
        float(loads.std(unbiased=False) / mean),
        float(loads.max()) * topk / routed,
    )


class MoeLoad(Hook):
    name = "moe_load"

    def __init__(
        self,
        options: Options,
        num_layers: int,
        num_experts: int,
        moe_layers: list[int],
        topk: int,
        expert_bias: bool,
    ) -> None:
        self.options = options
        self.topk = topk
        self.expert_bias = expert_bias  # aux-loss-free balancing: the routers hold an expert_bias
        self.moe_layers = moe_layers  # global 0-based numbers of the MoE layers
        self.window = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.since_heatmap = torch.zeros_like(self.window)
        self.heatmap_from = 1  # first iteration in since_heatmap
        self.bias: torch.Tensor | None = None  # [layers, experts] after a log, with expert bias on
        self.streaks = dict.fromkeys(moe_layers, 0)
        self.warned: list[int] = []
        self.routers: list[Any] = []

    def describe(self) -> list[str]:
        return [
            f"moe_load: tokens per expert of the {len(self.moe_layers)} MoE layers every log window; "
            f"heat map at each checkpoint -> run_dir/{self.options.heatmap}"
        ]

    def on_train_start(self, ctx: HookContext) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.window = self.window.to(next(ctx.objects.gpt.parameters()).device)
        for module in ctx.objects.gpt.modules():
            if isinstance(module, TopKRouter) and module not in self.routers:
                module.register_forward_hook(self._count)
                self.routers.append(module)

    def _count(self, router: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        """After ``TopKRouter.forward``: add its routing map's tokens per expert to the window."""
        if router.training and torch.is_grad_enabled():  # a bool map: no autograd graph to avoid
            self.window[router.layer_number - 1].add_(output[1].sum(dim=0))

    def on_log(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        """Collective: one all_reduce of the window (and expert biases); log, watch for collapse."""
        loads, self.bias = self._reduce_window()
        self.since_heatmap += loads.cpu()
        for layer in self.moe_layers:
            max_over_mean, cv, share = load_stats(loads[layer], self.topk)
            metrics[f"moe/load_max_over_mean/{layer}"] = max_over_mean
            metrics[f"moe/load_cv/{layer}"] = cv
            if self.bias is not None:
                metrics[f"moe/expert_bias_range/{layer}"] = float(
                    self.bias[layer].max() - self.bias[layer].min()
                )
            self._watch_collapse(ctx, layer, share, int(loads[layer].argmax()))

    def _reduce_window(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every rank's counts (and each layer's expert bias, held alike by all ranks of its stage),
        summed over the world; the window restarts."""
        biases = torch.zeros_like(self.window)
        for router in self.routers if self.expert_bias else ():
            biases[router.layer_number - 1] = router.expert_bias.detach().double()
        both = torch.stack([self.window, biases])
        torch.distributed.all_reduce(both)
        self.window.zero_()
        copies_per_stage = torch.distributed.get_world_size() // _pipeline_size()
        bias = (both[1] / copies_per_stage).cpu() if self.expert_bias else None
        return both[0].cpu(), bias

    def _watch_collapse(self, ctx: HookContext, layer: int, share: float, expert: int) -> None:
        self.streaks[layer] = self.streaks[layer] + 1 if share > self.options.collapse_fraction else 0
        if self.streaks[layer] >= self.options.collapse_windows and layer not in self.warned:
            self.warned.append(layer)
            ctx.writer.console(
                f"warning: the MoE router of layer {layer} has collapsed: expert {expert} took {share:.0%} "
                f"of its tokens for {self.streaks[layer]} log windows in a row (over "
                f"patches.moe_load.collapse_fraction={self.options.collapse_fraction:g}); "
                "consider model.moe_aux_loss_coeff or model.moe_router_enable_expert_bias"
            )

    def after_save(self, ctx: HookContext, path: Path) -> None:
        if ctx.writer.enabled and self.since_heatmap.sum() > 0:
            file = run_dir_file(self.name, "heatmap", self.options.heatmap, str(ctx.run_dir))
            title = f"iterations {self.heatmap_from}..{ctx.state.iteration}"
            write_heatmap(
                self.since_heatmap[self.moe_layers], self.moe_layers, self._bias_rows(), title, file
            )
        self.since_heatmap.zero_()
        self.heatmap_from = ctx.state.iteration + 1

    def _bias_rows(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[self.moe_layers]

    def state_dict(self) -> dict[str, Any]:
        return {"streaks": dict(self.streaks), "warned": list(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streaks.update({int(k): v for k, v in state.get("streaks", {}).items()})
        self.warned = [int(layer) for layer in state.get("warned", [])]


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def write_heatmap(
    loads: torch.Tensor, layers: list[int], bias: torch.Tensor | None, title: str, path: Path
) -> None:
    """PNG of each layer's token share per expert (and the expert biases), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    shares = loads / loads.sum(dim=1, keepdim=True).clamp(min=1)
    panels = [(shares, "share of the layer's routed tokens", "viridis")]
    if bias is not None:
        panels.append((bias, "expert bias (aux-loss-free balancing)", "coolwarm"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 1.5 + 0.4 * len(layers)), squeeze=False
    )
    for ax, (values, label, cmap) in zip(axes[0], panels, strict=True):
        image = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set(xlabel="expert", ylabel="layer", title=f"{label}\n{title}")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with paths.atomic_file(path) as temp:  # the format from the final name: the temporary one ends in .tmp
        fig.savefig(temp, dpi=100, format="png")
    plt.close(fig)


def enable(options: Options, config: TrainConfig) -> MoeLoad:
    model = config.model
    if model.num_moe_experts is None:
        raise ConfigError("patches.moe_load needs an MoE model (model.num_moe_experts is not set)")
    run_dir_file("moe_load", "heatmap", options.heatmap, str(config.run_dir))
    moe_layers = [layer for layer, moe in enumerate(model.moe_layer_pattern()) if moe]
    return MoeLoad(
        options,
        model.num_layers,
        model.num_moe_experts,
        moe_layers,
        model.moe_router_topk,
        model.moe_router_enable_expert_bias,
    )
