"""FP16 for strongly typed TensorRT: ``<level>.fp16.onnx`` from ``<level>.onnx``.

A strongly typed TensorRT network (always, from TensorRT 11; ``STRONGLY_TYPED`` in 10) runs every
tensor in the type the ONNX gives it: there are no FP16/INT8 builder flags to let TensorRT pick
lower precision. So the graph itself must say "FP16 here, INT8 where the Q/DQ say, FP32 where
FP16 is unsafe". This module rewrites the FP32 export into exactly that:

- weights, embeddings and activations become FP16; the graph's float inputs and outputs stay
  FP32 (a Cast at each boundary), so callers feed and read the same types as before;
- Q/DQ scales become FP16, so each DequantizeLinear outputs FP16 straight into its GEMM (ONNX:
  the DQ output type is the scale type), with no Cast between DQ and GEMM to break TensorRT's
  fusion. A scale is kept a *normal* FP16 number (>= 2**-14): a smaller weight scale is raised
  and its INT8 weights re-quantized to the raised scale (round half to even), a smaller
  activation scale is raised (coarser grid, same Q/DQ pair). Scale rounding to FP16 moves a
  scale by <= 2**-11 relative, uniformly for the whole tensor (or channel), and Q and DQ of an
  activation always share one scale, so each pair stays an exact quantize/dequantize pair;
- these ops stay FP32 (Cast in, Cast out), because FP16 is unsafe there:
  ``Pow``/``ReduceMean``/``Sqrt``/``Reciprocal`` (RMSNorm: x**2 overflows FP16 past |x| = 256,
  and LLM residual streams reach thousands), ``LayerNormalization`` (same reduction),
  ``Softmax`` (exp and a sum over up to thousands of keys), and the rotary position math (every
  float op upstream of ``Cos``/``Sin``: position x inv_freq reaches 2048 and more, where the
  FP16 spacing is 2 radians). A consumer of a value that may not fit FP16 (x**2, its mean)
  stays FP32 too (``mean + eps`` between ReduceMean and Sqrt); every other FP32 output (a
  normalized tensor, softmax probabilities, cos/sin, 1/rms) is cast back to FP16;
- float constants that do not fit FP16 are clamped to +-65504 (an attention mask's
  ``finfo(float32).min`` becomes -65504, not -inf, so a fully masked row cannot make NaN).

Pure ONNX (no TensorRT): the result runs in ONNX Runtime, which is how it is tested.
``onnxconverter-common``'s ``convert_float_to_float16`` was not used: it is not installed here,
and it has no notion of Q/DQ pairs (it would convert the Q/DQ scales like any initializer, with
no normal-range guarantee and no tie between a Q and its DQ).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import OnnxInputError

log = logging.getLogger(__name__)

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14  # 6.1e-5: below it FP16 loses relative precision (subnormals)

#: Ops kept in FP32 (see the module docstring for why each).
FP32_OPS = frozenset({"Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax",
                      "LayerNormalization", "RMSNormalization", "Cos", "Sin"})
#: Ops whose FP32 output may overflow FP16 (x**2 and its mean): their consumers stay FP32 too.
_UNSAFE_SOURCES = frozenset({"Pow", "ReduceMean", "ReduceSumSquare"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Clip", "Abs", "Neg", "Identity", "Cast"})
#: Float ancestors of these ops (the position math that feeds them) stay FP32 as well.
_POSITION_SINKS = frozenset({"Cos", "Sin"})
#: Ops whose float input type does not have to match anything (no Cast needed in front).
_TYPE_AGNOSTIC_INPUT = frozenset({"Shape", "Size"})
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass
class Fp16Summary:
    """What :func:`fp16_from_onnx` did, for logs and the plan metadata."""

    fp16_nodes: int = 0
    fp32_nodes: int = 0
    fp32_ops: dict[str, int] = field(default_factory=dict)
    casts_inserted: int = 0
    clamped_constants: list[str] = field(default_factory=list)
    raised_scales: list[str] = field(default_factory=list)
    requantized_weights: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fp16_nodes": self.fp16_nodes, "fp32_nodes": self.fp32_nodes, "fp32_ops": self.fp32_ops,
                "casts_inserted": self.casts_inserted, "clamped_constants": self.clamped_constants,
                "raised_scales": self.raised_scales, "requantized_weights": self.requantized_weights}


# --------------------------------------------------------------------------- numerics (pure)
def to_fp16_clamped(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """FP32 -> FP16 with finite values clamped to +-65504 (never turned into inf). Returns the
    array and whether anything was clamped."""
    v = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(v)
    over = finite & (np.abs(v) > FP16_MAX)
    out = np.where(over, np.sign(v) * FP16_MAX, v).astype(np.float16)
    return out, bool(over.any())


def fp16_scale(scale: np.ndarray) -> tuple[np.ndarray, bool]:
    """A Q/DQ scale in FP16, raised to the smallest normal FP16 number where it is below it.

    Returns ``(scale16, raised)``. Raises :class:`OnnxInputError` for a scale that is not finite
    and positive or does not fit FP16 (amax > 65504 * 127: not a real activation)."""
    s = np.asarray(scale, dtype=np.float32)
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise OnnxInputError("a Q/DQ scale is not finite and > 0; re-export the model (sq2trt export --force)")
    if np.any(s > FP16_MAX):
        raise OnnxInputError(f"a Q/DQ scale ({float(s.max()):g}) exceeds the FP16 range; this tensor cannot "
                             "run in a strongly typed FP16 network")
    raised = bool(np.any(s < FP16_MIN_NORMAL))
    s16 = np.maximum(s, FP16_MIN_NORMAL).astype(np.float16)
    return s16, raised


def requantize_int8(q: np.ndarray, scale: np.ndarray, new_scale: np.ndarray) -> np.ndarray:
    """INT8 values ``q`` (dequantized ``q * scale``) re-quantized to ``new_scale``, TensorRT's way:
    clamp(round_half_even(q * scale / new_scale), -128, 127). Scales broadcast against ``q``."""
    x = q.astype(np.float64) * np.asarray(scale, np.float64)
    return np.clip(np.rint(x / np.asarray(new_scale, np.float64)), -128, 127).astype(np.int8)


_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


def _per_element(scale: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A DequantizeLinear scale or zero point broadcast against its integer input of ``shape``: per
    tensor (0-D), per axis (1-D along ``axis``) or blocked (same rank, ``block_size`` along ``axis``)."""
    s = np.asarray(scale)
    if s.ndim == 0:
        return s
    axis %= len(shape)
    if block_size:
        return np.repeat(s, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    return s.reshape([-1 if d == axis else 1 for d in range(len(shape))])


def requantize_weight(q: np.ndarray, scale: np.ndarray, new_scale: np.ndarray, *, axis: int = 1,
                      block_size: int = 0, zero_point: np.ndarray | None = None) -> np.ndarray:
    """The integer input ``q`` of a weight DequantizeLinear (``(q - zero_point) * scale``; scale per
    tensor, per axis or per block, as the node's ``axis`` / ``block_size`` say) re-quantized to
    ``new_scale`` (``scale``'s shape) with the same zero point, TensorRT's way (round half to even),
    clamped to ``q``'s own type: INT8, UINT8, INT4 or UINT4 (returned in that type)."""
    lo, hi = _INT_RANGES[np.dtype(q.dtype).name]
    zp = 0.0 if zero_point is None else _per_element(zero_point, q.shape, axis, block_size).astype(np.float64)
    x = (q.astype(np.float64) - zp) * _per_element(scale, q.shape, axis, block_size).astype(np.float64)
    new = _per_element(new_scale, q.shape, axis, block_size).astype(np.float64)
    return np.clip(np.rint(x / new) + zp, lo, hi).astype(q.dtype)


# --------------------------------------------------------------------------- the transform
def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    from .export import skeleton

    inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False)  # any size: no tensor data
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes holding a tensor become initializers, so every constant is treated alike."""
    keep = []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(attr.t)
            t.name = node.output[0]
            graph.initializer.append(t)
        elif attr is not None and attr.name in ("value_float", "value_floats"):
            value = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _position_nodes(nodes: list[onnx.NodeProto], producer: dict[str, int], types: dict[str, int]) -> set[int]:
    """Indices of the nodes computing, in floating point, what flows into Cos/Sin."""
    out: set[int] = set()
    stack = [i for i, n in enumerate(nodes) if n.op_type in _POSITION_SINKS]
    while stack:
        i = stack.pop()
        if i in out:
            continue
        out.add(i)
        for name in nodes[i].input:
            j = producer.get(name)
            if j is not None and types.get(name) == F32:
                stack.append(j)
    return out


def fp16_from_onnx(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None
                   ) -> tuple[onnx.ModelProto, Fp16Summary]:
    """Return an FP16 copy of ``model`` (see the module docstring) and what was done. ``model`` may be
    graph-only with its tensors in ``base_dir``: each converted constant is read from there one at a
    time, and the untouched ones stay references (save with ``save_onnx(..., base_dir=base_dir)``)."""
    def to_array(t: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(t, base_dir=str(base_dir or ""))

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for node in g.node:
        if node.op_type in _SUBGRAPH_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                for a in node.attribute):
            raise OnnxInputError(f"node {node.name} ({node.op_type}) has a subgraph; the FP16 transform handles "
                                 "flat graphs only (sq2trt's exports are flat)")
    _constants_to_initializers(g)
    types = _elem_types(m)
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    position = _position_nodes(nodes, producer, types)
    summary = Fp16Summary()

    def is_float(name: str) -> bool:
        return types.get(name) in (F32, F16)

    # -- 1. the compute type of every node, in topological order
    new_type: dict[str, int] = {}  # float tensor -> its type in the new graph
    # float graph inputs keep their type: each consumer casts them to its own (cached, one Cast each)
    compute: list[int | None] = []
    unsafe: set[str] = set()  # FP32 values that may not fit FP16 (x**2, its mean, mean + eps)
    for i, node in enumerate(nodes):
        float_in = [x for x in node.input if x and is_float(x)]
        live = [x for x in float_in if x not in inits]
        if node.op_type in FP32_OPS or i in position or any(x in unsafe for x in live):
            ct = F32
            if node.op_type in _UNSAFE_SOURCES or (node.op_type in _ELEMENTWISE and any(x in unsafe for x in live)):
                unsafe.update(o for o in node.output if o)
        elif node.op_type == "DequantizeLinear" and node.input[0] in producer \
                and nodes[producer[node.input[0]]].op_type == "QuantizeLinear":
            ct = compute[producer[node.input[0]]] or F16  # a DQ follows its Q: one shared scale
        else:
            ct = F16  # FP32 outputs of the ops above are safe in FP16 (normalized, in [-1, 1], ...)
        float_out = [o for o in node.output if o and is_float(o)]
        if not float_in and not float_out:
            compute.append(None)
            continue
        compute.append(ct)
        for o in float_out:
            new_type[o] = ct
        if ct == F32:
            summary.fp32_nodes += 1
            summary.fp32_ops[node.op_type] = summary.fp32_ops.get(node.op_type, 0) + 1
        else:
            summary.fp16_nodes += 1

    # -- 2. constants: an FP16 copy for FP16 consumers (Q/DQ scales specially)
    fp16_const: dict[str, str] = {}  # fp32 initializer name -> its fp16 initializer name
    consumers_type: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for x in node.input:
            if x in inits and compute[i] is not None:
                consumers_type.setdefault(x, set()).add(compute[i])
    new_inits: list[TensorProto] = []

    def const_fp16(name: str) -> str:
        if name in fp16_const:
            return fp16_const[name]
        arr, clamped = to_fp16_clamped(to_array(inits[name]))
        if clamped:
            summary.clamped_constants.append(name)
        new_name = name if consumers_type.get(name) == {F16} and name not in {o.name for o in g.output} \
            else f"{name}__fp16"
        new_inits.append(numpy_helper.from_array(arr, new_name))
        fp16_const[name] = new_name
        return new_name

    replaced_weights: dict[str, TensorProto] = {}
    for i, node in enumerate(nodes):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or compute[i] != F16:
            continue
        sname = node.input[1]
        if sname not in inits:
            raise OnnxInputError(f"{node.name}: Q/DQ scale {sname} is not a constant; TensorRT needs constant scales")
        if sname in fp16_const:
            continue
        scale = to_array(inits[sname]).astype(np.float32)
        s16, raised = fp16_scale(scale)
        weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
        if raised:
            summary.raised_scales.append(sname)
            if weight:
                q = to_array(inits[node.input[0]])
                attrs = {a.name: a.i for a in node.attribute}
                zp = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
                q2 = requantize_weight(q, scale, s16.astype(np.float32), axis=attrs.get("axis", 1),
                                       block_size=attrs.get("block_size", 0),
                                       zero_point=None if zp is None else to_array(inits[zp]))
                replaced_weights[node.input[0]] = numpy_helper.from_array(q2, node.input[0])
                summary.requantized_weights.append(node.input[0])
        new_name = sname if consumers_type.get(sname) == {F16} else f"{sname}__fp16"
        new_inits.append(numpy_helper.from_array(s16, new_name))
        fp16_const[sname] = new_name
    if summary.raised_scales:
        log.warning("FP16: %d Q/DQ scale(s) below FP16's normal range were raised to 2**-14 (%s)",
                    len(summary.raised_scales), ", ".join(summary.raised_scales[:5]))

    # -- 3. rebuild the node list with Casts where a tensor's type differs from the consumer's
    cast_cache: dict[tuple[str, int], str] = {}
    out_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            cname = f"{name}__to_{'fp16' if to == F16 else 'fp32'}"
            out_nodes.append(helper.make_node("Cast", [name], [cname], name=f"{cname}/Cast", to=to))
            cast_cache[key] = cname
            summary.casts_inserted += 1
        return cast_cache[key]

    for i, node in enumerate(nodes):
        ct = compute[i]
        if ct is not None and node.op_type not in _TYPE_AGNOSTIC_INPUT:
            for k, x in enumerate(node.input):
                if not x or not is_float(x):
                    continue
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and k == 1:
                    if ct == F16:
                        node.input[k] = fp16_const[x]
                    continue
                if x in inits:
                    if ct == F16:
                        node.input[k] = const_fp16(x)
                    continue
                have = new_type.get(x, types.get(x))
                if have != ct:
                    node.input[k] = cast(x, ct)
        if ct == F16:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == F32:
                    a.i = F16
                elif a.name == "dtype" and a.i == F32:
                    a.i = F16
                elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == F32:
                    arr, _ = to_fp16_clamped(numpy_helper.to_array(a.t))
                    a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
            if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
                    np.zeros(1, np.float16))))  # its default is an FP32 zero
        out_nodes.append(node)

    # -- 4. float graph outputs stay FP32
    for vi in g.output:
        if new_type.get(vi.name) == F16:
            inner = f"{vi.name}__fp16"
            for node in out_nodes:
                for k, x in enumerate(node.input):
                    if x == vi.name:
                        node.input[k] = inner
                for k, x in enumerate(node.output):
                    if x == vi.name:
                        node.output[k] = inner
            out_nodes.append(helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}/Cast_to_fp32", to=F32))
            summary.casts_inserted += 1
            new_type[inner], new_type[vi.name] = F16, F32

    # -- 5. assemble: initializers still used, value_info with the new types
    used = {x for n in out_nodes for x in n.input}
    final = {t.name: t for t in g.initializer}
    final.update({t.name: t for t in new_inits})  # an FP16 copy named like its source replaces it
    final.update(replaced_weights)
    kept = [t for name, t in final.items() if name in used]
    del g.node[:]
    g.node.extend(out_nodes)
    del g.initializer[:]
    g.initializer.extend(kept)
    init_types = {t.name: t.data_type for t in kept}
    for vi in list(g.value_info) + list(g.input):
        t = init_types.get(vi.name, new_type.get(vi.name) if vi not in g.input else None)
        if t is not None and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = t
    if summary.clamped_constants:
        log.info("FP16: %d constant(s) clamped to +-65504 (%s)", len(summary.clamped_constants),
                 ", ".join(summary.clamped_constants[:5]))
    _set_meta(m, {"sq2trt.precision": "fp16", "sq2trt.fp32_ops": ",".join(sorted(summary.fp32_ops))})
    return m, summary


def _set_meta(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    from .export import set_metadata

    set_metadata(model, meta)


def write_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Fp16Summary:
    """Read ``src`` (FP32 ONNX, Q/DQ or not), write its FP16 form to ``dst`` atomically, and check
    the result with ONNX's full checker (strict type inference: a Cast missing anywhere fails)."""
    from .export import load_onnx, save_onnx

    src = Path(src)
    proto, summary = fp16_from_onnx(load_onnx(src, load_external_data=False), base_dir=src.parent)
    save_onnx(proto, dst, base_dir=src.parent)
    try:  # by path: the checker reads external data itself, whatever the model's size
        check(str(dst))
    except OnnxInputError:
        Path(dst).unlink(missing_ok=True)
        Path(f"{dst}.data").unlink(missing_ok=True)
        raise
    log.info("wrote %s: %d FP16 / %d FP32 nodes, %d Casts", Path(dst).name, summary.fp16_nodes,
             summary.fp32_nodes, summary.casts_inserted)
    return summary


def check(proto: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxInputError(f"the FP16 graph is not valid ONNX ({exc}); please report this with the model") from None
