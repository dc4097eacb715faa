"""MoE auxiliary losses in the log: ``moe/aux_loss`` and ``moe/z_loss``, apart from ``lm loss``.

Megatron-Core's router never adds its load-balancing and z losses to the loss the model returns:
``MoEAuxLossAutoScaler`` attaches their gradients to the activations, and the router records
their values per layer in Megatron-Core's MoE tracker (``moe_utils.save_to_aux_losses_tracker``).
So ``lm loss`` and ``channel_loss/*`` (token losses) exclude them, and this module reads the
tracker once per log window, as Megatron-LM's ``track_moe_metrics`` does per iteration: summed
over pipeline stages and the router's reduce group, averaged over data-parallel ranks
(``moe_utils.reduce_aux_losses_tracker_across_ranks``; ``ReduceOp.AVG`` is a sum and a division
on gloo, see ``cpu.py``), then divided by the window's micro-batches and the MoE layers.
"""

from __future__ import annotations

import torch

from megatron_patches.compat import require_signature
from megatron_patches.formats.model_config import ModelConfig

# The tracker's names for each moe_router_load_balancing_type (TopKRouter._apply_*aux_loss).
AUX_LOSS_TRACKER_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
Z_LOSS_TRACKER_NAME = "z_loss"


def _check_pinned_api() -> None:
    from megatron.core.transformer.moe import moe_utils

    require_signature(moe_utils.reduce_aux_losses_tracker_across_ranks, ["track_names", "pg_collection"])
    require_signature(moe_utils.clear_aux_losses_tracker, [])


def logged_losses(model: ModelConfig) -> dict[str, str]:
    """Log name -> tracker name of the auxiliary losses ``model`` trains with (none when dense)."""
    if model.num_moe_experts is None:
        return {}
    losses = {}
    tracker_name = AUX_LOSS_TRACKER_NAMES.get(model.moe_router_load_balancing_type)
    if tracker_name and model.moe_aux_loss_coeff > 0:
        losses["moe/aux_loss"] = tracker_name
    if model.moe_z_loss_coeff:
        losses["moe/z_loss"] = Z_LOSS_TRACKER_NAME
    return losses


class AuxLossWindow:
    """The auxiliary losses since the last log; :meth:`read` is a collective on every rank."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        self.losses = logged_losses(model)
        self.moe_layers = sum(model.moe_layer_pattern())
        self.num_layers = model.num_layers
        self.device = device
        self.micro_batches = 0
        if self.losses:
            _check_pinned_api()

    def add(self, micro_batches: int) -> None:
        """One training iteration of ``micro_batches`` (per data-parallel rank) went into the tracker."""
        self.micro_batches += micro_batches

    def read(self) -> dict[str, float]:
        """The window's mean loss per micro-batch and MoE layer, by log name; the window restarts."""
        if not self.losses:
            return {}
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        for name in self.losses.values():
            # A stage without MoE layers (or a window without an update) still joins the collectives.
            tracker.setdefault(name, self._empty_entry())
        names = sorted(self.losses.values())  # the same collectives in the same order on every rank
        moe_utils.reduce_aux_losses_tracker_across_ranks(names)
        scale = 1.0 / max(self.micro_batches * self.moe_layers, 1)
        values = {log: float(tracker[name]["values"].sum()) * scale for log, name in self.losses.items()}
        moe_utils.clear_aux_losses_tracker()
        self.micro_batches = 0
        return values

    def _empty_entry(self) -> dict:
        values = torch.zeros(self.num_layers, device=self.device)
        return {"values": values, "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False}
