"""Automatic per-GEMM floating-point fallback: keep the fewest GEMMs in floating point that bring
the quantized model within a perplexity target.

1. Rank: a cheap local error for every GEMM (its own output error when quantized, on its FP
   input, from one forward pass) shortlists the ``measure_top`` worst; each of those is then
   measured on the model's output — mean KL(P_fp || P_q) when that GEMM alone is left in FP and
   everything else is quantized (the complement measure: exactly the move the greedy step makes).
   Measured GEMMs rank first (largest KL reduction first), the rest follow by local error.
2. Greedy: add GEMMs in rank order until perplexity on held-out calibration windows (never the
   evaluation text) rises by at most the target over the FP model.

Pure pieces (:func:`rank`, :func:`greedy`, :func:`heldout_windows`) take numbers or callables;
:func:`auto_fallback` is the one loop that runs the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .plan import GemmQuant

log = logging.getLogger(__name__)


@dataclass
class FallbackResult:
    fallback: list[str]  # GEMMs kept in floating point, in the order they were added
    increase: float  # ppl_q / ppl_fp - 1 with that fallback, on held-out windows
    target: float
    met: bool
    ranked: list[str] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)  # (number in FP, increase)

    def __bool__(self) -> bool:
        return self.met

    def to_dict(self) -> dict:
        return {"fallback": self.fallback, "increase": self.increase, "target": self.target, "met": self.met,
                "ranked": self.ranked, "history": self.history}


def rank(local: Mapping[str, float], measured: Mapping[str, float]) -> list[str]:
    """Measured GEMMs first (by gain, largest first), then the rest by local error (largest first)."""
    first = sorted(measured, key=lambda n: -measured[n])
    return first + sorted((n for n in local if n not in measured), key=lambda n: -local[n])


def greedy(ranked: Sequence[str], increase_of: Callable[[list[str]], float], target: float,
           max_layers: int | None = None) -> FallbackResult:
    """Add ``ranked`` GEMMs to the FP set one at a time until ``increase_of(fp_set) <= target``;
    returns the shortest such prefix (or the longest tried, ``met=False``)."""
    limit = len(ranked) if max_layers is None else min(max_layers, len(ranked))
    history = []
    for k in range(limit + 1):
        inc = increase_of(list(ranked[:k]))
        history.append((k, inc))
        log.info("fallback: %d GEMMs in FP -> ppl increase %.4f (target %.4f)", k, inc, target)
        if inc <= target:
            return FallbackResult(list(ranked[:k]), inc, target, True, list(ranked), history)
    return FallbackResult(list(ranked[:limit]), history[-1][1], target, False, list(ranked), history)


def heldout_windows(ids: torch.Tensor, used_starts: Sequence[int], seq_len: int, num: int,
                    window: int) -> torch.Tensor:
    """``num`` windows of ``window`` tokens from ``ids`` that overlap no calibration window
    (starts ``used_starts``, each ``seq_len`` long), taken from the end of the text: (num, window)."""
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in used_starts:
        used[s: s + seq_len] = True
    out, end = [], ids.numel()
    while len(out) < num and end - window >= 0:
        if used[end - window: end].any():
            end = int(torch.nonzero(used[end - window: end])[-1]) + end - window  # jump before the used token
            continue
        out.append(ids[end - window: end])
        end -= window
    if not out:
        from .errors import CalibrationDataError

        raise CalibrationDataError("no calibration text is left outside the calibration windows for the "
                                   "fallback's held-out perplexity; give more calibration text")
    return torch.stack(out)


def _nll_ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    from .evaluate import perplexity, torch_logits_fn

    return perplexity(torch_logits_fn(model), windows)


@torch.no_grad()
def local_errors(model: torch.nn.Module, plan: Mapping[str, GemmQuant], windows: torch.Tensor) -> dict[str, float]:
    """Relative output error ||y_q - y||^2 / ||y||^2 of every planned GEMM on its FP input (one pass).

    ``y_q`` is the module's own forward on its quantized input with its weights quantized exactly as
    :func:`sq2trt.fakequant.fake_quantized` quantizes them (any layout: ``Linear``, GPT-2 ``Conv1D``,
    fused experts; any granularity: per-tensor, per-channel, group-wise, INT4; static or dynamic
    activations)."""
    from .fakequant import module_weights, quantize_input, quantized_weight

    err: dict[str, list[float]] = {n: [0.0, 0.0] for n in plan}
    handles = []

    def hook(mod, args, kwargs, out, name):
        q = plan[name]
        params = module_weights(mod)
        saved = {k: p.data for k, p in params.items()}
        try:
            for k, p in params.items():
                p.data = quantized_weight(saved[k], q)  # one layer's copy at a time, not the model's
            yq = mod.forward(quantize_input(args[0], q), *args[1:], **kwargs)  # forward(): no hooks again
        finally:
            for k, p in params.items():
                p.data = saved[k]
        y, yq = (out[0], yq[0]) if isinstance(out, tuple) else (out, yq)
        err[name][0] += float(((yq.float() - y.float()) ** 2).sum())
        err[name][1] += float((y.float() ** 2).sum())

    for n in plan:
        handles.append(model.get_submodule(n).register_forward_hook(
            lambda m, a, k, o, _n=n: hook(m, a, k, o, _n), with_kwargs=True))
    try:
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: e / max(d, 1e-30) for n, (e, d) in err.items()}


def auto_fallback(model: torch.nn.Module, plan: Mapping[str, GemmQuant], rank_windows: torch.Tensor,
                  heldout: torch.Tensor, target: float, *, measure_top: int = 16,
                  max_layers: int | None = None) -> FallbackResult:
    """The fewest GEMMs of ``plan`` to keep in FP so held-out perplexity rises by <= ``target``."""
    from .alpha_search import logits_of, mean_kl
    from .fakequant import fake_quantized

    def without(fp: Sequence[str]) -> dict[str, GemmQuant]:
        return {n: q for n, q in plan.items() if n not in set(fp)}

    ppl_fp = _nll_ppl(model, heldout)
    ref = logits_of(model, rank_windows)
    local = local_errors(model, plan, rank_windows)
    shortlist = sorted(local, key=lambda n: -local[n])[:measure_top]
    with fake_quantized(model, plan):
        base = mean_kl(ref, logits_of(model, rank_windows))
    measured = {}
    for n in shortlist:
        with fake_quantized(model, without([n])):
            measured[n] = base - mean_kl(ref, logits_of(model, rank_windows))
    order = rank(local, measured)

    def increase_of(fp: list[str]) -> float:
        with fake_quantized(model, without(fp)):
            return _nll_ppl(model, heldout) / ppl_fp - 1.0

    res = greedy(order, increase_of, target, max_layers)
    log.info("fallback: %d of %d GEMMs in FP, held-out ppl increase %.4f (target %.4f, %s)", len(res.fallback),
             len(plan), res.increase, target, "met" if res.met else "NOT met")
    return res
