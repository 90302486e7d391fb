"""SmoothQuant+ alpha search: the alpha whose smoothed, weight-quantized model best reproduces the
floating-point model's output on the calibration set.

SmoothQuant+ (Pan et al., 2023) searches alpha over [0, 1] in steps of 0.05 minimising the loss of
the WHOLE model's output (not layer by layer, which is what AWQ does). The loss here is the mean
token KL divergence KL(p_fp || p_quant) of the final next-token distributions over the calibration
windows. Each candidate smooths a copy of
the affected parameters in place, fake-quantizes the weights under the level's plan, scores, and
restores the model exactly (saved tensors are copied back, not divided out).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from .archs import GROUP_KINDS, Arch, decoder_layers
from .errors import ConfigError
from .fakequant import fake_quantized, module_weights
from .plan import GemmQuant
from .smooth import DEFAULT_FOLDS, apply_scales, group_scales

log = logging.getLogger(__name__)

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.00, 0.05, ..., 1.00


@dataclass(frozen=True)
class SearchResult:
    alpha: float
    loss: str  # "kl" (recorded in alpha_search.json)
    losses: dict[float, float] = field(default_factory=dict)  # alpha -> loss
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = {f"{k:.2f}": v for k, v in self.losses.items()}
        return d


def output_loss(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(p_ref || p); (B, T, V) -> ()."""
    ref_lp = torch.log_softmax(ref_logits.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_lp.exp() * (ref_lp - lp)).sum()


def _smoothing_params(model: torch.nn.Module, arch: Arch, plan: dict[str, GemmQuant]) -> list[torch.Tensor]:
    """Every tensor smoothing or fake quantization may change: producers, consumers, planned weights."""
    out: dict[int, torch.Tensor] = {}
    for layer in decoder_layers(model, arch):
        for g in arch.groups:
            prod = layer.get_submodule(g.producer)
            for t in (prod.weight, getattr(prod, "bias", None)):
                if t is not None:
                    out[id(t)] = t
            for p in layer.parameters():  # consumers (including fused-expert parameters)
                out[id(p)] = p
    for name in plan:
        for w in module_weights(model.get_submodule(name)).values():
            out[id(w)] = w
    return list(out.values())


@torch.no_grad()
def search_alpha(model: torch.nn.Module, arch: Arch, act_stats: dict[str, torch.Tensor],
                 plan: dict[str, GemmQuant], windows: torch.Tensor, *, grid: tuple[float, ...] = GRID,
                 batch_size: int = 4, progress: Callable[[int], None] | None = None,
                 folds: tuple[str, ...] = DEFAULT_FOLDS,
                 alpha_by_kind: Mapping[str, float] | None = None) -> SearchResult:
    """Return the alpha in ``grid`` minimising the model-output loss of ``plan``'s fake quantization on
    ``windows`` (n, T). Each candidate smooths exactly as the level will: the groups of ``folds``
    (``quant.smooth_folds``), with ``alpha_by_kind`` overriding the candidate for its kinds. The model
    is left exactly as it was (unsmoothed if it came in unsmoothed)."""
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ConfigError(f"alpha grid must be non-empty values in [0, 1], got {grid}")
    t0 = time.perf_counter()
    batches = [windows[i: i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    ref = [model(input_ids=b, use_cache=False).logits.to(torch.bfloat16) for b in batches]  # FP outputs
    params = _smoothing_params(model, arch, plan)
    saved = [p.detach().clone() for p in params]
    losses: dict[float, float] = {}
    try:
        for alpha in grid:
            per_kind = {**dict.fromkeys(GROUP_KINDS, alpha), **(alpha_by_kind or {})}
            apply_scales(model, arch, group_scales(model, arch, act_stats, per_kind, folds))
            total = 0.0
            with fake_quantized(model, plan):
                for b, r in zip(batches, ref):
                    total += float(output_loss(r, model(input_ids=b, use_cache=False).logits))
            losses[alpha] = total / windows.numel()  # per token
            for p, s in zip(params, saved):
                p.copy_(s)
            log.info("alpha %.2f: KL %.6g", alpha, losses[alpha])
            if progress is not None:
                progress(1)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    best = min(losses, key=lambda a: (losses[a], a))
    return SearchResult(best, "kl", losses, round(time.perf_counter() - t0, 2), int(windows.numel()))
