"""SmoothQuant: migrate activation outliers into weights. The one place that mutates a model.

For a group (producer -> consumer Linears) with per-channel scales ``s`` (producer channels,):
the producer's output is divided by s (a norm's weight and bias, or a Linear's output rows and
bias — see ``archs.GROUP_KINDS``), and the consumers' input columns are multiplied by s (through
the GQA head map for attention's v -> o fold). The output is unchanged; the graph gains no op.
"""
from __future__ import annotations

import logging
from typing import Iterator, Mapping

import torch

from .archs import GROUP_KINDS, SMOOTH_FOLDS, Arch, Group, Layout, decoder_layers
from .numerics import head_channel_index, reduce_max_to, smoothing_scales

log = logging.getLogger(__name__)

DEFAULT_FOLDS = ("norm",)
Alpha = float | Mapping[str, float]  # one alpha, or {group kind: alpha} with the arch default for others


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


def _consumer_stat(act_stats: Mapping[str, torch.Tensor], prefix: str, consumer: str) -> torch.Tensor | None:
    """max|X_j| at a consumer's input: its own statistics, or its owning module's for a parameter
    consumer (fused experts); None for a floating-point consumer such as a MoE router."""
    for key in (prefix + consumer, (prefix + consumer).rsplit(".", 1)[0]):
        if key in act_stats:
            return act_stats[key]
    return None


def _out_features(linear: torch.nn.Module, layout: Layout) -> int:
    return linear.weight.shape[0 if layout is Layout.OUT_IN else 1]


def _n_kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def enabled_groups(arch: Arch, folds: tuple[str, ...] = DEFAULT_FOLDS) -> list[Group]:
    return [g for g in arch.groups if GROUP_KINDS[g.kind].fold in folds]


def alpha_for(alpha: Alpha, kind: str, default: float) -> float:
    return float(alpha) if not isinstance(alpha, Mapping) else float(alpha.get(kind, default))


def _index(model, layer, arch: Arch, g: Group, weight: torch.Tensor) -> torch.Tensor:
    """Producer channel read by each consumer input channel: (consumer in_features,)."""
    n_in = weight.shape[-1 if arch.layout is Layout.OUT_IN else 0]
    if GROUP_KINDS[g.kind].producer == "norm":
        return torch.arange(n_in)
    n_out = _out_features(layer.get_submodule(g.producer), arch.layout)
    n_kv = _n_kv_heads(model.config) if GROUP_KINDS[g.kind].heads else 1
    return head_channel_index(n_out, n_in, n_kv)


ALL_FOLDS = SMOOTH_FOLDS  # every fold the table knows


def iter_groups(model: torch.nn.Module, arch: Arch,
                folds: tuple[str, ...]) -> Iterator[tuple[torch.nn.Module, str, str, Group]]:
    """(layer, layer prefix, producer key, group) for every enabled group of every layer."""
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        for g in enabled_groups(arch, folds):
            yield layer, prefix, prefix + g.producer, g


def group_inputs(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor],
                 folds: tuple[str, ...] = DEFAULT_FOLDS) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """``{producer key: (x_absmax, w_absmax, kind)}``, both (producer channels,). Pure: reads the model.

    max|X_j| is the running max of the group's (shared) input; max|W_j| is over the whole group;
    for a GQA fold both are maxed over the query heads that read KV channel j.
    """
    out = {}
    for layer, prefix, key, g in iter_groups(model, arch, folds):
        xs, ws = [], []
        for c in g.consumers:
            w = _consumer_weight(layer, c)
            idx = _index(model, layer, arch, g, w)
            size = int(idx.max()) + 1
            stat = _consumer_stat(act_stats, prefix, c)
            if stat is not None:  # a floating-point consumer (MoE router) has no statistics: weights only
                xs.append(reduce_max_to(stat.float(), idx, size))
            ws.append(reduce_max_to(_in_absmax(w, arch.layout), idx, size))
        if not xs:
            raise KeyError(f"no calibration statistics for any of {g.consumers} under {prefix}")
        out[key] = (torch.stack(xs).amax(dim=0), torch.stack(ws).amax(dim=0), g.kind)
    return out


def scales_from_inputs(inputs: Mapping[str, tuple[torch.Tensor, torch.Tensor, str]], alpha: Alpha,
                       default_alpha: float) -> dict[str, torch.Tensor]:
    return {k: smoothing_scales(x, w, alpha_for(alpha, kind, default_alpha)) for k, (x, w, kind) in inputs.items()}


def group_scales(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor],
                 alpha: Alpha, folds: tuple[str, ...] = DEFAULT_FOLDS) -> dict[str, torch.Tensor]:
    """``{"<layers>.<i>.<producer>": s}`` for every enabled group of every layer. Pure: reads the model.

    ``alpha``: one value, or ``{group kind: alpha}`` (kinds not named get the arch's default).
    All scales are computed from the model as given (before any of them is folded).
    """
    return scales_from_inputs(group_inputs(model, arch, act_stats, folds), alpha, arch.alpha)


def _scale_rows(t: torch.Tensor, s: torch.Tensor, dim: int, inverse: bool) -> None:
    """``t /= s`` (``inverse``) or ``t *= s`` along ``dim``, in place (``t`` FP32)."""
    shape = [1] * t.ndim
    shape[dim] = -1
    f = s.float().view(shape).to(t.device)
    t.div_(f) if inverse else t.mul_(f)


@torch.no_grad()
def apply_scales(model: torch.nn.Module, arch: Arch, scales: Mapping[str, torch.Tensor]) -> None:
    """Fold ``scales`` (from :func:`group_scales`) into the model, in place. Groups whose producer
    has no entry in ``scales`` are left alone, so the scales file says what was folded.

    The folds of a tensor (v_proj, say: its columns by the q/k/v scale, its rows by the o scale) are
    computed in FP32, in group order, and stored back once: an FP16/BF16-stored weight is rounded
    once, to exactly what folding its FP32 upcast and rounding would give."""
    row_dim, col_dim = (0, 1) if arch.layout is Layout.OUT_IN else (1, 0)
    todo: dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, int, bool]]]] = {}

    def fold(t: torch.Tensor, s: torch.Tensor, dim: int, inverse: bool) -> None:
        todo.setdefault(id(t), (t, []))[1].append((s, dim, inverse))

    for layer, _, key, g in iter_groups(model, arch, ALL_FOLDS):
        s = scales.get(key)
        if s is None:
            continue
        producer = layer.get_submodule(g.producer)
        fold(producer.weight, s, 0 if GROUP_KINDS[g.kind].producer == "norm" else row_dim, True)
        if getattr(producer, "bias", None) is not None:
            fold(producer.bias, s, 0, True)
        for c in g.consumers:
            w = _consumer_weight(layer, c)  # input channels: last axis (OUT_IN, incl. 3-D experts) or 0
            fold(w, s[_index(model, layer, arch, g, w)], w.ndim - 1 if col_dim == 1 else 0, False)
    for t, ops in todo.values():  # one tensor at a time: an FP32 copy of one weight at most
        x = t if t.dtype == torch.float32 else t.float()
        for s, dim, inverse in ops:
            _scale_rows(x, s, dim, inverse)
        if x is not t:
            t.copy_(x)


def folded_tensors(model: torch.nn.Module, arch: Arch, folds: tuple[str, ...] = ALL_FOLDS) -> list[torch.Tensor]:
    """Every tensor :func:`apply_scales` may change for ``folds``: producers' weights and biases and
    consumers' weights (what must be saved to undo a fold exactly; nothing else is touched)."""
    out: dict[int, torch.Tensor] = {}
    for layer, _, _, g in iter_groups(model, arch, folds):
        producer = layer.get_submodule(g.producer)
        for t in (producer.weight, getattr(producer, "bias", None),
                  *(_consumer_weight(layer, c) for c in g.consumers)):
            if t is not None:
                out[id(t)] = t
    return list(out.values())


def smooth(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor], alpha: Alpha,
           folds: tuple[str, ...] = DEFAULT_FOLDS) -> dict[str, torch.Tensor]:
    """Compute and fold the smoothing scales; returns them (the step's artifact)."""
    scales = group_scales(model, arch, act_stats, alpha, folds)
    apply_scales(model, arch, scales)
    log.info("smoothed %d groups (folds %s) with alpha=%s", len(scales), ",".join(folds), alpha)
    return scales


def smoothed_act_stats(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor],
                       scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel max|x| at every Linear input once ``scales`` are folded, from the stats of the
    unsmoothed model: a consumer's input is X / s (exactly, the folds change nothing else), so
    max|x_j| / s_j — no second calibration pass. Pure: reads the model."""
    out = dict(act_stats)
    for layer, prefix, key, g in iter_groups(model, arch, ALL_FOLDS):
        s = scales.get(key)
        if s is None:
            continue
        for c in g.consumers:
            if prefix + c not in act_stats:  # parameter consumers / floating-point router
                continue
            idx = _index(model, layer, arch, g, _consumer_weight(layer, c))
            out[prefix + c] = act_stats[prefix + c].float() / s[idx]
    return out
