"""TensorRT INT8 Q/DQ lint: check an ONNX graph against TensorRT's explicit-quantization rules.

TensorRT builds INT8 (and INT4 / FP8) kernels from *explicit* quantization: every quantized GEMM
input is a ``QuantizeLinear -> DequantizeLinear`` pair (or an int8/int4 weight initializer feeding a
``DequantizeLinear``) placed directly on the GEMM input, with build-time constant, positive,
symmetric scales.  Graphs that break these rules either fail to parse, silently run in FP16/FP32, or
lose accuracy.  This module checks the rules *without* TensorRT, using ``onnx`` and
``onnx-graphsurgeon`` only, so that exports can be validated on any machine (CI, laptops).

Usage::

    report = lint_model("model.onnx")
    if not report:
        print(report)          # one line per finding + a summary line

The rules are a table (:data:`RULES`) of small functions, each documenting the TensorRT requirement
it encodes.  Each rule yields :class:`Finding` objects; ``error`` findings make the report fail,
``warning`` findings do not.

Graph conventions understood (the ones sq2trt's exporter writes):

* activation: ``x -> QuantizeLinear(scale, zp) -> DequantizeLinear(scale, zp) -> MatMul (A)``,
  scalar float scale, int8 zero point 0 (or absent);
* INT8 weight: ``int8 W[K, N] -> DequantizeLinear(axis=1) -> MatMul (B)`` (per-tensor or
  per-output-channel scale), or ``W[N, K] -> DequantizeLinear(axis=0) -> Transpose -> MatMul``;
* INT4 weight (W4A16): ``int4 W -> DequantizeLinear(block_size=..., 2-D scale) -> MatMul``;
* ``Gemm`` is handled too (``transB`` decides where the output channels are);
* model ``metadata_props``: ``sq2trt.level``, ``sq2trt.quantized_gemms`` (JSON list of node
  names), ``sq2trt.quantize_bmm`` ("true"/"false").  Without metadata (a foreign model) a GEMM
  counts as meant-to-be-quantized when one of its inputs already has a DequantizeLinear.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER
from onnx import TensorProto

from .errors import OnnxInputError

__all__ = [
    "Finding",
    "LintInputError",
    "LintReport",
    "RULES",
    "Rule",
    "lint_model",
    "rule_ids",
]

logger = logging.getLogger(__name__)


class LintInputError(OnnxInputError):
    """The model given to :func:`lint_model` is missing or cannot be read as an ONNX model.

    A ``ValueError`` (through :class:`sq2trt.errors.OnnxInputError`)."""


# --------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------

_SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``rule`` id, offending ``node`` (or tensor) name, and what to do about it."""

    rule: str
    node: str
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ValueError(f"severity must be one of {_SEVERITIES}, got {self.severity!r}")

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


@dataclass(frozen=True)
class LintReport:
    """Result of :func:`lint_model`.  Truthy when there is no error-severity finding."""

    model: str
    findings: tuple[Finding, ...]
    checked_gemms: int

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def __bool__(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{self.model}: {finding}" for finding in self.findings]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "PASSED" if self else "FAILED"
        lines.append(
            f"{self.model}: TensorRT Q/DQ lint {verdict}: {n_err} error(s), {n_warn} warning(s), "
            f"{self.checked_gemms} GEMM(s) checked"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "passed": bool(self),
            "checked_gemms": self.checked_gemms,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }


# --------------------------------------------------------------------------------------------
# Graph vocabulary
# --------------------------------------------------------------------------------------------

_Q = "QuantizeLinear"
_DQ = "DequantizeLinear"
_QDQ_OPS = frozenset({_Q, _DQ})
_GEMM_OPS = frozenset({"MatMul", "Gemm"})
#: Pure data-movement ops: they commute with per-tensor quantization (TensorRT can propagate Q/DQ
#: across them), so a DQ may sit behind them.
_MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
#: Casts change the float type between the DQ and the GEMM; TensorRT may or may not fuse across them.
_CAST_OPS = frozenset({"Cast", "CastLike"})
_TRANSPARENT_OPS = _MOVEMENT_OPS | _CAST_OPS
#: QOperator-format / ONNX Runtime-only quantized ops; TensorRT imports only the QDQ format.
_QOPERATOR_OPS = frozenset(
    {
        "MatMulInteger",
        "QLinearMatMul",
        "ConvInteger",
        "QLinearConv",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "MatMulBnb4",
    }
)

#: Upward walk limits used to find the DequantizeLinear behind a GEMM input.
_MAX_OPAQUE_HOPS = 2
_MAX_CHAIN = 8

_INT8_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8})
_INT4_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4})
_FP8_E4M3FN = TensorProto.FLOAT8E4M3FN
_FP8_OTHER = frozenset(
    {TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
)
_FP4_TYPES = frozenset({getattr(TensorProto, "FLOAT4E2M1", -1)}) - {-1}

_META_LEVEL = "sq2trt.level"
_META_GEMMS = "sq2trt.quantized_gemms"
_META_BMM = "sq2trt.quantize_bmm"

_FP_LEVELS = frozenset({"fp", "fp16", "fp32", "bf16", "float", "none", "off"})


def _dtype_name(dtype: int | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return TensorProto.DataType.Name(dtype).lower()
    except ValueError:
        return f"dtype#{dtype}"


def _label(node: gs.Node) -> str:
    """A printable name for a node, even an unnamed one."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"<{node.op} -> {out}>"


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return None


def _tensor_dtype(tensor: gs.Tensor) -> int | None:
    """ONNX element type of a tensor (initializer, Constant output, or shape-inferred variable)."""
    dtype = tensor.dtype
    if dtype is None:
        prod = _producer(tensor)
        if prod is not None and prod.op == "Constant":
            value = prod.attrs.get("value")
            if isinstance(value, gs.Constant):
                dtype = value.dtype
            elif "value_float" in prod.attrs or "value_floats" in prod.attrs:
                return TensorProto.FLOAT
            elif "value_int" in prod.attrs or "value_ints" in prod.attrs:
                return TensorProto.INT64
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype) or None
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        return None


def _is_constant(tensor: gs.Tensor, depth: int = 0) -> bool:
    """True for an initializer or the output of a Constant node (through Identity or Cast: a weight kept
    in its stored FP16/BF16 and cast to float32 in the graph is still a build-time constant)."""
    if isinstance(tensor, gs.Constant):
        return True
    prod = _producer(tensor)
    if prod is None or depth > 4:
        return False
    if prod.op == "Constant":
        return True
    if prod.op in ("Identity", "Cast") and prod.inputs:
        return _is_constant(prod.inputs[0], depth + 1)
    return False


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return _loaded(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def _loaded(const: gs.Constant) -> np.ndarray | None:
    try:
        # gs warns when it reads FP8/bf16 values; lint only compares them, so silence it here.
        with G_LOGGER.suppress(G_LOGGER.ERROR):
            return np.asarray(const.values)
    except Exception as exc:  # external data missing, exotic dtype, ...
        logger.debug("cannot read values of constant %r: %s", const.name, exc)
        return None


def _const_values(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """Values of a constant tensor, or None if it is not constant or cannot be read."""
    if isinstance(tensor, gs.Constant):
        return _loaded(tensor)
    prod = _producer(tensor)
    if prod is None or depth > 4:
        return None
    if prod.op == "Constant":
        return _constant_node_value(prod)
    if prod.op == "Identity" and prod.inputs:
        return _const_values(prod.inputs[0], depth + 1)
    return None


def _const_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Static shape of a (constant) tensor without loading its values when possible."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    shape = tensor.shape
    if shape is not None and all(isinstance(d, (int, np.integer)) for d in shape):
        return tuple(int(d) for d in shape)
    values = _const_values(tensor)
    return None if values is None else tuple(values.shape)


def _as_float(values: np.ndarray) -> np.ndarray | None:
    try:
        return np.asarray(values).astype(np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None


def _q_output_dtype(q: gs.Node) -> tuple[int | None, bool]:
    """Element type a QuantizeLinear produces; second item True when it is ONNX's implicit uint8."""
    zp = _optional_input(q, 2)
    if zp is not None:
        return _tensor_dtype(zp), False
    output_dtype = int(q.attrs.get("output_dtype", 0) or 0)
    if output_dtype:
        return output_dtype, False
    return TensorProto.UINT8, True


def _dq_input_dtype(dq: gs.Node) -> int | None:
    source = dq.inputs[0]
    dtype = _tensor_dtype(source)
    if dtype is not None:
        return dtype
    prod = _producer(source)
    if prod is not None and prod.op == _Q:
        return _q_output_dtype(prod)[0]
    zp = _optional_input(dq, 2)
    return _tensor_dtype(zp) if zp is not None else None


def _quant_dtype(node: gs.Node) -> int | None:
    return _q_output_dtype(node)[0] if node.op == _Q else _dq_input_dtype(node)


def _paired_q(node: gs.Node) -> gs.Node | None:
    """The QuantizeLinear directly feeding a DequantizeLinear (the pair is one quantization point)."""
    if node.op != _DQ or not node.inputs:
        return None
    prod = _producer(node.inputs[0])
    return prod if prod is not None and prod.op == _Q else None


def _pair_key(node: gs.Node) -> int:
    q = _paired_q(node)
    return id(q if q is not None else node)


def _is_weight_qdq(node: gs.Node) -> bool:
    """A Q/DQ quantizing a constant (weight): DQ of an initializer, or Q/DQ of a float initializer."""
    if not node.inputs:
        return False
    if _is_constant(node.inputs[0]):
        return True
    q = _paired_q(node)
    return q is not None and bool(q.inputs) and _is_constant(q.inputs[0])


def _is_blocked(node: gs.Node) -> bool:
    if int(node.attrs.get("block_size", 0) or 0) > 0:
        return True
    scale_shape = _const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    return scale_shape is not None and len(scale_shape) >= 2


def _is_constant_derived(tensor: gs.Tensor, depth: int = 0) -> bool:
    """True when a GEMM input is a weight: a constant, possibly through Q/DQ and data movement."""
    if _is_constant(tensor):
        return True
    prod = _producer(tensor)
    if prod is None or depth > _MAX_CHAIN or not prod.inputs:
        return False
    if prod.op in _TRANSPARENT_OPS or prod.op in _QDQ_OPS:
        return _is_constant_derived(prod.inputs[0], depth + 1)
    return False


def _rank_of(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    return None if shape is None else len(shape)


# --------------------------------------------------------------------------------------------
# Tracing between DQ nodes and GEMMs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InputTrace:
    """The DequantizeLinear behind a GEMM input and the ops sitting between them."""

    dq: gs.Node | None
    chain: tuple[gs.Node, ...] = ()  # GEMM side first

    @property
    def opaque(self) -> tuple[gs.Node, ...]:
        return tuple(n for n in self.chain if n.op not in _TRANSPARENT_OPS)

    @property
    def quantized(self) -> bool:
        """A DQ feeds the input directly or through transparent (movement / cast) ops only."""
        return self.dq is not None and not self.opaque

    def describe_chain(self) -> str:
        return " -> ".join(f"{n.op} '{_label(n)}'" for n in reversed(self.chain))


def _trace_to_dq(tensor: gs.Tensor) -> _InputTrace:
    """Walk upwards from a GEMM input (breadth first, bounded) to the nearest DequantizeLinear.

    Data-movement/cast ops are followed through their data input; other ops through all their
    non-constant inputs, at most ``_MAX_OPAQUE_HOPS`` of them.  The walk stops at other GEMMs,
    QuantizeLinear, graph inputs and constants, so that the DQ of a *previous* layer is not found.
    """
    frontier: deque[tuple[gs.Tensor, tuple[gs.Node, ...]]] = deque([(tensor, ())])
    seen: set[int] = set()
    while frontier:
        current, chain = frontier.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        prod = _producer(current)
        if prod is None:
            continue
        if prod.op == _DQ:
            return _InputTrace(prod, chain)
        if prod.op in _GEMM_OPS or prod.op in (_Q, "Constant", "DynamicQuantizeLinear"):
            continue
        new_chain = chain + (prod,)
        opaque = sum(1 for n in new_chain if n.op not in _TRANSPARENT_OPS)
        if len(new_chain) > _MAX_CHAIN or opaque > _MAX_OPAQUE_HOPS or not prod.inputs:
            continue
        if prod.op in _TRANSPARENT_OPS:
            nexts = [prod.inputs[0]]
        else:
            nexts = [t for t in prod.inputs if t.name and not _is_constant(t)]
        frontier.extend((t, new_chain) for t in nexts)
    return _InputTrace(None)


@dataclass(frozen=True)
class _WeightUse:
    """A GEMM consuming a weight DQ output, through ``perms`` (Transposes, DQ side first)."""

    gemm: gs.Node
    input_index: int
    perms: tuple[tuple[int, ...], ...]


def _weight_uses(dq: gs.Node) -> list[_WeightUse]:
    """GEMMs fed by a weight DQ directly or through Transpose/Identity/Cast (axes stay trackable).

    Reshape/Squeeze/Unsqueeze/Flatten change the axis numbering, so paths through them are dropped.
    """
    rank = _rank_of(dq.inputs[0])
    uses: list[_WeightUse] = []
    frontier: deque[tuple[gs.Tensor, tuple[tuple[int, ...], ...]]] = deque([(dq.outputs[0], ())])
    steps = 0
    while frontier and steps < 64:
        steps += 1
        tensor, perms = frontier.popleft()
        for consumer in tensor.outputs:
            if consumer.op in _GEMM_OPS:
                for index, inp in enumerate(consumer.inputs[:2]):
                    if inp is tensor:
                        uses.append(_WeightUse(consumer, index, perms))
            elif consumer.op == "Transpose" and rank is not None and len(perms) < _MAX_CHAIN:
                perm = consumer.attrs.get("perm")
                perm_t = tuple(int(p) for p in perm) if perm else tuple(reversed(range(rank)))
                frontier.append((consumer.outputs[0], perms + (perm_t,)))
            elif consumer.op in ("Identity",) + tuple(_CAST_OPS) and len(perms) < _MAX_CHAIN:
                frontier.append((consumer.outputs[0], perms))
    return uses


def _source_axis(use: _WeightUse, consumed_axis: int) -> int:
    """Map an axis of the tensor the GEMM consumes back to the axis of the DQ output."""
    axis = consumed_axis
    for perm in reversed(use.perms):
        axis = perm[axis]
    return axis


def _gemm_weight_axes(use: _WeightUse, rank: int) -> tuple[int, int] | None:
    """(output-channel axis, reduction axis) of the weight as the GEMM consumes it."""
    gemm, index = use.gemm, use.input_index
    if gemm.op == "MatMul":
        if rank < 2:
            return None
        if index == 1:  # B [.., K, N]
            return rank - 1, rank - 2
        return rank - 2, rank - 1  # A [.., M, K]: a constant A's rows are the output rows
    if rank != 2:
        return None
    if index == 1:
        trans_b = int(gemm.attrs.get("transB", 0) or 0)
        return (0, 1) if trans_b else (1, 0)
    trans_a = int(gemm.attrs.get("transA", 0) or 0)
    return (1, 0) if trans_a else (0, 1)


def _feeds_gemm(tensor: gs.Tensor, depth: int = 0) -> bool:
    """True if the tensor reaches a GEMM input directly or through transparent ops."""
    for consumer in tensor.outputs:
        if consumer.op in _GEMM_OPS:
            return True
        if consumer.op in _TRANSPARENT_OPS and depth < _MAX_CHAIN and consumer.outputs:
            if _feeds_gemm(consumer.outputs[0], depth + 1):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Lint context
# --------------------------------------------------------------------------------------------


def _weight_only(level: str | None) -> bool:
    if not level:
        return False
    match = re.fullmatch(r"w(\d+)a(\d+)", level.strip().lower())
    return match is not None and int(match.group(2)) >= 16


def _is_fp_level(level: str | None) -> bool:
    return level is not None and level.strip().lower() in _FP_LEVELS


@dataclass
class _Context:
    """Everything the rules look at, computed once."""

    graph: gs.Graph
    nodes: list[gs.Node]
    metadata: dict[str, str]
    opset: int
    allow_bmm_qdq: bool | None
    level: str | None = None
    quantized_gemms: frozenset[str] | None = None
    metadata_problems: list[str] = field(default_factory=list)
    _traces: dict[tuple[int, int], _InputTrace] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.level = self.metadata.get(_META_LEVEL)
        raw = self.metadata.get(_META_GEMMS)
        if raw is not None:
            try:
                names = json.loads(raw)
            except json.JSONDecodeError as exc:
                names = None
                self.metadata_problems.append(f"{_META_GEMMS} is not valid JSON ({exc.msg})")
            if names is not None:
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    self.quantized_gemms = frozenset(names)
                else:
                    self.metadata_problems.append(f"{_META_GEMMS} must be a JSON list of strings")
        bmm = self.metadata.get(_META_BMM)
        if bmm is not None and bmm.strip().lower() not in ("true", "false"):
            self.metadata_problems.append(f"{_META_BMM} must be 'true' or 'false', got {bmm!r}")

    @cached_property
    def gemms(self) -> list[gs.Node]:
        return [n for n in self.nodes if n.op in _GEMM_OPS]

    @cached_property
    def qdq_nodes(self) -> list[gs.Node]:
        return [n for n in self.nodes if n.op in _QDQ_OPS and len(n.inputs) >= 2]

    @property
    def bmm_requested(self) -> bool:
        meta = self.metadata.get(_META_BMM, "").strip().lower() == "true"
        return meta or self.allow_bmm_qdq is True

    def trace(self, gemm: gs.Node, index: int) -> _InputTrace:
        key = (id(gemm), index)
        if key not in self._traces:
            self._traces[key] = _trace_to_dq(gemm.inputs[index])
        return self._traces[key]

    def quantized_inputs(self, gemm: gs.Node) -> list[int]:
        return [i for i in range(min(2, len(gemm.inputs))) if self.trace(gemm, i).quantized]

    def weight_index(self, gemm: gs.Node) -> int | None:
        """Which GEMM input is the weight (constant-derived); None for an attention BMM."""
        if len(gemm.inputs) >= 2 and _is_constant_derived(gemm.inputs[1]):
            return 1
        if gemm.inputs and _is_constant_derived(gemm.inputs[0]):
            return 0
        return None

    def required_inputs(self, gemm: gs.Node) -> list[int]:
        """Inputs that must carry Q/DQ for a GEMM listed in ``sq2trt.quantized_gemms``."""
        if _is_fp_level(self.level):
            return []
        weight = self.weight_index(gemm)
        if _weight_only(self.level):
            return [] if weight is None else [weight]
        return [i for i in range(min(2, len(gemm.inputs)))]

    def input_meant_quantized(self, gemm: gs.Node, index: int) -> bool:
        """Is this GEMM input supposed to be quantized (metadata, or inferred for foreign models)?"""
        if self.quantized_gemms is not None:
            if gemm.name in self.quantized_gemms:
                return index in self.required_inputs(gemm)
            return False
        others = [i for i in range(min(2, len(gemm.inputs))) if i != index]
        return any(self.trace(gemm, i).quantized for i in others)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------

RuleCheck = Callable[[_Context], Iterable[Finding]]


@dataclass(frozen=True)
class Rule:
    """A registered lint rule: its id and the check function (whose docstring is the TRT rule)."""

    id: str
    check: RuleCheck

    @property
    def doc(self) -> str:
        return (self.check.__doc__ or "").strip()


#: The rule table, run in order.
RULES: list[Rule] = []


def _rule(rule_id: str) -> Callable[[RuleCheck], RuleCheck]:
    def register(check: RuleCheck) -> RuleCheck:
        RULES.append(Rule(rule_id, check))
        return check

    return register


def _unique_pairs(nodes: Iterable[gs.Node]) -> Iterator[gs.Node]:
    """Q/DQ nodes, with a DQ fed directly by a Q folded into that Q (one quantization point)."""
    seen: set[int] = set()
    for node in nodes:
        paired = _paired_q(node)
        representative = paired if paired is not None else node
        if id(representative) not in seen:
            seen.add(id(representative))
            yield representative


@_rule("scale-not-constant")
def _check_scale_constant(ctx: _Context) -> Iterator[Finding]:
    """TensorRT needs Q/DQ scales (and zero points) known at build time: initializers/Constants."""
    reported: set[int] = set()
    for node in ctx.qdq_nodes:
        for index, what in ((1, "scale"), (2, "zero point")):
            tensor = _optional_input(node, index)
            if tensor is None or _is_constant(tensor):
                continue
            key = _pair_key(node)
            if key in reported:
                continue
            reported.add(key)
            prod = _producer(tensor)
            source = f"{prod.op} '{_label(prod)}'" if prod is not None else "a graph input"
            yield Finding(
                "scale-not-constant",
                _label(node),
                f"{what} '{tensor.name}' of {node.op} is computed at run time (by {source}); "
                "TensorRT only accepts build-time constant scales. Make the scale an initializer: "
                "export with static, calibrated activation scales (level O3).",
            )


@_rule("scale-not-positive")
def _check_scale_positive(ctx: _Context) -> Iterator[Finding]:
    """TensorRT rejects Q/DQ scales that are zero, negative, NaN or infinite."""
    reported: set[int] = set()
    for node in ctx.qdq_nodes:
        values = _const_values(node.inputs[1])
        flat = None if values is None else _as_float(values)
        if flat is None:
            continue
        bad = ~np.isfinite(flat) | ~(flat > 0)
        if not bad.any() or _pair_key(node) in reported:
            continue
        reported.add(_pair_key(node))
        first = int(np.argmax(bad))
        yield Finding(
            "scale-not-positive",
            _label(node),
            f"scale '{node.inputs[1].name}' of {node.op} has {int(bad.sum())} of {flat.size} "
            f"value(s) that are not finite and > 0 (first: {float(flat[first]):g} at flat index {first}); "
            "TensorRT requires strictly positive finite scales. Clamp the calibrated amax to a small "
            "epsilon before computing scale = amax / 127 (dead channels), and check calibration "
            "for NaN/inf activations.",
        )


@_rule("zero-point-nonzero")
def _check_zero_point(ctx: _Context) -> Iterator[Finding]:
    """TensorRT supports symmetric quantization only: every zero point must be 0."""
    reported: set[int] = set()
    for node in ctx.qdq_nodes:
        zp = _optional_input(node, 2)
        if zp is None:
            continue
        values = _const_values(zp)
        flat = None if values is None else _as_float(values)
        if flat is None:
            continue
        if not np.any(flat != 0) or _pair_key(node) in reported:
            continue
        reported.add(_pair_key(node))
        first = flat[np.flatnonzero(flat != 0)[0]]
        yield Finding(
            "zero-point-nonzero",
            _label(node),
            f"zero point '{zp.name}' of {node.op} is not all zeros (e.g. {first:g}); TensorRT "
            "supports symmetric quantization only. Re-export with symmetric int8 quantization "
            "(zero_point = 0).",
        )


def _type_problem(node: gs.Node) -> tuple[str, str] | None:
    """(severity, message) if the quantized element type is not one TensorRT's Q/DQ path takes."""
    dtype = _quant_dtype(node)
    if dtype is None:
        return None
    name = _dtype_name(dtype)
    weight = _is_weight_qdq(node)
    if dtype == TensorProto.INT8:
        return None
    if dtype == TensorProto.UINT8:
        if node.op == _Q and _q_output_dtype(node)[1]:
            return (
                "warning",
                "has no zero point and no output_dtype, so ONNX defines its output "
                "as uint8 (ONNX Runtime clips negatives to 0) while TensorRT quantizes to int8. "
                "Add an int8 zero point of 0 (or output_dtype=INT8 at opset 21).",
            )
        return (
            "error",
            "quantizes to uint8; TensorRT's explicit INT8 path takes int8 only. Quantize to int8 "
            "with zero point 0 (symmetric).",
        )
    if dtype in _INT4_TYPES:
        if not weight:
            return (
                "error",
                f"quantizes an activation to {name}; TensorRT supports INT4 for weights only "
                "(weight-only W4A16). Keep activations in FP16, or use int8 (level O3).",
            )
        if node.op != _DQ or not _is_blocked(node):
            return (
                "error",
                f"{name} weight without block-wise scales; TensorRT takes INT4 weights only as "
                "DequantizeLinear with block_size (2-D scale), e.g. group size 128 (level W4A16).",
            )
        if dtype == TensorProto.UINT4:
            return (
                "warning",
                "uint4 weights: TensorRT has a signed INT4 type only; prefer int4 with zero point 0.",
            )
        return None
    if dtype == _FP8_E4M3FN:
        return (
            "warning",
            "FP8 (E4M3FN) Q/DQ: FP8 needs Hopper+ GPUs and TensorRT's FP8 path; use int8 for the "
            "INT8 path.",
        )
    if dtype in _FP8_OTHER:
        return (
            "error",
            f"{name} is not supported by TensorRT (its FP8 type is E4M3FN only); use int8, or "
            "float8e4m3fn on Hopper+.",
        )
    if dtype in _FP4_TYPES:
        return (
            "warning",
            "FP4 (E2M1) Q/DQ needs Blackwell GPUs and TensorRT's FP4 path; use int8 / int4 weights.",
        )
    return (
        "error",
        f"quantizes to {name}, which TensorRT's explicit quantization does not support; use int8 "
        "(or int4 block-quantized weights).",
    )


@_rule("unsupported-type")
def _check_types(ctx: _Context) -> Iterator[Finding]:
    """TensorRT's explicit quantization takes int8 (per-tensor/per-channel), int4 block-quantized
    weights only, and FP8 E4M3FN / FP4 on recent GPUs; uint8, int16, other FP8 types are rejected."""
    for node in _unique_pairs(ctx.qdq_nodes):
        problem = _type_problem(node)
        if problem is not None:
            severity, message = problem
            yield Finding("unsupported-type", _label(node), f"{node.op} {message}", severity)


@_rule("dynamic-quantize")
def _check_dynamic_quantize(ctx: _Context) -> Iterator[Finding]:
    """TensorRT has no DynamicQuantizeLinear: activation scales must be static (calibrated)."""
    for node in ctx.nodes:
        if node.op == "DynamicQuantizeLinear":
            yield Finding(
                "dynamic-quantize",
                _label(node),
                "DynamicQuantizeLinear (run-time uint8 activation scales) is not supported by "
                "TensorRT. Use level O3: static per-tensor activation scales from calibration, "
                "exported as QuantizeLinear/DequantizeLinear with constant scales.",
            )


@_rule("qoperator-op")
def _check_qoperator_ops(ctx: _Context) -> Iterator[Finding]:
    """TensorRT imports only the QDQ format; QOperator / ONNX Runtime-specific quantized ops
    (MatMulInteger, QLinearMatMul, MatMulNBits, ...) fail to parse."""
    for node in ctx.nodes:
        if node.op in _QOPERATOR_OPS:
            yield Finding(
                "qoperator-op",
                _label(node),
                f"{node.op} is a QOperator / ONNX Runtime-only quantized op that TensorRT cannot "
                "import. Export in QDQ format instead (QuantizeLinear/DequantizeLinear around a "
                "float MatMul; int4 weights as DequantizeLinear with block_size).",
            )


def _weight_axis_findings(dq: gs.Node) -> Iterator[Finding]:
    """wrong-axis findings for one weight DequantizeLinear (per-channel axis or block axis)."""
    scale_shape = _const_shape(dq.inputs[1])
    rank = _rank_of(dq.inputs[0])
    if scale_shape is None or rank is None or rank < 2:
        return
    blocked = _is_blocked(dq)
    if not blocked and (len(scale_shape) != 1 or scale_shape[0] <= 1):
        return  # per-tensor
    axis = int(dq.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    for use in _weight_uses(dq):
        axes = _gemm_weight_axes(use, rank)
        if axes is None:
            continue
        out_axis, red_axis = (_source_axis(use, a) for a in axes)
        gemm = f"{use.gemm.op} '{_label(use.gemm)}'"
        if not blocked and axis != out_axis:
            yield Finding(
                "wrong-axis",
                _label(dq),
                f"per-channel weight DequantizeLinear has axis={axis}, but {gemm} reads the "
                f"weight's output channels from axis {out_axis} of the DQ output, so the scales "
                f"do not follow the output channels. Set axis={out_axis} (axis=1 for a [K, N] "
                "MatMul B input; axis=0 for a [N, K] weight followed by Transpose or Gemm transB=1).",
            )
            return
        if blocked and axis != red_axis:
            yield Finding(
                "wrong-axis",
                _label(dq),
                f"block-quantized weight DequantizeLinear blocks along axis={axis}, but {gemm} "
                f"reduces over axis {red_axis} of the DQ output; TensorRT's weight-only INT4 GEMM "
                f"expects blocks along K. Block along axis={red_axis}.",
                "warning",
            )
            return


@_rule("wrong-axis")
def _check_axes(ctx: _Context) -> Iterator[Finding]:
    """TensorRT: per-channel weight scales must run along the GEMM's output-channel axis (K-blocks
    for block quantization), and activations must be quantized per-tensor."""
    for node in _unique_pairs(ctx.qdq_nodes):
        if not _is_weight_qdq(node):
            scale_shape = _const_shape(node.inputs[1])
            if scale_shape is not None and int(np.prod(scale_shape, dtype=np.int64)) > 1:
                yield Finding(
                    "wrong-axis",
                    _label(node),
                    f"activation {node.op} has a non-scalar scale of shape {list(scale_shape)} "
                    "(per-channel/per-token); TensorRT supports per-tensor activation scales only. "
                    "Use a scalar scale (SmoothQuant migrates the per-channel range into the "
                    "weights; export with level O3).",
                )
    for node in ctx.qdq_nodes:
        if node.op == _DQ and _is_weight_qdq(node):
            yield from _weight_axis_findings(node)


@_rule("block-scale-on-int8")
def _check_block_int8(ctx: _Context) -> Iterator[Finding]:
    """TensorRT supports block-wise (blocked) scales for INT4 weights only, not for INT8."""
    for node in _unique_pairs(ctx.qdq_nodes):
        pair = [node]
        if node.op == _Q:
            pair += [c for c in node.outputs[0].outputs if c.op == _DQ]
        if not any(_is_blocked(m) for m in pair):
            continue
        dtype = _quant_dtype(node)
        if dtype in _INT8_TYPES:
            yield Finding(
                "block-scale-on-int8",
                _label(node),
                f"{node.op} uses block-wise scales (block_size / 2-D scale) on "
                f"{_dtype_name(dtype)} data; TensorRT supports block quantization for INT4 "
                "weights only. Use per-channel (1-D) scales on the output-channel axis for INT8 "
                "weights, or int4 weights for W4A16.",
            )


@_rule("qdq-not-adjacent")
def _check_adjacency(ctx: _Context) -> Iterator[Finding]:
    """TensorRT fuses Q/DQ into a GEMM only if the DQ feeds the GEMM input; ops that do not commute
    with quantization in between break the INT8 fusion (data movement is tolerated, see
    NVIDIA/TensorRT#1604 for activations)."""
    for gemm in ctx.gemms:
        for index in range(min(2, len(gemm.inputs))):
            trace = ctx.trace(gemm, index)
            if trace.dq is None or not trace.chain:
                continue
            side = "A" if index == 0 else "B"
            where = f"{trace.describe_chain()} before input {side} of {gemm.op}"
            if trace.opaque:
                if not ctx.input_meant_quantized(gemm, index):
                    continue
                ops = ", ".join(sorted({n.op for n in trace.opaque}))
                yield Finding(
                    "qdq-not-adjacent",
                    _label(gemm),
                    f"DequantizeLinear '{_label(trace.dq)}' reaches the GEMM only through {where}; "
                    f"{ops} does not commute with quantization, so TensorRT cannot fuse the Q/DQ "
                    "into the GEMM (it runs unquantized). Move the Q/DQ after the last op so that "
                    "DequantizeLinear feeds the GEMM input, or fold the op into the weights/scales "
                    "(SmoothQuant factors belong in the preceding LayerNorm/weights).",
                )
                continue
            casts = [n for n in trace.chain if n.op in _CAST_OPS]
            weight = _is_weight_qdq(trace.dq)
            if casts:
                yield Finding(
                    "qdq-not-adjacent",
                    _label(gemm),
                    f"a Cast sits between DequantizeLinear '{_label(trace.dq)}' and the GEMM "
                    f"({where}); TensorRT may not fuse across it. Emit the DQ in the compute "
                    "dtype instead (fp16 scale, opset 19+) and drop the Cast.",
                    "warning",
                )
            elif not weight:
                yield Finding(
                    "qdq-not-adjacent",
                    _label(gemm),
                    f"activation DequantizeLinear '{_label(trace.dq)}' is separated from the GEMM "
                    f"by data movement ({where}); TensorRT usually propagates Q/DQ across it but "
                    "fusion can fail (NVIDIA/TensorRT#1604). Place the Q/DQ after the data-"
                    "movement ops, directly on the GEMM input.",
                    "warning",
                )


def _static_m(gemm: gs.Node, weight_index: int | None) -> int | None:
    """The GEMM's M dimension when statically known (None when dynamic/unknown)."""
    shape = gemm.inputs[0].shape
    if shape is None:
        return None
    if gemm.op == "Gemm":
        if len(shape) != 2:
            return None
        m = shape[1] if int(gemm.attrs.get("transA", 0) or 0) else shape[0]
        return int(m) if isinstance(m, (int, np.integer)) else None
    if len(shape) == 1:
        return 1
    m = shape[-2]
    if not isinstance(m, (int, np.integer)):
        return None
    if int(m) == 1 and weight_index == 1:
        # A weight GEMM folds the leading (batch) dims into M.
        lead = [d for d in shape[:-2] if isinstance(d, (int, np.integer))]
        if any(int(d) > 1 for d in lead):
            return int(np.prod(lead, dtype=np.int64))
    return int(m)


@_rule("gemv-qdq")
def _check_gemv(ctx: _Context) -> Iterator[Finding]:
    """TensorRT's INT8 GEMM gives no speedup on GEMV (M == 1): quantizing it only costs accuracy."""
    for gemm in ctx.gemms:
        if not ctx.quantized_inputs(gemm):
            continue
        m = _static_m(gemm, ctx.weight_index(gemm))
        if m == 1:
            yield Finding(
                "gemv-qdq",
                _label(gemm),
                f"{gemm.op} is a GEMV (M = 1 statically) with Q/DQ inputs; INT8 gains nothing for "
                "GEMV in TensorRT and costs accuracy. Leave it in FP16 (do not list it in "
                "sq2trt.quantized_gemms), or export with a real token dimension.",
                "warning",
            )


@_rule("bmm-qdq")
def _check_bmm(ctx: _Context) -> Iterator[Finding]:
    """Attention BMMs (MatMul with no constant input) are quantized only on request: INT8 Q·Kᵀ and
    softmax·V lose accuracy and TensorRT's fused attention (MHA) kernels may not apply."""
    if ctx.bmm_requested:
        return
    for gemm in ctx.gemms:
        if ctx.weight_index(gemm) is not None or not ctx.quantized_inputs(gemm):
            continue
        yield Finding(
            "bmm-qdq",
            _label(gemm),
            "attention BMM quantized but not requested; pass --quantize-bmm to mean it "
            f"(metadata {_META_BMM}=true), or remove the Q/DQ from this {gemm.op}'s inputs.",
            "warning",
        )


@_rule("missing-qdq")
def _check_missing(ctx: _Context) -> Iterator[Finding]:
    """TensorRT runs a GEMM in INT8 only if both inputs (weights only for W4A16) carry Q/DQ; a GEMM
    the exporter meant to quantize without them silently runs in FP16/FP32."""
    if ctx.quantized_gemms is None:
        return
    by_name = {g.name: g for g in ctx.gemms if g.name}
    for name in sorted(ctx.quantized_gemms):
        gemm = by_name.get(name)
        if gemm is None:
            continue  # reported by bad-metadata
        for index in ctx.required_inputs(gemm):
            trace = ctx.trace(gemm, index)
            if trace.dq is not None:
                continue  # present (adjacency is qdq-not-adjacent's business)
            role = "weight" if index == ctx.weight_index(gemm) else "activation"
            side = f"{'A' if index == 0 else 'B'} ({role})"
            yield Finding(
                "missing-qdq",
                _label(gemm),
                f"{gemm.op} is listed in {_META_GEMMS} (level {ctx.level or 'unknown'}) but input "
                f"{side} '{gemm.inputs[index].name}' has no DequantizeLinear feeding it, so "
                "TensorRT will not run it in INT8. Re-export so that Q/DQ sits directly on this "
                "input, or drop the GEMM from the quantized list.",
            )


@_rule("output-quantized")
def _check_output_quantized(ctx: _Context) -> Iterator[Finding]:
    """TensorRT guidance: quantize GEMM inputs, not outputs; an output Q/DQ that feeds no GEMM adds
    a reformat and rounding error without enabling any INT8 kernel."""
    for node in ctx.qdq_nodes:
        if node.op != _Q:
            continue
        prod = _producer(node.inputs[0])
        if prod is None or prod.op not in _GEMM_OPS:
            continue
        dqs = [c for c in node.outputs[0].outputs if c.op == _DQ]
        if any(_feeds_gemm(dq.outputs[0]) for dq in dqs if dq.outputs):
            continue  # it is the next GEMM's input quantization
        yield Finding(
            "output-quantized",
            _label(node),
            f"QuantizeLinear quantizes the output of {prod.op} '{_label(prod)}'; TensorRT guidance "
            "is to quantize GEMM inputs only. Remove this Q/DQ (or move it to the input of the "
            "next GEMM).",
            "warning",
        )


@_rule("bad-metadata")
def _check_metadata(ctx: _Context) -> Iterator[Finding]:
    """Not a TensorRT rule: sq2trt's metadata must be readable and name real GEMMs, or the intent
    checks (missing-qdq, bmm-qdq) cannot be trusted."""
    for problem in ctx.metadata_problems:
        yield Finding(
            "bad-metadata",
            "<metadata>",
            f"{problem}; intent checks fall back to inference. Re-export with sq2trt.",
            "warning",
        )
    if ctx.quantized_gemms is None:
        return
    names = {g.name for g in ctx.gemms}
    for name in sorted(ctx.quantized_gemms - names):
        yield Finding(
            "bad-metadata",
            name,
            f"{_META_GEMMS} lists '{name}' but the graph has no MatMul/Gemm of that name (renamed "
            "by an optimizer?), so its quantization cannot be checked. Lint the exporter's output "
            "before graph optimizations, or update the metadata.",
            "warning",
        )


# --------------------------------------------------------------------------------------------
# Loading and entry point
# --------------------------------------------------------------------------------------------


def _qdq_param_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        if node.op_type in _QDQ_OPS:
            names.update(n for n in node.input[1:3] if n)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _qdq_param_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    names |= _qdq_param_names(sub)
    return names


def _load_qdq_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """Load external data for scale/zero-point initializers only (weights stay on disk)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    wanted = _qdq_param_names(model.graph)
    for init in model.graph.initializer:
        if init.name in wanted and uses_external_data(init):
            try:
                load_external_data_for_tensor(init, base_dir)
            except (OSError, ValueError) as exc:
                logger.warning("cannot load external data of %r: %s", init.name, exc)
                continue
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]


def _load(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory>"
    if not isinstance(model, (str, os.PathLike)):
        raise LintInputError(
            f"lint_model takes an onnx.ModelProto or a path, got {type(model).__name__}"
        )
    path = Path(model)
    if not path.is_file():
        raise LintInputError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise LintInputError(
            f"cannot read {path} as an ONNX model ({type(exc).__name__}: {exc}); the file is "
            "corrupt, truncated or not ONNX. Re-export it."
        ) from exc
    if not proto.HasField("graph") or not proto.opset_import:
        raise LintInputError(
            f"{path} parsed but holds no ONNX graph/opset (corrupt or not an ONNX model); re-export it."
        )
    _load_qdq_external_data(proto, str(path.parent))
    return proto, str(path)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy of the model (for the GEMV rule); the original if inference fails."""
    from .export import inline_bytes, skeleton

    try:
        if inline_bytes(model) < 1024**3:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        # protobuf cannot pass a message over 2 GB to shape inference: infer on the graph without
        # tensor data and keep the data (the rules read Q/DQ scales)
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return model
    except Exception as exc:  # unknown ops, inconsistent graphs
        logger.info("shape inference failed (%s); GEMV detection uses existing value_info", exc)
        return model


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 0


def _all_nodes(graph: gs.Graph) -> list[gs.Node]:
    nodes = list(graph.nodes)
    for sub in graph.subgraphs(recursive=True):
        nodes.extend(sub.nodes)
    return nodes


def lint_model(
    model: onnx.ModelProto | str | os.PathLike, *, allow_bmm_qdq: bool | None = None
) -> LintReport:
    """Check an ONNX model against TensorRT's explicit (Q/DQ) quantization rules.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.  For paths, external weight
            data is not loaded (only the external data of Q/DQ scales and zero points).
        allow_bmm_qdq: ``True`` accepts Q/DQ on attention BMMs even without the
            ``sq2trt.quantize_bmm=true`` metadata.  ``None``/``False`` defer to the metadata.

    Returns:
        A :class:`LintReport`; ``bool(report)`` is True when no error was found.

    Raises:
        LintInputError: the path does not exist or is not a readable ONNX model.
    """
    proto, label = _load(model)
    opset = _default_opset(proto)
    if 0 < opset < 13:
        logger.info("opset %d < 13: per-channel Q/DQ needs opset 13+", opset)
    try:
        with G_LOGGER.suppress(G_LOGGER.ERROR):
            graph = gs.import_onnx(_with_shapes(proto))
    except Exception as exc:
        raise LintInputError(f"cannot import {label} into onnx-graphsurgeon: {exc}") from exc
    metadata = {p.key: p.value for p in proto.metadata_props}
    ctx = _Context(
        graph=graph,
        nodes=_all_nodes(graph),
        metadata=metadata,
        opset=opset,
        allow_bmm_qdq=allow_bmm_qdq,
    )
    findings: list[Finding] = []
    for rule in RULES:
        found = list(rule.check(ctx))
        logger.debug("rule %s: %d finding(s)", rule.id, len(found))
        findings.extend(found)
    return LintReport(model=label, findings=tuple(findings), checked_gemms=len(ctx.gemms))


def rule_ids() -> Sequence[str]:
    """The ids of all registered rules, in run order."""
    return [rule.id for rule in RULES]
