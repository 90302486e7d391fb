"""The quantization plan: for each quantized Linear, how its GEMM inputs are quantized.

One plan drives both the PyTorch fake-quantized model (sq2trt.fakequant) and the Q/DQ ONNX
export (sq2trt.export), so the two compute the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import PerChannel, QuantConfig, get_level
from .errors import ConfigError


@dataclass(frozen=True)
class GemmQuant:
    act_amax: float | None  # static per-tensor clip value of the input; None: input stays float
    weight_per_channel: bool  # per output channel vs per-tensor INT8 weight


def make_plan(names: list[str], quant: QuantConfig, act_amax: dict[str, float]) -> dict[str, GemmQuant]:
    """Plan for the Linears ``names`` (already minus the fallback list) at ``quant.level``."""
    scheme = get_level(quant.level)
    if not scheme.quantizes:
        return {}
    per_channel = quant.weight_granularity == "per-channel" or isinstance(scheme.weight, PerChannel)
    plan = {}
    for n in names:
        amax = None
        if scheme.act is not None:
            if n not in act_amax:
                raise ConfigError(f"no calibrated activation scale for {n}; rerun calibration")
            amax = float(act_amax[n])
        plan[n] = GemmQuant(amax, per_channel)
    return plan
