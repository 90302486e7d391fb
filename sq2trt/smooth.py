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


def _in_absmax(w: torch.Tensor, layout: Layout) -> torch.Tensor:
    w = w.detach()  # (out, in), (experts, out, in) or, for IN_OUT, (in, out)
    if layout is Layout.OUT_IN:
        return w.abs().reshape(-1, w.shape[-1]).amax(dim=0).float()  # (in,)
    return w.abs().amax(dim=1).float()  # (in,)


def _consumer_weight(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """A consumer's weight: ``<module>.weight``, or a parameter named directly (fused experts)."""
    mod = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
    sub = getattr(mod, name.rsplit(".", 1)[-1])
    return sub.weight if isinstance(sub, torch.nn.Module) else sub


def _consumer_stats(act_stats: dict[str, torch.Tensor], prefix: str, consumers: tuple[str, ...]) -> torch.Tensor:
    """max|X_j| of a group's shared input, from the consumers that were calibrated (a parameter consumer
    shares its owning module's statistics; a floating-point consumer such as a MoE router has none)."""
    found = []
    for c in consumers:
        for key in (prefix + c, (prefix + c).rsplit(".", 1)[0]):
            if key in act_stats:
                found.append(act_stats[key])
                break
    if not found:
        raise KeyError(f"no calibration statistics for any of {consumers} under {prefix}")
    return torch.stack(found).amax(dim=0)


def group_scales(model: torch.nn.Module, arch: Arch, act_stats: dict[str, torch.Tensor],
                 alpha: float) -> dict[str, torch.Tensor]:
    """``{"<layers>.<i>.<producer>": s}`` for every group of every layer. Pure: reads the model.

    max|X_j| is the running max of the group's (shared) input; max|W_j| is over the whole group.
    """
    scales = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        for g in arch.groups:
            x_absmax = _consumer_stats(act_stats, prefix, g.consumers)
            w_absmax = torch.stack([_in_absmax(_consumer_weight(layer, c), arch.layout)
                                    for c in g.consumers]).amax(dim=0)
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
                w = _consumer_weight(layer, c)
                w.mul_((s if arch.layout is Layout.OUT_IN else s.view(-1, 1)).to(w.dtype))  # in = last axis


def smooth(model: torch.nn.Module, arch: Arch, act_stats: dict[str, torch.Tensor],
           alpha: float) -> dict[str, torch.Tensor]:
    """Compute and fold the smoothing scales; returns them (the step's artifact)."""
    scales = group_scales(model, arch, act_stats, alpha)
    apply_scales(model, arch, scales)
    log.info("smoothed %d groups with alpha=%.2f", len(scales), alpha)
    return scales
