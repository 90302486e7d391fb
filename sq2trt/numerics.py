"""Small pure functions for the numerics. Tensors in, tensors out; nothing here mutates a model.

INT8 is symmetric as TensorRT computes it: ``q = clamp(round_half_even(x / scale), -128, 127)``,
zero point 0, ``scale = amax / 127 > 0``.
"""
from __future__ import annotations

import torch

QMIN, QMAX = -128, 127
EPS = 1e-5  # clamp for max|X_j|, max|W_j| and s (DESIGN.md, reference repo)
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


def percentile_absmax(x: torch.Tensor, pct: float, max_elems: int = 1 << 22) -> torch.Tensor:
    """pct-th percentile of |x| (a clipping threshold below max|x|). Large tensors are strided
    down to at most ``max_elems`` elements first (torch.quantile's size limit)."""
    flat = x.detach().abs().flatten().float()
    if flat.numel() > max_elems:
        flat = flat[:: (flat.numel() + max_elems - 1) // max_elems]
    return torch.quantile(flat, pct / 100.0)


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
