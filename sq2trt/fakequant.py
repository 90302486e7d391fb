"""PyTorch fake quantization of a model under a plan: the numbers the engine should compute.

Used to check the exported engine (engine vs fake-quant must agree to float rounding) and to
evaluate a level without exporting. Restores the model on exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .numerics import fake_quant, int8_scale, weight_scale
from .plan import GemmQuant


@contextmanager
@torch.no_grad()
def fake_quantized(model: torch.nn.Module, plan: dict[str, GemmQuant]) -> Iterator[torch.nn.Module]:
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, q in plan.items():
            lin = model.get_submodule(name)
            w = lin.weight
            saved[name] = w.detach().clone()
            s = weight_scale(w, q.weight_per_channel)  # () or (out,)
            w.copy_(fake_quant(w, s.view(-1, 1) if s.ndim else s))
            if q.act_amax is not None:
                a_scale = int8_scale(q.act_amax)
                handles.append(lin.register_forward_pre_hook(
                    lambda _m, args, _s=a_scale: (fake_quant(args[0], _s),) + tuple(args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():
            model.get_submodule(name).weight.copy_(w)
