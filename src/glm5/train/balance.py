"""Aux-loss-free MoE load balancing (DeepSeek-V3 arXiv 2412.19437 §2.1.2, used by GLM-5).

After each optimizer step, every MoE layer's `e_score_correction_bias` moves by a fixed speed: up for experts that
received fewer tokens than the mean, down for those that received more. The bias only affects *which* experts are
chosen (the gate weights stay the unbiased scores), so balance costs the LM nothing through the gradient. It is a
buffer, not a parameter: no optimizer touches it, and it is saved with the model.

With several processes the loads are summed over ranks first, so every rank applies the same update and the
biases stay identical without any broadcast.

Letters: E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """{layer index: MoE module} for the main layers and the MTP layer(s) (indices L, L+1, ...)."""
    out = {}
    for layer in [*model.model.layers, *model.mtp]:
        if isinstance(layer.mlp, MoE):
            out[layer.layer_idx] = layer.mlp
    return out


def all_reduce_loads(loads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Sum per-layer expert loads [E] over ranks (a no-op in a single process)."""
    if not loads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loads
    keys = sorted(loads)
    flat_LE = torch.stack([loads[k].float() for k in keys])
    dist.all_reduce(flat_LE, op=dist.ReduceOp.SUM)
    return {k: flat_LE[i] for i, k in enumerate(keys)}


@torch.no_grad()
def update_bias(model: nn.Module, loads: dict[int, torch.Tensor], speed: float) -> None:
    """bias_e += speed * sign(mean load - load_e), per MoE layer (loads: tokens routed to each expert this step)."""
    if speed == 0:
        return
    layers = moe_layers(model)
    for layer, load_E in loads.items():
        bias_E = layers[layer].gate.e_score_correction_bias
        err_E = load_E.to(bias_E.device).float().mean() - load_E.to(bias_E.device).float()
        bias_E.add_(speed * torch.sign(err_E))


def imbalance(load_E: torch.Tensor) -> float:
    """Max load over mean load (1.0 = perfectly balanced): DeepSeek's MaxVio + 1."""
    load_E = load_E.float()
    return float(load_E.max() / load_E.mean().clamp_min(1e-9))
