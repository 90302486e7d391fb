"""Calibration: running reductions over the inputs of quantized Linears, kept in forward hooks.

Activations are never stored: each hook folds its batch into a running maximum.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch

from .artifacts import crash_point
from .errors import NonFiniteActivationError

log = logging.getLogger(__name__)

Reducer = Callable[[torch.Tensor], torch.Tensor]  # x (..., in_features) -> statistic
Update = Callable[[Any, torch.Tensor], Any]  # (running statistic or None, x) -> new running statistic


def per_channel_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (in_features,)


def per_tensor_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float()  # ()


@contextmanager
def _hooks(model: torch.nn.Module, names: Iterable[str], update: Update, stats: dict[str, Any]) -> Iterator[None]:
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_m, args, _name=name):
            x = args[0]
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(
                    f"NaN or Inf in the input of {_name} during calibration; the model overflows on this "
                    "text in float32 (check the model weights, or use other calibration text)")
            stats[_name] = update(stats.get(_name), x)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder without the LM head: calibration needs no logits, and the head is the largest GEMM."""
    get = getattr(model, "get_decoder", None)
    try:
        return get() if get is not None else model
    except (AttributeError, NotImplementedError):
        return model


@torch.no_grad()
def collect(model: torch.nn.Module, names: list[str], windows: torch.Tensor, reducer: Reducer,
            batch_size: int = 4, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Run ``windows`` (num, seq_len) through the model; return ``{name: running max of reducer}``."""
    def running_max(prev, x):
        val = reducer(x)
        return val if prev is None else torch.maximum(prev, val)

    return collect_with(model, names, windows, running_max, batch_size, progress)


@torch.no_grad()
def collect_with(model: torch.nn.Module, names: list[str], windows: torch.Tensor, update: Update,
                 batch_size: int = 4, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Like :func:`collect` with any running reduction, e.g. ``clipping.hist_update`` (histograms)."""
    stats: dict[str, Any] = {}
    body = _forward_body(model)
    with _hooks(model, names, update, stats):
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i: i + batch_size]
            body(input_ids=batch, use_cache=False)
            if progress is not None:
                progress(batch.shape[0])
            if i == 0:
                crash_point("calibrate:first-batch")  # tests: a run killed mid-calibration
    missing = [n for n in names if n not in stats]
    if missing:
        raise RuntimeError(f"calibration hooks never fired for {missing[:3]}...; the architecture row "
                           "names modules the forward pass does not call")
    return {k: _on_cpu(v) for k, v in stats.items()}


def _on_cpu(v: Any) -> Any:
    """A running statistic as callers keep it: tensors on the CPU (the reductions ran on the device
    the activations were on: the GPU under sq2trt.onload)."""
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, tuple):
        return tuple(_on_cpu(x) for x in v)
    return v
