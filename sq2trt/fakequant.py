"""PyTorch fake quantization of a model under a plan: the numbers the engine should compute.

Used to check the exported engine (engine vs fake-quant must agree to float rounding) and to
evaluate a level without exporting. Restores the model on exit.

A plan entry names a module whose weights are quantized: a ``Linear`` (weight (out, in)), a GPT-2
``Conv1D`` (weight (in, out), ``layout="in_out"``), or a fused-experts module without ``.weight``
(Mixtral: 3-D parameters (experts, out, in), each expert's matrix quantized on its own).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .numerics import dynamic_scale, fake_quant, group_fake_quant, int8_scale, weight_scale
from .plan import GemmQuant


def quantized_weight_out_in(w: torch.Tensor, q: GemmQuant) -> torch.Tensor:
    """Fake-quantized copy of one (out, in) weight matrix under ``q``'s weight granularity."""
    if q.weight_group:
        return group_fake_quant(w, q.weight_group, q.weight_bits, q.weight_symmetric)
    s = weight_scale(w, q.weight_per_channel)  # () or (out,)
    return fake_quant(w, s.view(-1, 1) if s.ndim else s)


def quantized_weight(w: torch.Tensor, q: GemmQuant) -> torch.Tensor:
    """``w`` as stored (2-D in ``q.layout``, or 3-D (experts, out, in)), fake-quantized."""
    if w.ndim == 3:
        return torch.stack([quantized_weight_out_in(e, q) for e in w])
    if q.layout == "in_out":
        return quantized_weight_out_in(w.t(), q).t()
    return quantized_weight_out_in(w, q)


def module_weights(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The GEMM weights of a planned module: ``weight``, or its 3-D parameters (fused experts)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return {"weight": w}
    return {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}


def quantize_input(x: torch.Tensor, q: GemmQuant) -> torch.Tensor:
    """The GEMM input as the engine sees it: static, dynamic per-tensor/per-token, or unchanged."""
    if q.act_amax is not None:
        return fake_quant(x, int8_scale(q.act_amax))
    if q.act_dynamic is not None:
        return fake_quant(x, dynamic_scale(x, q.act_dynamic == "per-token"))
    return x


def batch_invariant(plan: dict[str, GemmQuant]) -> bool:
    """Whether a sequence's logits under ``plan`` are the same alone as inside a padded batch.

    False when any GEMM input has a per-tensor run-time scale: that scale is max|x| over the whole
    (batch, tokens, channels) input, in the exported graph (``ReduceMax`` over every axis, which ONNX
    Runtime fuses into its integer kernels like a static scale) and here alike, so the other rows of a
    batch and right-padding (``sq2trt.tasks`` pads with id 0) move every row's scale. Such plans must be
    scored one sequence at a time, without padding. Per-token and static scales do not mix rows."""
    return not any(q.act_dynamic == "per-tensor" for q in plan.values())


@contextmanager
@torch.no_grad()
def fake_quantized(model: torch.nn.Module, plan: dict[str, GemmQuant]) -> Iterator[torch.nn.Module]:
    """``model`` with ``plan``'s weights fake-quantized and its GEMM inputs quantized, restored on exit.

    Under layer-wise onloading (sq2trt.onload) the stored weights are left alone: each planned
    weight is quantized when its layer is onloaded, in FP32 from the stored weight, so the values
    are exactly ``quantized_weight(stored.float(), q)`` and no whole-model quantized copy exists.
    Otherwise (an FP32 model on the CPU) the weights are quantized in place and copied back."""
    from .onload import active

    lw = active(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    transformed: list[tuple[torch.Tensor, object]] = []
    handles = []
    try:
        for name, q in plan.items():
            mod = model.get_submodule(name)
            for w in module_weights(mod).values():
                if lw is not None:
                    transformed.append((w, lw.set_transform(w, lambda t, _q=q: quantized_weight(t, _q))))
                    continue
                saved.append((w, w.detach().clone()))
                w.copy_(quantized_weight(w, q))
            if q.act_amax is not None or q.act_dynamic is not None:
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, _q=q: (quantize_input(args[0], _q),) + tuple(args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for w, orig in saved:
            w.copy_(orig)
        for w, prev in reversed(transformed):
            lw.set_transform(w, prev)
