"""ONNX Runtime engines: an optimized model saved as this backend's engine artifact.

The saved engine is the graph after ORT's extended optimizations (Q/DQ MatMuls fused into
MatMulIntegerToFloat / QGemm on the CPU provider). ORT_ENABLE_ALL adds hardware-specific layout
changes that are not portable, so they are applied when the engine is loaded, not saved.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .artifacts import atomic_path
from .export import load_onnx

log = logging.getLogger(__name__)


def providers(device: str = "auto") -> list[str]:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when onnxruntime-gpu and a GPU are present)."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail:
            from .errors import BackendUnavailableError

            raise BackendUnavailableError(f"CUDA was requested but onnxruntime offers {avail}; install "
                                          "onnxruntime-gpu (pip install 'sq2trt[gpu]') on a machine with an "
                                          "NVIDIA GPU, or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def _w4a16_exact(so) -> None:
    """ORT fuses DequantizeLinear(INT4/UINT4 block) -> MatMul into MatMulNBits with accuracy_level 4 by
    default, which quantizes the activations to INT8 (measured: 1.7e-2 relative error on a GEMM with an
    outlier channel, vs 8e-7 at level 0). Level 0 keeps activations in float: W4A16 as named."""
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")


def session(path: str | os.PathLike, *, device: str = "auto", threads: int = 0, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    _w4a16_exact(so)
    return ort.InferenceSession(str(path), so, providers=providers(device))


def session_from_proto(model, so=None, *, base_dir: str | os.PathLike | None = None, device: str = "cpu"):
    """An ONNX Runtime session for an in-memory ``model`` (e.g. a graph with extra outputs) whose
    tensors may be external data in ``base_dir``. Sessions are never built from a whole-model
    message over 2 GB: a small graph is passed as bytes with ORT's external-initializer folder;
    one holding more than ~1.5 GB of data itself is written to a temporary file first."""
    import tempfile

    import onnxruntime as ort

    from .export import inline_bytes, save_onnx

    so = so or ort.SessionOptions()
    so.log_severity_level = 3
    if inline_bytes(model) < 1536 * 1024**2:
        if base_dir is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers(device))
    with tempfile.TemporaryDirectory(prefix="sq2trt-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_onnx(model, path, base_dir=base_dir, external=True)
        return ort.InferenceSession(str(path), so, providers=providers(device))


def build_ort_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                     device: str = "auto") -> dict[str, Any]:
    """Optimize ``onnx_path`` with ONNX Runtime and save the result to ``engine_path``."""
    import onnxruntime as ort

    graph = load_onnx(onnx_path, load_external_data=False)  # clear error on a corrupt input
    engine_path = Path(engine_path)
    from .export import stored_casts

    # weights kept in their stored FP16/BF16 (sq2trt.export.write_reference): ORT's constant folding would
    # save them as FP32 (twice the bytes on disk); keep the Casts, which every session folds when it loads
    keep_casts = bool(stored_casts(graph.graph))
    source, split, relus = Path(onnx_path), split_gemm_bias(graph), relus_to_max(graph)
    if split or relus:  # ORT reads a graph-only copy beside the original, so its external data still resolves
        source = Path(onnx_path).with_name(f".tmp-ort-{os.getpid()}-{Path(onnx_path).name}")
        source.write_bytes(graph.SerializeToString())  # graph only, or inline tensors < 2 GB (save_onnx's rule)
        log.info("for ONNX Runtime's INT8 fusion: %d float GEMM biases as a separate Add, %d Relu after "
                 "quantized GEMMs as Max(x, 0)", split, relus)
    try:
        with atomic_path(engine_path) as tmp:
            _optimize(source, Path(onnx_path), tmp, engine_path, device, keep_casts=keep_casts)
    finally:
        if source != Path(onnx_path):
            source.unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for n in load_onnx(engine_path, load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"backend": "ort", "onnxruntime": ort.__version__, "providers": providers(device),
            "bias_split": split, "relu_as_max": relus, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def _dq_fed(node, producers) -> bool:
    return any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input[:2])


def split_gemm_bias(model) -> int:
    """Rewrite, in place, each ``Gemm(A, B, C)`` with a DequantizeLinear on A or B and a float bias C
    as ``Add(Gemm(A, B), C)`` (same function for beta = 1); returns how many.

    ONNX Runtime's Q/DQ Gemm fusion (QGemm) requires every input to come from a DequantizeLinear,
    the bias as INT32 (``GemmNodeGroupSelector`` in onnxruntime's qdq_selectors.cc): a float bias,
    which TensorRT's rules keep, left OPT's fc1/fc2 (2-D Gemm with bias) as float GEMMs on
    dequantized weights."""
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    out, count = [], 0
    for n in model.graph.node:
        beta = next((a.f for a in n.attribute if a.name == "beta"), 1.0)
        if (n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] and beta == 1.0 and _dq_fed(n, producers)
                and (producers.get(n.input[2]) is None or producers[n.input[2]].op_type != "DequantizeLinear")):
            bias, y = n.input[2], n.output[0]
            del n.input[2]
            n.output[0] = f"{y}__no_bias"
            out += [n, helper.make_node("Add", [n.output[0], bias], [y], name=f"{n.name}__bias")]
            count += 1
        else:
            out.append(n)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(out)
    return count


def relus_to_max(model) -> int:
    """Rewrite, in place, each ``Relu`` that reads a GEMM with a DequantizeLinear input as ``Max(x, 0)``
    (the same function); returns how many.

    ONNX Runtime's Q/DQ fusion gives up on a GEMM whose only consumer is a Relu/Clip unless a
    QuantizeLinear right after makes the Relu redundant (a zero point at the type's minimum;
    ``QDQ::NodeGroupSelector::GetQDQSelection`` in onnxruntime's qdq_selectors.cc). sq2trt's Q/DQ is
    symmetric (TensorRT's rule), so OPT's fc1 (Gemm -> Relu) stayed a float GEMM on dequantized
    weights: 120 of OPT-1.3B's 144 quantized GEMMs were fused, not 144. ``Max`` does not trigger that
    rule. Only the ONNX Runtime engine is rewritten; the Q/DQ graph TensorRT builds keeps its Relu."""
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    scale_types = {t.name: t.data_type for t in model.graph.initializer}
    zeros: dict[int, str] = {}
    count = 0
    for n in model.graph.node:
        if n.op_type != "Relu":
            continue
        gemm = producers.get(n.input[0])
        if gemm is None or gemm.op_type not in ("Gemm", "MatMul") or users.get(n.input[0]) != 1:
            continue
        dqs = [producers[i] for i in gemm.input if i in producers and producers[i].op_type == "DequantizeLinear"]
        if not dqs:
            continue
        elem = scale_types.get(dqs[0].input[1])  # a DequantizeLinear's output has its scale's type
        if elem is None:
            continue
        if elem not in zeros:
            zeros[elem] = f"sq2trt.relu_max_zero_{elem}"
            model.graph.initializer.append(helper.make_tensor(zeros[elem], elem, [], [0.0]))
        n.op_type = "Max"
        n.input.append(zeros[elem])
        count += 1
    return count


def _optimize(source: Path, original: Path, tmp: Path, engine_path: Path, device: str, *,
              keep_casts: bool = False) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp)
    so.log_severity_level = 3
    _w4a16_exact(so)
    if Path(str(original) + ".data").exists():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    engine_path.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    "1024")
    kw = {"disabled_optimizers": ["ConstantFolding"]} if keep_casts else {}
    ort.InferenceSession(str(source), so, providers=providers(device), **kw)
