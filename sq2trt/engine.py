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

    load_onnx(onnx_path, load_external_data=False)  # clear error on a corrupt input
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp)
        so.log_severity_level = 3
        _w4a16_exact(so)
        if Path(str(onnx_path) + ".data").exists():
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        engine_path.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        "1024")
        ort.InferenceSession(str(onnx_path), so, providers=providers(device))
    ops: dict[str, int] = {}
    for n in load_onnx(engine_path, load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"backend": "ort", "onnxruntime": ort.__version__, "providers": providers(device),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
