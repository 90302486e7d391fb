"""SmoothQuant: migrate activation outliers into weights. The one place that mutates a model.

For a group (producer -> consumer Linears) with per-channel scales ``s`` (in_features,):
``X' = X diag(s)^-1`` is folded into the producer's output (a norm's weight and bias), and
``W' = W diag(s)`` into every consumer (columns of an (out, in) weight). The output is unchanged.
"""
from __future__ import annotations

import logging

import torch

from .archs import Arch, Layout, decoder_layers
from .numerics import smoothing_scales

log = logging.getLogger(__name__)


def _in_absmax(linear: torch.nn.Module, layout: Layout) -> torch.Tensor:
    w = linear.weight.detach()
    return (w.abs().amax(dim=0) if layout is Layout.OUT_IN else w.abs().amax(dim=1)).float()  # (in,)


def group_scales(model: torch.nn.Module, arch: Arch, act_stats: dict[str, torch.Tensor],
                 alpha: float) -> dict[str, torch.Tensor]:
    """``{"<layers>.<i>.<producer>": s}`` for every group of every layer. Pure: reads the model.

    max|X_j| is the running max of the group's (shared) input; max|W_j| is over the whole group.
    """
    scales = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        for g in arch.groups:
            consumers = [layer.get_submodule(c) for c in g.consumers]
            x_absmax = torch.stack([act_stats[prefix + c] for c in g.consumers]).amax(dim=0)
            w_absmax = torch.stack([_in_absmax(m, arch.layout) for m in consumers]).amax(dim=0)
            scales[prefix + g.producer] = smoothing_scales(x_absmax, w_absmax, alpha)
    return scales


@torch.no_grad()
def apply_scales(model: torch.nn.Module, arch: Arch, scales: dict[str, torch.Tensor]) -> None:
    """Fold ``scales`` (from :func:`group_scales`) into the model, in place."""
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        for g in arch.groups:
            s = scales[prefix + g.producer]
            producer = layer.get_submodule(g.producer)
            if g.kind != "norm":
                raise NotImplementedError(f"smoothing group kind {g.kind!r}")
            producer.weight.div_(s.to(producer.weight.dtype))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
            for c in g.consumers:
                w = layer.get_submodule(c).weight
                w.mul_((s.view(1, -1) if arch.layout is Layout.OUT_IN else s.view(-1, 1)).to(w.dtype))


def smooth(model: torch.nn.Module, arch: Arch, act_stats: dict[str, torch.Tensor],
           alpha: float) -> dict[str, torch.Tensor]:
    """Compute and fold the smoothing scales; returns them (the step's artifact)."""
    scales = group_scales(model, arch, act_stats, alpha)
    apply_scales(model, arch, scales)
    log.info("smoothed %d groups with alpha=%.2f", len(scales), alpha)
    return scales
