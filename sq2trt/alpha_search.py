"""Per-kind smoothing strength for W8A8 O3, searched on the whole model's output (SmoothQuant+'s
criterion): coordinate descent over group kinds (qkv, mlp_in, down, o), alpha on a 0.05 grid in
[0, 1], minimising the mean KL(P_fp || P_O3) of the final logits on a few calibration windows.

Each candidate folds its scales into the model, takes the static per-tensor amax straight from
the per-channel calibration stats (max_j max|x_j| / s_j: exact for ``act_clip: max``, no extra
calibration pass), fake-quantizes under the O3 plan, and restores the weights. FP logits are
computed once.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .archs import Arch
from .config import QuantConfig
from .plan import make_plan

log = logging.getLogger(__name__)

Alphas = dict[str, float]


def alpha_grid(step: float = 0.05) -> list[float]:
    n = round(1.0 / step)
    return [round(i * step, 6) for i in range(n + 1)]


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """mean over tokens of KL(softmax(ref) || softmax(logits)); both (..., V)."""
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())


@dataclass
class SearchResult:
    alphas: Alphas
    loss: float
    start_loss: float
    history: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, alpha, loss)


def coordinate_descent(kinds: Sequence[str], start: Mapping[str, float], loss: Callable[[Alphas], float],
                       grid: Sequence[float], rounds: int = 1) -> SearchResult:
    """Minimise ``loss(alphas)`` one kind at a time over ``grid`` (others held), ``rounds`` sweeps.
    Ties keep the earlier value (the start first)."""
    best = dict(start)
    best_loss = start_loss = loss(best)
    history = [("start", float("nan"), start_loss)]
    for _ in range(rounds):
        changed = False
        for kind in kinds:
            for a in grid:
                if a == best[kind]:
                    continue
                cand = {**best, kind: a}
                val = loss(cand)
                history.append((kind, a, val))
                if val < best_loss:
                    best, best_loss, changed = cand, val, True
            log.info("alpha[%s] = %.2f (loss %.4g)", kind, best[kind], best_loss)
        if not changed:
            break
    return SearchResult(best, best_loss, start_loss, history)


@contextmanager
@torch.no_grad()
def restored(model: torch.nn.Module, tensors: Sequence[torch.Tensor] | None = None) -> Iterator[torch.nn.Module]:
    """Run a block that mutates ``model``'s parameters (only ``tensors``, when given), then put them
    back exactly. Naming the tensors keeps the saved copy to what the block changes (a real-size
    model is not cloned whole for every loss evaluation)."""
    if tensors is None:
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            yield model
        finally:
            model.load_state_dict(saved)
        return
    copies = [(t, t.detach().clone()) for t in tensors]
    try:
        yield model
    finally:
        for t, c in copies:
            t.copy_(c)


def logits_of(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=windows[i: i + batch_size], use_cache=False).logits
                          for i in range(0, windows.shape[0], batch_size)])


def o3_loss(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor], names: list[str],
            quant: QuantConfig, windows: torch.Tensor, ref_logits: torch.Tensor | None = None
            ) -> Callable[[Alphas], float]:
    """loss(alphas) = mean KL of the O3 fake-quantized, smoothed model vs the FP model on ``windows``.

    ``names``: the GEMMs to quantize; ``quant.smooth_folds`` says which groups are smoothed.
    """
    from .smooth import apply_scales, folded_tensors, group_inputs, scales_from_inputs, smoothed_act_stats

    ref = logits_of(model, windows) if ref_logits is None else ref_logits
    inputs = group_inputs(model, arch, act_stats, quant.smooth_folds)  # weights before any fold
    kl_of = amax_loss(model, names, quant, windows, ref, layout=arch.layout.value)

    def loss(alphas: Alphas) -> float:
        scales = scales_from_inputs(inputs, alphas, arch.alpha)
        with restored(model, folded_tensors(model, arch)):  # apply_scales changes these alone
            apply_scales(model, arch, scales)
            stats = smoothed_act_stats(model, arch, act_stats, scales)
            return kl_of({n: float(stats[n].max()) for n in names})

    return loss


def amax_loss(model: torch.nn.Module, names: list[str], quant: QuantConfig, windows: torch.Tensor,
              ref_logits: torch.Tensor, *, layout: str = "out_in") -> Callable[[Mapping[str, float]], float]:
    """loss(amax) = mean KL(P_ref || P_q) on ``windows``, the model (as it is when called) fake-quantized
    under ``quant`` for the GEMMs ``names`` with static clip values ``amax``."""
    from .fakequant import fake_quantized

    def loss(amax: Mapping[str, float]) -> float:
        with fake_quantized(model, make_plan(names, quant, dict(amax), layout=layout)):
            return mean_kl(ref_logits, logits_of(model, windows))

    return loss


def search_alphas(model: torch.nn.Module, arch: Arch, act_stats: Mapping[str, torch.Tensor], names: list[str],
                  quant: QuantConfig, windows: torch.Tensor, *, step: float = 0.05, rounds: int = 1,
                  ref_logits: torch.Tensor | None = None) -> SearchResult:
    """Per-kind alphas for the enabled folds, starting from ``quant.alpha_by_kind`` / the arch's alpha."""
    from .smooth import enabled_groups

    kinds = list(dict.fromkeys(g.kind for g in enabled_groups(arch, quant.smooth_folds)))
    base = arch.alpha if quant.alpha is None else float(quant.alpha)
    start = {k: float(quant.alpha_by_kind.get(k, base)) for k in kinds}
    loss = o3_loss(model, arch, act_stats, names, quant, windows, ref_logits)
    return coordinate_descent(kinds, start, loss, alpha_grid(step), rounds)
