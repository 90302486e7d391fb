"""ONNX export: the floating-point reference graph, then Q/DQ inserted into that same graph.

The reference comes from ``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence axes.
Every GEMM node carries its module path in ``namespace`` metadata, which is how a plan entry
(``model.layers.3.mlp.down_proj``) finds its node. Q/DQ follow TensorRT's rules (docs/tensorrt.md):
constant scales > 0, zero point 0, activations per-tensor on GEMM inputs only, weights as INT8
initializers -> DequantizeLinear -> MatMul/Gemm.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .errors import OnnxInputError, OutputDirError
from .numerics import int8_scale, quantize
from .plan import GemmQuant

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input_ids", "logits"
QDQ_FORMAT = 3  # bump when insert_qdq's graph changes, so stale Q/DQ artifacts are rebuilt
WRAPPER = "m"  # attribute name of the HF model inside the export wrapper
MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 13; onnx 1.23 writes 14 unless told
TWO_GB = 2 * 1024**3


class LogitsOnly(torch.nn.Module):
    """Export wrapper: input_ids -> logits, no KV cache. Must be in eval mode itself (dropout)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def export_reference(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = 21,
                     vocab: int | None = None) -> None:
    """Export ``model`` to ``path`` (input_ids [batch, seq] -> logits [batch, seq, vocab])."""
    _check_exportable(model)
    wrapper = LogitsOnly(model).eval()
    example, dims = _trace_inputs(model, vocab)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), None, input_names=[INPUT], output_names=[OUTPUT],
                                    opset_version=opset, dynamo=True, dynamic_shapes={"input_ids": dims},
                                    verbose=False)
    save_onnx(program.model, path)


def export_base(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = 21) -> str:
    """The model's base graph at ``path``, its weights as stored: :func:`trace_reference` (no copy of the
    weights), or, for a family the weightless trace fails on, :func:`export_reference` of an FP32 CPU
    copy (logged). Returns which: ``"weightless"`` or ``"fp32-copy"``."""
    from .onload import fp32_cpu, storage_dtype

    try:
        trace_reference(model, path, opset=opset)
        return "weightless"
    except WeightlessTraceError as exc:
        log.warning("the weightless trace failed (%s); tracing an FP32 copy of the model instead", exc)
    path = Path(path)
    if storage_dtype(model) == torch.float32:
        with fp32_cpu(model) as m:
            export_reference(m, path, opset=opset)
        return "fp32-copy"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=path.parent))
    try:  # the trace of an FP32 copy, saved with the weights as stored (FP16/BF16)
        with fp32_cpu(model) as m:
            export_reference(m, tmp / path.name, opset=opset)
        write_reference(load_onnx(tmp / path.name, load_external_data=False), model, path, base_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "fp32-copy"


class WeightlessTraceError(RuntimeError):
    """The weightless trace left a weight the reference cannot be written from (a family whose graph
    computes on a weight other than transposing it for a GEMM): the caller traces with the weights."""


def trace_reference(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = 21,
                    vocab: int | None = None) -> None:
    """:func:`export_reference` without the weights in memory: the dynamo exporter traces ``model``
    with its parameters on the meta device (``onload.weightless``), the exporter's own optimizer runs
    on the graph with every weight left unknown, and :func:`write_reference` then streams the weights
    from the model as stored, one tensor at a time. The one thing the optimizer folds from a weight's
    values, a weight's transpose for its GEMM (onnxscript folds a ``Transpose`` of a constant that has no
    other consumer), is folded here by the same rule, so the graph is the one a trace with the weights
    gives. Raises :class:`WeightlessTraceError` when a weight is left that no model tensor can fill."""
    _check_exportable(model)
    try:
        proto, unknown = _weightless_graph(model, *_trace_inputs(model, vocab), opset)
    except Exception as exc:  # noqa: BLE001 - any failure of the trace itself: the caller traces with weights
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise WeightlessTraceError(f"{type(exc).__name__}: {first}") from exc
    try:  # refused before anything is written when a weight has no tensor in the model
        write_reference(proto, model, path, needed=unknown)
    except MissingWeightsError as exc:
        raise WeightlessTraceError(str(exc)) from exc


def _trace_inputs(model: torch.nn.Module, vocab: int | None) -> tuple[torch.Tensor, dict[int, Any]]:
    """The exporter's example input_ids (2 x 16) and dynamic batch / sequence axes."""
    vocab = vocab or int(model.config.vocab_size)
    example = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return example, {0: torch.export.Dim("batch", min=1, max=1024),
                     1: torch.export.Dim("sequence", min=2, max=65536)}


def _weightless_graph(model, example, dims, opset) -> tuple[onnx.ModelProto, set[str]]:
    """The optimized graph of ``model`` traced weightless, and the names of its shape-only weights."""
    import warnings

    import onnx_ir as ir

    from .onload import weightless

    with weightless(model) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(LogitsOnly(m).eval(), (example,), None, input_names=[INPUT],
                                    output_names=[OUTPUT], opset_version=opset, dynamo=True,
                                    dynamic_shapes={"input_ids": dims}, verbose=False, optimize=False)
        unknown: dict[str, tuple[ir.DataType, tuple[int, ...]]] = {}
        for name, v in program.model.graph.initializers.items():
            raw = getattr(v.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
                unknown[name] = (v.const_value.dtype, tuple(raw.shape))
                v.const_value = None  # the optimizer leaves a value it does not know alone
        program.optimize()  # what torch.onnx.export(optimize=True) runs
        irm = program.model
    # Transpose(weight) -> a transposed weight of its own, when the Transpose is the weight's one consumer
    for node in list(irm.graph):
        x = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" and node.inputs else None
        if x is None or x.name not in unknown or x.const_value is not None or len(x.uses()) != 1:
            continue
        perm = node.attributes.get("perm")
        perm = list(perm.as_ints()) if perm is not None else list(range(len(x.shape)))[::-1]
        dtype, shape = unknown.pop(x.name)
        folded = ir.Value(name=f"{x.name}.T", type=ir.TensorType(dtype), shape=ir.Shape([shape[p] for p in perm]))
        irm.graph.initializers.add(folded)  # a data-less initializer, named after its weight
        unknown[folded.name] = (dtype, tuple(folded.shape))
        node.outputs[0].replace_all_uses_with(folded)
        irm.graph.remove(node, safe=True)
        irm.graph.initializers.pop(x.name)
    for name in list(unknown):
        if name not in irm.graph.initializers:
            unknown.pop(name)  # optimized away
    lost = [n for n, v in irm.graph.initializers.items() if v.const_value is None and n not in unknown]
    if lost:
        raise RuntimeError(f"the optimizer renamed weights it does not know ({lost[:3]})")
    # to a graph-only proto: each unknown weight a shape-only tensor, filled by write_reference
    for name, (dtype, shape) in unknown.items():
        irm.graph.initializers[name].const_value = ir.tensor(np.zeros(0, dtype=dtype.numpy()))
    proto = ir.serde.serialize_model(irm)
    for init in proto.graph.initializer:
        if init.name in unknown:
            del init.dims[:]
            init.dims.extend(unknown[init.name][1])
    return proto, set(unknown)


def _check_exportable(model: torch.nn.Module) -> None:
    from .archs import ARCHS, arch_name
    from .errors import UnsupportedArchitectureError

    row = ARCHS.get(arch_name(model))
    if row is not None and row.export_blocker:
        raise UnsupportedArchitectureError(
            f"{arch_name(model)} cannot be exported to ONNX: {row.export_blocker}. Calibration, smoothing "
            "and PyTorch fake quantization work for it (sq2trt.fakequant.fake_quantized); evaluate the "
            "levels in PyTorch (benchmarks/levels_smollm2.py shows how), not through an engine.")


def check_against_torch(model: torch.nn.Module, onnx_path: str | os.PathLike, shape=(3, 21)) -> float:
    """Relative max error of the ONNX logits vs PyTorch at a shape other than the traced one."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, int(model.config.vocab_size), shape, generator=g)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {INPUT: ids.numpy()})[0]
    with torch.no_grad():
        ref = LogitsOnly(model).eval()(ids).numpy()
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


# --------------------------------------------------------------------------- load / save
def load_onnx(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise OnnxInputError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, onnx raises others
        raise OnnxInputError(f"{p} is not a readable ONNX model ({type(exc).__name__}: {exc}); it may be "
                             "truncated or corrupt: rerun the export step") from None
    if not model.graph.node:
        raise OnnxInputError(f"{p} holds no graph (empty or truncated file); rerun the export step")
    return model


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inside ``model`` (not counting external data), without
    ``ByteSize()``, which protobuf refuses past 2 GB."""
    return sum(inline_bytes_of(t) for t in model.graph.initializer)


def _copy_field(dst, field, value) -> None:
    if field.is_repeated:
        getattr(dst, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


def inline_bytes_of(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    return len(t.raw_data) + 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
                                  + len(t.uint64_data)) + sum(len(x) for x in t.string_data)


def skeleton(model: onnx.ModelProto, keep_bytes: int = 64 * 1024) -> onnx.ModelProto:
    """``model`` without the data of its large tensors (those keep name, type and shape; tensors up to
    ``keep_bytes``, such as shapes and axes, keep their values): enough for shape and type inference
    of a graph of any size, and small enough to serialize."""
    keep = lambda t: not t.external_data and inline_bytes_of(t) <= keep_bytes  # noqa: E731
    return _with_initializers(model, lambda t: t if keep(t) else _shape_only(t))


def _shape_only(t: onnx.TensorProto) -> onnx.TensorProto:
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)


def _with_initializers(model: onnx.ModelProto, tensor) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers are ``tensor(t)`` of its own; copied field by field (a
    tensor over 2 GB cannot even be copied as part of its message)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    for t in model.graph.initializer:
        out.graph.initializer.append(tensor(t))
    return out


def save_onnx(model: "onnx.ModelProto | Any", path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
              external: bool | None = None) -> None:
    """Write ``model`` (an ``onnx.ModelProto`` or an ``onnx_ir.Model``) to ``path`` atomically.

    Tensor data goes to ``<name>.data`` beside it when it totals over ~2 GB (or ``external=True``):
    serialization goes through onnx_ir, which streams each tensor to the data file, so no whole-model
    protobuf message is ever built (protobuf cannot serialize one over 2 GB). Tensors that ``model``
    references as external data are read from ``base_dir`` (the directory of the file they came
    from). The stamp of ``path`` is removed first; the new ``.data`` and ``.onnx`` are renamed into
    place only once both are complete, the ``.data`` first.
    """
    import onnx_ir as ir

    from .artifacts import crash_point, meta_path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    except OSError as exc:
        raise OutputDirError(f"cannot write to {path.parent}: {exc}; choose a writable --out") from None
    data_name = path.name + ".data"
    try:
        irm = ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model
        if base_dir is not None:
            ir.external_data.set_base_dir(irm.graph, base_dir)
        irm.ir_version = min(irm.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
        if external is None:
            external = sum(t.nbytes for t in _ir_tensors(irm)) > TWO_GB - 64 * 1024**2
        if not external:  # everything inside the .onnx file: read any external tensor in first
            irm = ir.external_data.load_to_model(irm)
        ir.save(irm, tmpdir / path.name, external_data=data_name if external else None, size_threshold_bytes=1024)
        meta_path(path).unlink(missing_ok=True)  # no stamp may vouch for a file being replaced
        stale = path.parent / data_name
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, stale)
            crash_point("save_onnx:data-replaced")
        elif stale.exists():
            stale.unlink()
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _ir_tensors(model) -> list:
    return [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]


# --------------------------------------------------------------------------- GEMM nodes by module
def _module_paths(node: onnx.NodeProto) -> list[str]:
    """Module qualnames (outermost first, wrapper prefix removed) from the exporter's metadata."""
    md = {p.key: p.value for p in node.metadata_props}
    ns = md.get("namespace", "")
    out = []
    for part in ns.split("/"):
        name = part.split(":", 1)[0].strip()
        if name == WRAPPER or not name.startswith(WRAPPER + "."):
            continue
        out.append(name[len(WRAPPER) + 1:])
    return out


def gemm_nodes(model: onnx.ModelProto, modules: list[str], *, strict: bool = True) -> dict[str, str]:
    """``{module name: node name}`` for the MatMul/Gemm of each Linear in ``modules``."""
    wanted = set(modules)
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        paths = [p for p in _module_paths(node) if p in wanted]
        if paths:
            mod = paths[-1]
            if mod in found:
                raise OnnxInputError(f"two GEMM nodes ({found[mod]}, {node.name}) belong to {mod}")
            found[mod] = node.name
    missing = [m for m in modules if m not in found]
    if missing and strict:
        raise OnnxInputError(f"no GEMM node found for {missing[:3]} (of {len(missing)}) in the exported "
                             "graph; was it exported by sq2trt's reference export?")
    return found


def _is_gemm_module(m: torch.nn.Module) -> bool:
    """nn.Linear (weight (out, in)) or transformers' Conv1D (GPT-2; weight (in, out))."""
    if isinstance(m, torch.nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)


def _retarget(out: onnx.ModelProto, model: torch.nn.Module) -> dict[str, Any]:
    """Point ``out`` (a copy of a base export of this model's architecture; graph-only or not) at
    ``model``'s tensors: ``{initializer name: (stored dtype, zero-argument function returning its new
    value)}``, a CPU tensor in the model's stored dtype laid out as the graph reads it, evaluated one
    at a time by the caller (nothing is copied here).

    Parameters stored under their own name are replaced directly; the GEMM weights, which the
    exporter constant-folds into transposed initializers, are found through the node metadata.
    """
    params = {f"{WRAPPER}.{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    linears = {n: m for n, m in model.named_modules() if _is_gemm_module(m)}
    by_node = {v: k for k, v in gemm_nodes(out, list(linears), strict=False).items()}
    sources: dict[str, tuple[tuple[int, ...], torch.dtype, Any]] = {}  # name -> (shape, dtype, value function)

    def gemm_weight(mod: torch.nn.Module, trans_b: bool):
        out_in = tuple(mod.weight.shape) if isinstance(mod, torch.nn.Linear) else tuple(mod.weight.shape)[::-1]

        def value() -> torch.Tensor:
            w = mod.weight.detach().cpu()
            if not isinstance(mod, torch.nn.Linear):  # GPT-2 Conv1D: weight stored (in, out)
                w = w.t()
            return (w if trans_b else w.t()).contiguous()
        return (out_in if trans_b else out_in[::-1]), mod.weight.dtype, value

    def param(t: torch.Tensor):
        return tuple(t.shape), t.dtype, lambda: t.detach().cpu()

    for node in out.graph.node:
        mod = by_node.get(node.name)
        if mod is None:
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        sources[node.input[1]] = gemm_weight(linears[mod], trans_b)
    # The exporter deduplicates equal constants (a random model's norms are all ones), so one
    # initializer named after the first parameter may feed every norm. Resolve each consumer's
    # parameter from its own module path, and give each distinct parameter its own initializer.
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    inits = {init.name: init for init in out.graph.initializer}
    for name in [n for n in inits if n in params]:
        attr = name.rsplit(".", 1)[-1]
        for node, k in consumers.get(name, []):
            owner = next((f"{WRAPPER}.{m}.{attr}" for m in reversed(_module_paths(node))
                          if f"{WRAPPER}.{m}.{attr}" in params), name)
            if owner != name and params[owner] is not params[name]:  # tied parameters stay one tensor
                if owner not in inits:
                    inits[owner] = out.graph.initializer.add(name=owner)
                    inits[owner].CopyFrom(inits[name])
                    inits[owner].name = owner
                node.input[k] = owner
    for init in out.graph.initializer:
        if init.name not in sources and init.name in params:
            sources[init.name] = param(params[init.name])
        if init.name in sources and tuple(init.dims) != sources[init.name][0]:
            raise OnnxInputError(f"initializer {init.name} has shape {tuple(init.dims)}, model has "
                                 f"{sources[init.name][0]}: the base export is from another model")
    # a GEMM reading a non-constant weight (a tied lm_head reads Transpose(embedding)) gets it from its source
    return {name: (dtype, value) for name, (_, dtype, value) in sources.items() if name in inits}


def refresh_weights(base: onnx.ModelProto, model: torch.nn.Module) -> onnx.ModelProto:
    """A copy of ``base`` (exported from this model's architecture) carrying ``model``'s current
    weights in memory: smoothing changes values, never the graph, so a 2-minute re-export becomes a
    copy. For graphs of real size use :func:`write_reference`, which never holds them all.
    Callers must verify the result against PyTorch (:func:`check_against_torch`).
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(base)
    sources = _retarget(out, model)
    for init in out.graph.initializer:
        if init.name in sources:
            init.CopyFrom(numpy_helper.from_array(sources[init.name][1]().float().numpy(), init.name))
    return out


STORED = "__stored"  # suffix of a weight initializer kept in its stored FP16/BF16 and cast to float32 in the graph
_LOW = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}


def stored_casts(graph: onnx.GraphProto) -> dict[str, str]:
    """``{float32 tensor: stored initializer}`` for the ``Cast`` nodes :func:`write_reference` puts in
    front of weights kept in their stored FP16/BF16."""
    inits = {t.name for t in graph.initializer}
    return {n.output[0]: n.input[0] for n in graph.node
            if n.op_type == "Cast" and len(n.input) == 1 and n.input[0] in inits and n.input[0].endswith(STORED)}


def _unstore(out: onnx.ModelProto) -> set[str]:
    """Undo :func:`write_reference`'s stored casts in ``out`` (a graph-only copy): each stored
    initializer becomes the float32 initializer it was cast to, without data (the caller supplies all
    of them). Returns their names."""
    casts = stored_casts(out.graph)
    if not casts:
        return set()
    by_stored = {v: k for k, v in casts.items()}
    for init in out.graph.initializer:
        if init.name in by_stored:
            init.CopyFrom(onnx.TensorProto(name=by_stored[init.name], data_type=onnx.TensorProto.FLOAT,
                                           dims=init.dims))
    keep = [n for n in out.graph.node if not (n.op_type == "Cast" and n.output[0] in casts and len(n.input) == 1
                                              and n.input[0] == casts[n.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return set(casts)


def _ir_tensor(t: torch.Tensor):
    import onnx_ir as ir

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return ir.tensor(t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16))
    return ir.tensor(t.contiguous().numpy())


class MissingWeightsError(OnnxInputError):
    """Weights the graph needs (stored-dtype or shape-only initializers) that no tensor of the model fills."""


def write_reference(base: onnx.ModelProto, model: torch.nn.Module, path: str | os.PathLike, *,
                    base_dir: str | os.PathLike | None = None, needed: set[str] = frozenset()) -> None:
    """Save ``base``'s graph carrying ``model``'s current weights to ``path``, streamed: each weight
    is read (and transposed, for GEMMs) only when the writer reaches it, written to the external data
    file and dropped, so peak memory is one tensor, whatever the model's size. ``base`` may be
    graph-only; tensors the model does not own (rotary tables, constants) are read from ``base_dir``.

    The graph computes in float32. A weight stored in FP16/BF16 is written as
    it is stored, followed by a ``Cast`` to float32 (its initializer named ``<name>__stored``): the
    same float32 values at half the bytes on disk; ONNX Runtime folds the Cast when it loads the
    graph, TensorRT at build time. Float32 weights are written as they are (the graph is then the
    one :func:`refresh_weights` makes). ``needed`` names initializers ``base`` holds no data for (a
    weightless trace's weights): one the model has no tensor for raises :class:`MissingWeightsError`
    before anything is written. Callers must verify the result (:func:`check_against_torch`)."""
    import onnx_ir as ir

    out = onnx.ModelProto()
    out.CopyFrom(base)  # the graph (``base`` read with load_external_data=False): small
    unstored = _unstore(out)
    sources = _retarget(out, model)
    missing = (unstored | set(needed)) - set(sources)  # ``needed``: initializers ``base`` holds no data for
    if missing:
        raise MissingWeightsError(f"{sorted(missing)[:3]} (of {len(missing)}) have no tensor in the model: the base "
                             "export is from another model")
    low = {name: _LOW[dtype] for name, (dtype, _) in sources.items() if dtype in _LOW}  # kept as stored
    casts = []
    for init in out.graph.initializer:
        if init.name in low:
            name = init.name
            init.CopyFrom(onnx.TensorProto(name=name + STORED, data_type=low[name], dims=init.dims))
            casts.append(onnx.helper.make_node("Cast", [name + STORED], [name], name=f"{name}/StoredCast",
                                               to=onnx.TensorProto.FLOAT))
    if casts:
        nodes = casts + list(out.graph.node)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    irm = ir.serde.deserialize_model(out)
    for name, (_, value) in sources.items():
        key = name + STORED if name in low else name
        v = irm.graph.initializers[key]

        def make(f=value, stored=name in low):
            t = f()
            return _ir_tensor(t if stored else t.float())
        dtype = ir.DataType(low[name]) if name in low else ir.DataType.FLOAT
        v.const_value = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(list(v.shape)), name=key)
    save_onnx(irm, path, base_dir=base_dir, external=None)


# --------------------------------------------------------------------------- Q/DQ insertion
def _without_data(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the initializers ``names`` reduced to name, type and shape (their values are read
    one at a time by :func:`_float_weight`): the Q/DQ graph is built without a copy of them."""
    return _with_initializers(model, lambda t: _shape_only(t) if t.name in names else t)


def bmm_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Attention BMMs (Q·Kᵀ and softmax·V): MatMuls with no constant input, inside decoder layers.
    ``{node name: [input tensor names]}``."""
    consts = {i.name for i in model.graph.initializer} | set(stored_casts(model.graph))
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and not (set(node.input) & consts) and _module_paths(node):
            out[node.name] = list(node.input[:2])
    return out


def calibrate_tensors(model_path: str | os.PathLike, tensors: list[str], windows: np.ndarray,
                      progress=None) -> dict[str, float]:
    """Running max|x| of intermediate ``tensors`` of an ONNX model over ``windows`` (n, T), by
    marking them as extra graph outputs and running ONNX Runtime one window at a time."""
    from .engine import session_from_proto

    model = load_onnx(model_path, load_external_data=False)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = session_from_proto(model, base_dir=Path(model_path).parent)
    amax = dict.fromkeys(tensors, 0.0)
    for w in windows:
        outs = sess.run(tensors, {INPUT: w[None].astype(np.int64)})
        for t, v in zip(tensors, outs):
            if not np.isfinite(v).all():
                from .errors import NonFiniteActivationError

                raise NonFiniteActivationError(f"NaN or Inf in tensor {t} during BMM calibration")
            amax[t] = max(amax[t], float(np.abs(v).max()))
        if progress is not None:
            progress(1)
    return amax


# Per-token dynamic activations: "blocked" = QuantizeLinear/DequantizeLinear with a run-time (B, T, 1)
# scale and block_size = K along the last axis (opset 21 blocked quantization); "explicit" = the same
# arithmetic as Div -> Round -> Clip -> Mul. Both compute fake_quant(x, amax_token / 127).
PER_TOKEN_FORM = "explicit"


def _weight_qdq(wt_stored: torch.Tensor, trans_b: bool, q: GemmQuant):
    """Integer weight, scale, zero point and DequantizeLinear attributes for a GEMM constant B stored
    [K, N] (``trans_b`` False) or [N, K] (``trans_b`` True), under ``q``'s weight granularity."""
    from .numerics import group_qparams, int_range

    w_oi = wt_stored if trans_b else wt_stored.t()  # (out, in)
    n, k = w_oi.shape
    if q.weight_group:
        g = q.weight_group
        scale, zp = group_qparams(w_oi, g, q.weight_bits, q.weight_symmetric)  # (N, nblk)
        qmin, qmax = int_range(q.weight_bits, q.weight_symmetric)
        rep = lambda t: t.repeat_interleave(g, dim=1)[:, :k]  # noqa: E731 - (N, nblk) -> (N, K)
        w_q = torch.clamp(torch.round(w_oi / rep(scale)) + rep(zp), qmin, qmax).to(torch.int16)  # int4/uint4 fit
        if trans_b:  # stored (N, K): blocks along axis 1
            return w_q, scale, zp, {"axis": 1, "block_size": g}
        return w_q.t(), scale.t(), zp.t(), {"axis": 0, "block_size": g}
    out_axis = 0 if trans_b else 1
    if q.weight_per_channel:
        scale = int8_scale(w_oi.abs().amax(dim=1))  # (N,)
        bshape = (-1, 1) if out_axis == 0 else (1, -1)
        return quantize(wt_stored, scale.view(bshape)), scale, torch.zeros_like(scale), {"axis": out_axis}
    scale = int8_scale(wt_stored.abs().amax())
    return quantize(wt_stored, scale), scale, torch.zeros(()), {}


def _int4_tensor(name: str, values: np.ndarray, data_type: int) -> onnx.TensorProto:
    """An INT4/UINT4 initializer from integer ``values``: two values a byte, the first in the low
    nibble (the ONNX layout), built with numpy rather than a Python list of every value."""
    flat = values.astype(np.int64).ravel() & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    t = onnx.TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    t.raw_data = packed.tobytes()
    return t


def _float_weight(init: onnx.TensorProto, base_dir: str | os.PathLike | None) -> np.ndarray:
    """One float initializer's values as float32, read from ``base_dir`` when it is external data
    (the graph keeps its reference: one weight in memory at a time, not the model's)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(init):
        if base_dir is None:
            raise OnnxInputError(f"initializer {init.name} is external data: pass base_dir (the directory of "
                                 "the file the graph was read from)")
        t = onnx.TensorProto()
        t.CopyFrom(init)  # a reference only: no data yet
        load_external_data_for_tensor(t, str(base_dir))
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
        arr = numpy_helper.to_array(t)
    else:
        arr = numpy_helper.to_array(init)
    arr = arr.astype(np.float32, copy=False)
    return arr if arr.flags.writeable else arr.copy()  # a view of the tensor's bytes is read-only (torch warns)


def _int_dtype(q: GemmQuant):
    if q.weight_bits == 8:
        return onnx.TensorProto.INT8
    return onnx.TensorProto.INT4 if q.weight_symmetric else onnx.TensorProto.UINT4


def _act_dynamic(graph, x, safe: str, per_token: bool, k: int | None):
    """Nodes computing the run-time INT8 scale of ``x`` (max|x| / 127, >= 1e-8) and its Q/DQ."""
    import onnx_graphsurgeon as gs

    def var(name, dtype=np.float32):
        return gs.Variable(f"{safe}.{name}", dtype=dtype)

    def node(op, name, inputs, out, **attrs):
        graph.nodes.append(gs.Node(op, f"{safe}/input/{name}", attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    absx = node("Abs", "Abs", [x], var("input_abs"))
    if per_token:
        axes = gs.Constant(f"{safe}.input_axes", np.array([-1], dtype=np.int64))
        amax = node("ReduceMax", "ReduceMax", [absx, axes], var("input_amax"), keepdims=1)
    else:
        amax = node("ReduceMax", "ReduceMax", [absx], var("input_amax"), keepdims=0)
    div = node("Div", "ScaleDiv", [amax, gs.Constant(f"{safe}.qmax", np.array(127.0, np.float32))],
               var("input_scale_raw"))
    scale = node("Max", "ScaleClamp", [div, gs.Constant(f"{safe}.min_scale", np.array(1e-8, np.float32))],
                 var("input_scale"))
    if per_token and PER_TOKEN_FORM == "explicit":
        r = node("Round", "Round", [node("Div", "Div", [x, scale], var("input_div"))], var("input_round"))
        c = node("Clip", "Clip", [r, gs.Constant(f"{safe}.qlo", np.array(-128.0, np.float32)),
                                  gs.Constant(f"{safe}.qhi", np.array(127.0, np.float32))], var("input_clip"))
        return node("Mul", "Mul", [c, scale], var("input_dq"))
    attrs = {"axis": -1, "block_size": int(k)} if per_token else {}
    zp = gs.Constant(f"{safe}.input_zp", np.zeros((), dtype=np.int8))
    if per_token:  # blocked zero point must match the scale's shape: use none (zero by default)
        xq = node("QuantizeLinear", "QuantizeLinear", [x, scale], var("input_q", np.int8), **attrs)
        return node("DequantizeLinear", "DequantizeLinear", [xq, scale], var("input_dq"), **attrs)
    xq = node("QuantizeLinear", "QuantizeLinear", [x, scale, zp], var("input_q", np.int8))
    return node("DequantizeLinear", "DequantizeLinear", [xq, scale, zp], var("input_dq"))


def insert_qdq(ref: onnx.ModelProto, plan: dict[str, GemmQuant], *, level: str,
               metadata: dict[str, Any] | None = None, bmm: dict[str, float] | None = None,
               base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Return a copy of ``ref`` with Q/DQ on the inputs of every planned GEMM.

    Weight: integer initializer (INT8, INT4 or UINT4) -> DequantizeLinear -> GEMM input B, with a
    per-tensor scale, a per-channel scale (axis = output-channel axis of the constant as stored) or
    block scales (axis = input-channel axis, ``block_size`` = group; opset 21).
    Activation: static: QuantizeLinear(constant scale, zp=0) -> DequantizeLinear, one pair per
    consuming GEMM even where GEMMs share an input (q/k/v, gate/up): ONNX Runtime fuses Q/DQ into
    an integer GEMM only when neither is shared (measured on SmolLM2: shared pairs left 150 of 210
    GEMMs in float), and TensorRT merges identical pairs itself; dynamic: the scale is computed in the graph
    (ReduceMax(Abs(x)) / 127) per tensor or per token (last axis); none: the input stays floating
    point (weight-only levels). ``bmm`` ({tensor name: amax}, from :func:`calibrate_tensors`) also
    quantizes both inputs of the attention BMMs, statically.

    ``ref`` may be graph-only (read with ``load_external_data=False``) with its tensors in
    ``base_dir``: only the planned GEMMs' weights are read; the other tensors stay references to
    ``base_dir`` (save the result with ``save_onnx(..., base_dir=base_dir)``).
    """
    import onnx_graphsurgeon as gs

    nodes = gemm_nodes(ref, list(plan))
    # The planned GEMMs' float weights are read one at a time below, straight from ``ref``'s
    # initializers (external data from ``base_dir``), and only their integer form is kept: peak
    # memory is one float weight plus the integer weights, not every float weight at once.
    # a weight kept in its stored FP16/BF16 (write_reference) is read through its Cast
    stored = stored_casts(ref.graph)
    planned = {stored.get(n.input[1], n.input[1]) for n in ref.graph.node if n.name in set(nodes.values())}
    float_inits = {t.name: t for t in ref.graph.initializer if t.name in planned}
    graph = gs.import_onnx(_without_data(ref, planned))
    by_name = {n.name: n for n in graph.nodes}
    act_cache: dict[tuple, Any] = {}
    low_bit: dict[str, int] = {}  # initializer name -> INT4/UINT4, converted after export
    for module, q in plan.items():
        node = by_name[nodes[module]]
        safe = module.replace(".", "_")
        # -- weight: constant B, stored [K, N] (MatMul, Gemm transB=0) or [N, K] (Gemm transB=1)
        w = node.inputs[1]
        if w.name in stored and w.inputs and w.inputs[0].op == "Cast":
            w = w.inputs[0].inputs[0]
        if not isinstance(w, gs.Constant) or w.name not in float_inits:
            raise OnnxInputError(f"{node.name} ({module}): weight input is not a constant")
        trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0)) == 1
        wt = torch.from_numpy(_float_weight(float_inits[w.name], base_dir))
        wq, scale, zp, attrs = _weight_qdq(wt, trans_b, q)
        k_in = int(wt.shape[0] if not trans_b else wt.shape[1])
        del wt
        dtype = _int_dtype(q)
        wq_c = gs.Constant(f"{safe}.weight_int{q.weight_bits}", wq.numpy().astype(np.int8 if q.weight_symmetric
                                                                                  else np.uint8))
        del wq
        ws_c = gs.Constant(f"{safe}.weight_scale", scale.numpy().astype(np.float32))
        wz_c = gs.Constant(f"{safe}.weight_zp", zp.numpy().astype(np.int8 if q.weight_symmetric else np.uint8))
        if dtype != onnx.TensorProto.INT8:
            low_bit[wq_c.name] = low_bit[wz_c.name] = dtype
        w_dq = gs.Variable(f"{safe}.weight_dq", dtype=np.float32, shape=list(wq_c.values.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", f"{safe}/weight/DequantizeLinear",
                                   attrs=attrs, inputs=[wq_c, ws_c, wz_c], outputs=[w_dq]))
        node.inputs[1] = w_dq
        # -- activation
        x = node.inputs[0]
        if q.act_amax is not None:  # a Q/DQ pair per consuming GEMM (see the docstring)
            s = int8_scale(q.act_amax).numpy().astype(np.float32)
            sc = gs.Constant(f"{safe}.input_scale", s)
            zpc = gs.Constant(f"{safe}.input_zp", np.zeros((), dtype=np.int8))
            xq = gs.Variable(f"{safe}.input_q", dtype=np.int8, shape=x.shape)
            xdq = gs.Variable(f"{safe}.input_dq", dtype=np.float32, shape=x.shape)
            graph.nodes.append(gs.Node("QuantizeLinear", f"{safe}/input/QuantizeLinear",
                                       inputs=[x, sc, zpc], outputs=[xq]))
            graph.nodes.append(gs.Node("DequantizeLinear", f"{safe}/input/DequantizeLinear",
                                       inputs=[xq, sc, zpc], outputs=[xdq]))
            node.inputs[0] = xdq
        elif q.act_dynamic is not None:  # per consuming GEMM too, so ORT can fuse each one
            node.inputs[0] = _act_dynamic(graph, x, safe, q.act_dynamic == "per-token", k_in)
    bmm_nodes = bmm_inputs(ref) if bmm else {}
    for node_name, inputs in bmm_nodes.items():
        node = by_name[node_name]
        for k, tname in enumerate(inputs):
            if tname not in bmm:
                raise OnnxInputError(f"no calibrated scale for attention BMM input {tname}")
            key = (tname, bmm[tname])
            if key not in act_cache:
                safe = node_name.replace("/", "_") + f"_in{k}"
                s = int8_scale(bmm[tname]).numpy().astype(np.float32)
                sc, zp = gs.Constant(f"{safe}.scale", s), gs.Constant(f"{safe}.zp", np.zeros((), dtype=np.int8))
                x = node.inputs[k]
                xq = gs.Variable(f"{safe}.q", dtype=np.int8, shape=x.shape)
                xdq = gs.Variable(f"{safe}.dq", dtype=np.float32, shape=x.shape)
                graph.nodes.append(gs.Node("QuantizeLinear", f"{safe}/QuantizeLinear", inputs=[x, sc, zp], outputs=[xq]))
                graph.nodes.append(gs.Node("DequantizeLinear", f"{safe}/DequantizeLinear", inputs=[xq, sc, zp],
                                           outputs=[xdq]))
                act_cache[key] = xdq
            node.inputs[k] = act_cache[key]
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    for i, init in enumerate(out.graph.initializer):  # a planned weight another node also reads: keep it whole
        if init.name in float_inits:
            out.graph.initializer[i].CopyFrom(float_inits[init.name])
    for i, init in enumerate(out.graph.initializer):
        if init.name in low_bit:
            out.graph.initializer[i].CopyFrom(_int4_tensor(init.name, onnx.numpy_helper.to_array(init),
                                                           low_bit[init.name]))
    out.ir_version = min(ref.ir_version, MAX_IR_VERSION)
    del out.opset_import[:]
    out.opset_import.extend(ref.opset_import)
    meta = {"sq2trt.level": level, "sq2trt.quantized_gemms": json.dumps([nodes[m] for m in plan]),
            "sq2trt.gemm_modules": json.dumps({nodes[m]: m for m in plan}),
            "sq2trt.quantize_bmm": "true" if bmm_nodes else "false"}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    set_metadata(out, meta)
    return out


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
