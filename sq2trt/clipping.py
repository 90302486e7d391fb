"""Static per-tensor clip values from calibration data: running |x| histograms, then percentile or
MSE-optimal clipping (the TensorRT-calibrator way, without TensorRT).

A histogram is ``(counts, top)``: ``counts`` (bins,) float64 over [0, top] in equal bins. It grows
by doubling ``top`` and merging bins pairwise, so one pass over the data suffices and nothing but
``bins`` numbers is kept per tensor. All functions are pure.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .numerics import QMAX

log = logging.getLogger(__name__)

BINS = 2048  # a power of two: doubling merges bins pairwise

Hist = tuple[torch.Tensor, float]  # (counts (bins,), top)


def hist_update(prev: Hist | None, x: torch.Tensor, bins: int = BINS) -> Hist:
    """Fold |x| into a running histogram, growing its range (doubling) when x exceeds it."""
    a = x.detach().abs().flatten().float()
    amax = float(a.max()) if a.numel() else 0.0
    if prev is None:
        counts, top = torch.zeros(bins, dtype=torch.float64), max(amax, 1e-8)
    else:
        counts, top = prev
        if amax > top:
            k = math.ceil(math.log2(amax / top))
            f = 2 ** min(k, int(math.log2(bins)))
            merged = counts.view(-1, f).sum(dim=1)
            counts = torch.cat([merged, torch.zeros(bins - merged.numel(), dtype=torch.float64)])
            top = top * 2 ** k
    return counts + torch.histc(a, bins=bins, min=0.0, max=top).double(), top


def _centers(counts: torch.Tensor, top: float) -> torch.Tensor:
    return (torch.arange(counts.numel(), dtype=torch.float64) + 0.5) * (top / counts.numel())


def percentile_clip(hist: Hist, pct: float) -> float:
    """Smallest bin edge below which ``pct`` % of |x| lies."""
    counts, top = hist
    cdf = counts.cumsum(0) / counts.sum().clamp(min=1)
    i = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=torch.float64)))
    return top * min(i + 1, counts.numel()) / counts.numel()


def clip_mse(hist: Hist, clips: torch.Tensor) -> torch.Tensor:
    """Expected squared error per element of symmetric INT8 fake quantization clipped at each of
    ``clips`` (C,), from the histogram: values beyond c cost (|x| - c)^2; values inside cost the
    rounding noise min(x^2, step^2 / 12), step = c / 127."""
    counts, _ = hist
    x = _centers(*hist)  # (B,)
    c = clips.double()[:, None]  # (C, 1)
    step2 = (c / QMAX) ** 2
    inside = torch.minimum(x[None] ** 2, step2 / 12)
    err = torch.where(x[None] <= c, inside, (x[None] - c) ** 2)  # (C, B)
    return (err * counts[None]).sum(dim=1) / counts.sum().clamp(min=1)


def mse_clip(hist: Hist, candidates: int = 512) -> float:
    """The clip c (a bin edge) minimising E[(x - fakequant_c(x))^2]; candidates are the top
    ``candidates`` bin edges' worth of range, evenly spaced from top/candidates to top."""
    _, top = hist
    clips = torch.arange(1, candidates + 1, dtype=torch.float64) * (top / candidates)
    return float(clips[int(torch.argmin(clip_mse(hist, clips)))])


def clip_from_hist(hist: Hist, how: str, pct: float = 99.99) -> float:
    if how == "mse":
        return mse_clip(hist)
    if how == "percentile":
        return percentile_clip(hist, pct)
    if how == "max":
        return float(hist[1])
    raise ValueError(f"unknown clipping {how!r}")


def clip_candidates(hists: Mapping[str, Hist], exact_max: Mapping[str, float],
                    pct: float = 99.99) -> dict[str, dict[str, float]]:
    """{GEMM: {"max", "percentile", "mse": clip value}} for :func:`choose_clips`. ``max`` is the exact
    running max (a histogram's ``top`` can exceed it by up to 2x after doubling)."""
    return {n: {"max": float(exact_max[n]), "percentile": percentile_clip(h, pct), "mse": mse_clip(h)}
            for n, h in hists.items()}


@dataclass
class ClipChoice:
    methods: dict[str, str]  # {GEMM kind: clipping method}
    amax: dict[str, float]  # {GEMM: clip value} under ``methods``
    loss: float
    start_loss: float
    history: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, method, loss)


def choose_clips(kinds: Mapping[str, str], candidates: Mapping[str, Mapping[str, float]],
                 loss: Callable[[dict[str, float]], float], start: str = "max") -> ClipChoice:
    """One clipping method per GEMM kind, chosen on the model's output rather than on each tensor.

    ``kinds``: {GEMM: kind}; ``candidates``: {GEMM: {method: clip value}} (the same methods for every
    GEMM, ``start`` among them); ``loss(amax)``: the whole model's output loss with those static
    clip values (e.g. mean KL vs floating point on calibration windows). Starting from ``start``
    everywhere, each kind in turn tries every method with the others held; a method is kept only
    when it lowers the loss, so the result is never worse than ``start`` on that loss.

    Why per kind and on the output: an MSE- or percentile-optimal clip of one tensor can cut the
    rare huge activations (attention-sink tokens at down_proj inputs) that the next layers rely
    on, which raises the model's error although each tensor's own error fell.
    """
    methods = list(dict.fromkeys(m for c in candidates.values() for m in c))
    missing = [n for n, c in candidates.items() if set(c) != set(methods)]
    if missing or start not in methods:
        raise ValueError(f"every GEMM needs the same clipping candidates {methods} including {start!r}; "
                         f"not: {missing[:3]}")
    order = list(dict.fromkeys(kinds[n] for n in candidates))
    choice = {k: start for k in order}

    def amax_of(ch: Mapping[str, str]) -> dict[str, float]:
        return {n: float(candidates[n][ch[kinds[n]]]) for n in candidates}

    best = start_loss = loss(amax_of(choice))
    history = [("start", start, start_loss)]
    for kind in order:
        for m in methods:
            if m == choice[kind]:
                continue
            trial = {**choice, kind: m}
            value = loss(amax_of(trial))
            history.append((kind, m, value))
            log.info("clip search: %s=%s -> loss %.4g (best %.4g)", kind, m, value, best)
            if value < best:
                best, choice = value, trial
    return ClipChoice(dict(choice), amax_of(choice), best, start_loss, history)
