"""Configuration: one granularity vocabulary, the quantization levels, and the frozen run config.

Recipes (``recipes/*.yaml``) load into the same :class:`Config` the CLI builds, and dump back
identically (``Config.from_dict(c.to_dict()) == c``).

Granularity, with shapes for a Linear ``y = x @ W.T``, ``x: (B, T, K)``, ``W: (N, K)``:

- ``PerTensor()``      one scale for the whole tensor: scale shape ``()``
- ``PerChannel()``     weights only, one scale per output channel: ``(N,)``
- ``PerToken()``       activations only, one scale per token: ``(B, T, 1)``, computed at run time
- ``PerGroup(size)``   weights only, one scale per ``size`` input channels: ``(N, K // size)``
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError
from .trt import TrtConfig


# --------------------------------------------------------------------------- granularity
@dataclass(frozen=True)
class PerTensor:
    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    def __str__(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerToken:
    def __str__(self) -> str:
        return "per-token"


@dataclass(frozen=True)
class PerGroup:
    size: int = 128

    def __str__(self) -> str:
        return f"per-group({self.size})"


Granularity = PerTensor | PerChannel | PerToken | PerGroup


@dataclass(frozen=True)
class Scheme:
    """What a level does to weights and activations of each quantized GEMM.

    ``weight=None`` / ``act=None`` leaves that side in floating point.
    """

    weight: Granularity | None
    act: Granularity | None
    act_static: bool = False  # scales from calibration (TensorRT-expressible) vs computed at run time
    smooth: bool = True
    weight_bits: int = 8
    description: str = ""
    weight_symmetric: bool = True  # False: asymmetric (UINT4 with a zero point); 4-bit weights only
    alpha_search: bool = False  # SmoothQuant+: alpha searched on the calibration set (sq2trt.search)

    @property
    def quantizes(self) -> bool:
        return self.weight is not None or self.act is not None


# The paper's Table 2 levels that this build implements. W8A8 here is the naive baseline *with
# static per-tensor activations* (O3 without smoothing), so a report shows exactly what
# smoothing buys at the one level TensorRT can run from plain Q/DQ; W8A8-dyn is the paper's own
# naive row (per-tensor dynamic activations). Dynamic levels compute activation scales at run
# time (ONNX Runtime only); W4 levels keep activations in floating point (SmoothQuant+).
LEVELS: dict[str, Scheme] = {
    "fp": Scheme(None, None, smooth=False, description="floating point reference, no quantization"),
    "W8A8": Scheme(PerTensor(), PerTensor(), act_static=True, smooth=False,
                   description="naive INT8: per-tensor weights, static per-tensor activations, no smoothing"),
    "O3": Scheme(PerTensor(), PerTensor(), act_static=True, smooth=True,
                 description="SmoothQuant-O3: per-tensor weights, static per-tensor activations"),
    "W8A8-dyn": Scheme(PerTensor(), PerTensor(), smooth=False,
                       description="naive INT8 (paper Table 2): per-tensor weights, dynamic per-tensor "
                                   "activations, no smoothing"),
    "ZeroQuant": Scheme(PerGroup(128), PerToken(), smooth=False,
                        description="ZeroQuant: group-wise INT8 weights (g=128), dynamic per-token activations"),
    "O1": Scheme(PerTensor(), PerToken(), smooth=True,
                 description="SmoothQuant-O1: per-tensor weights, dynamic per-token activations"),
    "O2": Scheme(PerTensor(), PerTensor(), smooth=True,
                 description="SmoothQuant-O2: per-tensor weights, dynamic per-tensor activations"),
    "W4-RTN": Scheme(PerGroup(128), None, smooth=False, weight_bits=4,
                     description="round-to-nearest INT4 weights (g=128, symmetric), float activations"),
    "W4A16": Scheme(PerGroup(128), None, smooth=True, weight_bits=4, alpha_search=True,
                    description="SmoothQuant+: smoothing with searched alpha, INT4 weights (g=128, "
                                "symmetric), float activations"),
    "W4A16-asym": Scheme(PerGroup(128), None, smooth=True, weight_bits=4, weight_symmetric=False,
                         alpha_search=True,
                         description="SmoothQuant+: smoothing with searched alpha, UINT4 weights (g=128, "
                                     "asymmetric), float activations"),
}

# Which backend runs which level ("yes" / reason it cannot). Generated into the README.
BACKENDS = ("ort", "trt")


def level_support(level: str, backend: str) -> str | None:
    """None when ``backend`` can run ``level``; otherwise the reason it cannot."""
    scheme = get_level(level)
    if backend == "trt" and scheme.act is not None and not scheme.act_static:
        return (f"level {level} quantizes activations with run-time (dynamic) scales; TensorRT has no "
                "INT8 dynamic quantization (DynamicQuantizeLinear is unsupported). Use level O3 "
                "(static per-tensor activations) for TensorRT, or --backend ort for this level.")
    if backend == "trt" and scheme.weight is not None and not scheme.weight_symmetric:
        return (f"level {level} stores asymmetric UINT4 weights with zero points; TensorRT requires zero "
                "point 0. Use the symmetric level W4A16 for TensorRT, or --backend ort for this level.")
    return None


def get_level(level: str) -> Scheme:
    try:
        return LEVELS[level]
    except KeyError:
        raise ConfigError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}") from None


# --------------------------------------------------------------------------- run configuration
WEIGHT_GRANULARITIES = ("per-tensor", "per-channel")
# mse: clip minimising E[(x - fakequant_c(x))^2]; auto: max, percentile or mse per GEMM kind, whichever gives the
# lowest whole-model KL on calibration windows (sq2trt.clipping.choose_clips)
ACT_CLIPS = ("max", "percentile", "mse", "auto")


@dataclass(frozen=True)
class QuantConfig:
    level: str = "O3"
    alpha: float | None = None  # None: the architecture's default from archs.ARCHS
    weight_granularity: str = "per-tensor"
    act_clip: str = "max"
    act_percentile: float = 99.99
    quantize_bmm: bool = False
    fp_fallback: tuple[str, ...] = ()  # module-name suffixes kept in floating point, e.g. "mlp.down_proj"
    smooth_folds: tuple[str, ...] = ("norm",)  # exact folds to apply: archs.SMOOTH_FOLDS ("norm", "down", "o")
    alpha_by_kind: dict[str, float] = field(default_factory=dict)  # {group kind: alpha}, e.g. {"down": 0.6}
    max_ppl_increase: float = 0.0  # > 0: keep the fewest GEMMs in FP meeting this (0.01 = 1%) (sq2trt.fallback)
    search_alpha_by_kind: bool = False  # search alpha per group kind on calibration KL, from alpha_by_kind / alpha

    def __post_init__(self) -> None:
        get_level(self.level)
        if self.alpha is not None and not (0.0 <= float(self.alpha) <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got "
                              f"{self.weight_granularity!r}")
        if self.act_clip not in ACT_CLIPS:
            raise ConfigError(f"act_clip must be one of {ACT_CLIPS}, got {self.act_clip!r}")
        from .archs import GROUP_KINDS, SMOOTH_FOLDS

        bad = [f for f in self.smooth_folds if f not in SMOOTH_FOLDS]
        if bad or not self.smooth_folds:
            raise ConfigError(f"smooth_folds must be a non-empty subset of {SMOOTH_FOLDS}, got {list(self.smooth_folds)}")
        for kind, a in dict(self.alpha_by_kind).items():
            if kind not in GROUP_KINDS or not (0.0 <= float(a) <= 1.0):
                raise ConfigError(f"alpha_by_kind: {kind}={a} invalid; kinds are {list(GROUP_KINDS)}, alphas in [0, 1]")
        if not (0.0 <= float(self.max_ppl_increase) < 10.0):
            raise ConfigError(f"max_ppl_increase is a fraction (0.01 = 1%), got {self.max_ppl_increase}")
        if not (50.0 < float(self.act_percentile) <= 100.0):
            raise ConfigError(f"act_percentile must be in (50, 100], got {self.act_percentile}")


@dataclass(frozen=True)
class CalibConfig:
    data: str = ""  # text / JSONL file, or hf:<dataset>[:<config>][:<split>] when online
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 2:
            raise ConfigError(f"calibration needs num_samples >= 1 and seq_len >= 2, got "
                              f"{self.num_samples} x {self.seq_len}")


@dataclass(frozen=True)
class EvalConfig:
    data: str = ""  # held-out text for perplexity (wikitext-2 raw test)
    window: int = 1024
    max_tokens: int = 16384  # 0: the whole text
    compare_samples: int = 4  # Polygraphy comparison: sequences of real tokens
    compare_seq_len: int = 128

    def __post_init__(self) -> None:
        if self.window < 2 or self.max_tokens < 0 or self.compare_samples < 1 or self.compare_seq_len < 2:
            raise ConfigError("eval window/compare_seq_len must be >= 2, compare_samples >= 1, "
                              "max_tokens >= 0")


DTYPES = ("auto", "float32", "float16", "bfloat16")  # Config.dtype (sq2trt.models.load_model says what auto is)


@dataclass(frozen=True)
class Config:
    model: str = ""
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trt: TrtConfig = field(default_factory=TrtConfig)  # TensorRT build options (sq2trt.trt)
    opset: int = 21
    dtype: str = "auto"  # weights in memory: auto (the checkpoint's), float32, float16, bfloat16 (sq2trt.models)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    # -- round trip ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quant"]["fp_fallback"] = list(self.quant.fp_fallback)
        d["quant"]["smooth_folds"] = list(self.quant.smooth_folds)
        d["quant"]["alpha_by_kind"] = dict(sorted(self.quant.alpha_by_kind.items()))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return _build(cls, d, "config")

    def replace(self, **sections: Mapping[str, Any] | Any) -> "Config":
        """Return a copy with some fields changed; nested sections are merged, e.g.
        ``c.replace(quant={"level": "W8A8"})``."""
        d = self.to_dict()
        for k, v in sections.items():
            if isinstance(v, Mapping) and isinstance(d.get(k), dict):
                d[k].update(v)
            else:
                d[k] = v
        return Config.from_dict(d)


def _build(cls: type, d: Mapping[str, Any], where: str):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        sub = _SECTIONS.get(name) if cls is Config else None
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}")
        elif name in ("fp_fallback", "smooth_folds"):
            kwargs[name] = tuple(value or ())
        elif name == "alpha_by_kind":
            kwargs[name] = {str(k): float(v) for k, v in sorted(dict(value or {}).items())}
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_SECTIONS = {"quant": QuantConfig, "calib": CalibConfig, "eval": EvalConfig, "trt": TrtConfig}


# --------------------------------------------------------------------------- recipes
def read_yaml_mapping(path: str | os.PathLike, what: str, hint: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, with typed errors naming ``what`` it is."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}; {hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping")
    return data


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML into a nested dict of Config fields (``family`` and ``notes`` are
    descriptive keys and are dropped)."""
    data = read_yaml_mapping(path, "recipe", "see recipes/ for the shipped ones")
    data = {k: v for k, v in data.items() if k not in ("family", "notes")}
    Config.from_dict(data)  # validate now, with the recipe's name in the error
    return data


def dump_recipe(config: Config, path: str | os.PathLike, *, family: str = "", notes: str = "") -> None:
    import yaml

    from .artifacts import atomic_write_text

    d: dict[str, Any] = {}
    if family:
        d["family"] = family
    if notes:
        d["notes"] = notes
    d.update(config.to_dict())
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into ``base`` (``None`` values in ``over`` are ignored)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- hashing
def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts; artifacts record it and are reused only on a match."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
