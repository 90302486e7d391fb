"""Small pure functions for the numerics. Tensors in, tensors out; nothing here mutates a model.

INT8 is symmetric as TensorRT computes it: ``q = clamp(round_half_even(x / scale), -128, 127)``,
zero point 0, ``scale = amax / 127 > 0``.
"""
from __future__ import annotations

import torch

QMIN, QMAX = -128, 127
EPS = 1e-5  # clamp for max|X_j|, max|W_j| and s (the paper's reference implementation)
MIN_SCALE = 1e-8  # a tensor that is all zeros still gets a positive, finite scale


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α), both clamped to >= 1e-5, s clamped to >= 1e-5.

    x_absmax, w_absmax: (in_features,). A channel that never fires (max|X_j| == 0) gets s = 1,
    so it is left alone instead of being scaled by an arbitrary clamp value.
    """
    x = x_absmax.float().clamp(min=EPS)
    w = w_absmax.float().clamp(min=EPS)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS)
    return torch.where(x_absmax > 0, s, torch.ones_like(s))


def int8_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """scale = amax / 127, always finite and > 0."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / QMAX).clamp(min=MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 values (as int8) of x; scale broadcasts against x. torch.round is half-to-even."""
    return torch.clamp(torch.round(x / scale), QMIN, QMAX).to(torch.int8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype."""
    return (torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale).to(x.dtype)


def weight_scale(w_out_in: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """INT8 scale of a Linear weight (out_features, in_features): () or (out_features,)."""
    if per_channel:
        return int8_scale(w_out_in.abs().amax(dim=1))  # (out,)
    return int8_scale(w_out_in.abs().amax())  # ()


# --------------------------------------------------------------------------- granularity-driven
# Weights are handled in (out, in) orientation here; callers transpose other layouts first.
def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: INT8 [-128, 127], INT4 [-8, 7], UINT4 [0, 15] (asymmetric)."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _grouped(w_out_in: torch.Tensor, size: int) -> torch.Tensor:
    """(out, in) -> (out, ceil(in/size), size), zero-padded (a partial last block, as ONNX allows)."""
    out, k = w_out_in.shape
    n = -(-k // size)
    pad = n * size - k
    if pad:
        w_out_in = torch.nn.functional.pad(w_out_in, (0, pad))
    return w_out_in.reshape(out, n, size)


def group_qparams(w_out_in: torch.Tensor, size: int, bits: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per (output channel, block of ``size`` input channels): (out, ceil(in/size)).

    symmetric: scale = max|w| / qmax, zero point 0. asymmetric: scale = (max - min) / (2^bits - 1) over a
    range that includes 0, zero point = round(-min / scale) in [0, 2^bits - 1].
    """
    g = _grouped(w_out_in.float(), size)
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = (g.abs().amax(dim=-1) / qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zp = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zp


def group_fake_quant(w_out_in: torch.Tensor, size: int, bits: int = 8, symmetric: bool = True) -> torch.Tensor:
    """Group-wise quantize-dequantize of an (out, in) weight, blocks along the input channels."""
    out, k = w_out_in.shape
    scale, zp = group_qparams(w_out_in, size, bits, symmetric)
    qmin, qmax = int_range(bits, symmetric)
    g = _grouped(w_out_in.float(), size)
    q = torch.clamp(torch.round(g / scale[..., None]) + zp[..., None], qmin, qmax)
    deq = ((q - zp[..., None]) * scale[..., None]).reshape(out, -1)[:, :k]
    return deq.to(w_out_in.dtype)


def dynamic_scale(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Run-time INT8 scale of an activation: () per tensor, (..., 1) per token (last axis reduced)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True) if per_token else x.detach().abs().amax()
    return (amax.float() / QMAX).clamp(min=MIN_SCALE)


def head_channel_index(producer_out: int, consumer_in: int, n_kv_heads: int) -> torch.Tensor:
    """For each consumer input channel, the producer output channel it reads: (consumer_in,).

    Grouped-query attention: o_proj input channel (h, d) of query head h reads v_proj channel
    (h // n_rep, d), n_rep = n_heads / n_kv = consumer_in / producer_out. Without GQA (n_rep = 1,
    or a plain Linear -> Linear fold) this is arange(consumer_in).
    """
    if consumer_in == producer_out:
        return torch.arange(consumer_in)
    if consumer_in % producer_out or producer_out % n_kv_heads:
        raise ValueError(f"cannot map {consumer_in} consumer channels onto {producer_out} producer channels "
                         f"in {n_kv_heads} KV heads")
    head_dim, n_rep = producer_out // n_kv_heads, consumer_in // producer_out
    kv = torch.arange(n_kv_heads).repeat_interleave(n_rep)  # (n_heads,): KV head of each query head
    return (kv[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # (n_heads * head_dim,)


def reduce_max_to(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """max of ``values`` (consumer channels) over the consumer channels that read each producer channel."""
    out = torch.zeros(size, dtype=values.dtype)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=False)
