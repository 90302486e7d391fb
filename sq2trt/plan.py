"""The quantization plan: for each quantized GEMM, how its inputs are quantized.

One plan drives both the PyTorch fake-quantized model (sq2trt.fakequant) and the Q/DQ ONNX
export (sq2trt.export), so the two compute the same numbers. Every field is derived from the
level's :class:`~sq2trt.config.Scheme` granularities (no per-level branches):

- weight ``PerTensor``/``PerChannel``/``PerGroup(g)`` -> ``weight_per_channel`` / ``weight_group``,
  with ``weight_bits`` (8 or 4) and ``weight_symmetric``;
- activation static ``PerTensor`` -> ``act_amax`` (calibrated clip value); dynamic ``PerTensor`` /
  ``PerToken`` -> ``act_dynamic`` ("per-tensor" / "per-token", scales computed at run time);
  ``None`` -> the input stays floating point.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import PerChannel, PerGroup, PerTensor, PerToken, QuantConfig, get_level
from .errors import ConfigError

ACT_DYNAMIC = ("per-tensor", "per-token")


@dataclass(frozen=True)
class GemmQuant:
    act_amax: float | None  # static per-tensor clip value of the input; None: no static scale
    weight_per_channel: bool  # per output channel vs per-tensor weight (ignored when weight_group > 0)
    weight_group: int = 0  # > 0: one scale per block of this many input channels (PerGroup)
    weight_bits: int = 8  # 8 (INT8) or 4 (INT4 / UINT4)
    weight_symmetric: bool = True  # False: asymmetric with a zero point (UINT4)
    act_dynamic: str | None = None  # "per-tensor" | "per-token": run-time scale; None: static or float
    layout: str = "out_in"  # weight layout of the PyTorch module (archs.Layout value)

    def __post_init__(self) -> None:
        if self.act_dynamic is not None and self.act_dynamic not in ACT_DYNAMIC:
            raise ConfigError(f"act_dynamic must be one of {ACT_DYNAMIC}, got {self.act_dynamic!r}")
        if self.act_dynamic is not None and self.act_amax is not None:
            raise ConfigError("an activation is either static (act_amax) or dynamic (act_dynamic), not both")
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"weight_bits must be 4 or 8, got {self.weight_bits}")

    @property
    def weight_granularity(self) -> str:
        if self.weight_group:
            return f"per-group({self.weight_group})"
        return "per-channel" if self.weight_per_channel else "per-tensor"


def make_plan(names: list[str], quant: QuantConfig, act_amax: dict[str, float], *,
              layout: str = "out_in") -> dict[str, GemmQuant]:
    """Plan for the GEMMs ``names`` (already minus the fallback list) at ``quant.level``.

    ``quant.weight_granularity == "per-channel"`` upgrades per-tensor weights to per-channel; group-wise
    weights stay group-wise.
    """
    scheme = get_level(quant.level)
    if not scheme.quantizes:
        return {}
    w = scheme.weight
    if w is None:
        raise ConfigError(f"level {quant.level}: activation-only quantization is not supported")
    group = w.size if isinstance(w, PerGroup) else 0
    per_channel = not group and (quant.weight_granularity == "per-channel" or isinstance(w, PerChannel))
    a = scheme.act
    if a is not None and not isinstance(a, (PerTensor, PerToken)):
        raise ConfigError(f"level {quant.level}: activations cannot be {a}")
    if isinstance(a, PerToken) and scheme.act_static:
        raise ConfigError(f"level {quant.level}: per-token activation scales are computed at run time only")
    dynamic = None if a is None or scheme.act_static else str(a)
    plan = {}
    for n in names:
        amax = None
        if a is not None and scheme.act_static:
            if n not in act_amax:
                raise ConfigError(f"no calibrated activation scale for {n}; rerun calibration")
            amax = float(act_amax[n])
        plan[n] = GemmQuant(amax, per_channel, group, scheme.weight_bits, scheme.weight_symmetric, dynamic,
                            getattr(layout, "value", layout))
    return plan
