"""Per-layer diagnosis: where does quantization error enter and grow?

Both ``ref.onnx`` and the Q/DQ ``<level>.onnx`` come from the same graph (insert_qdq only adds
nodes), so a float tensor has the same name in both. We mark as extra graph outputs (Polygraphy's
``ModifyOutputs``):

- each decoder layer's output (the last node whose ``namespace`` metadata names ``<layers>.<i>``),
- for each quantized GEMM (``sq2trt.gemm_modules`` metadata: {node name: module}): its float input
  ``x`` (before QuantizeLinear), the dequantized input the GEMM actually reads (Q/DQ model only),
  and its output,

run both models with ``OnnxrtRunner`` through ``Comparator`` on real token windows, and compute
each tensor's relative L2 error ``||q - r|| / ||r||`` against the reference. Both sessions run
without ORT's fused INT8 kernels (ORT_ENABLE_BASIC), so the numbers are Q/DQ semantics, the same
numbers PyTorch fake quantization and TensorRT compute, not an ORT CPU kernel artifact.

A GEMM's *added* error is ``output_rel - input_rel``: what its own weight and input quantization
add on top of the error that reached it. GEMMs with the largest added error are the
``quant.fp_fallback`` candidates.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from .export import INPUT, OUTPUT, _module_paths, get_metadata, load_onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A tensor to compare: ``ref_name`` in ref.onnx against ``quant_name`` in the Q/DQ model."""

    kind: str  # layer_output | gemm_input | gemm_qinput | gemm_output
    key: str  # layer index as text, or the GEMM's module name
    ref_name: str
    quant_name: str


def layer_outputs(model: onnx.ModelProto, layers_prefix: str = "model.layers") -> dict[int, str]:
    """``{layer index: tensor name}`` of each decoder layer's output: the output of the last node
    (in graph order, which is topological) whose module path names ``<layers_prefix>.<i>``."""
    pat = re.compile(re.escape(layers_prefix) + r"\.(\d+)$")
    last: dict[int, str] = {}
    for node in model.graph.node:
        for p in _module_paths(node):
            m = pat.match(p)
            if m and node.output:
                last[int(m.group(1))] = node.output[0]
    return dict(sorted(last.items()))


def probes(ref: onnx.ModelProto, quant: onnx.ModelProto, layers_prefix: str = "model.layers") -> list[Probe]:
    meta = get_metadata(quant)
    if "sq2trt.gemm_modules" not in meta:
        from .errors import OnnxInputError

        raise OnnxInputError("the Q/DQ model has no sq2trt.gemm_modules metadata; diagnose needs a model "
                             "written by sq2trt export")
    gemms: dict[str, str] = json.loads(meta["sq2trt.gemm_modules"])  # node name -> module
    ref_nodes = {n.name: n for n in ref.graph.node}
    q_nodes = {n.name: n for n in quant.graph.node}
    out: list[Probe] = []
    for i, t in layer_outputs(ref, layers_prefix).items():
        out.append(Probe("layer_output", str(i), t, t))
    for node_name, module in gemms.items():
        r, q = ref_nodes.get(node_name), q_nodes.get(node_name)
        if r is None or q is None:
            log.warning("GEMM node %s (%s) not found in both graphs; skipped", node_name, module)
            continue
        x = r.input[0]
        out.append(Probe("gemm_input", module, x, x))
        if q.input[0] != x:  # the dequantized activation the GEMM reads
            out.append(Probe("gemm_qinput", module, x, q.input[0]))
        out.append(Probe("gemm_output", module, r.output[0], q.output[0]))
    return out


def _session(model: onnx.ModelProto, names: Sequence[str], device: str, base_dir):
    """A session loader for the graph-only ``model`` with ``names`` marked as outputs (Polygraphy's
    ModifyOutputs); its tensors are read from ``base_dir``, so the model may be of any size."""
    from polygraphy.backend.onnx import ModifyOutputs

    import onnxruntime as ort

    from .engine import session_from_proto

    marked = ModifyOutputs(model, outputs=[OUTPUT, *dict.fromkeys(names)], copy=True)

    def load():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return session_from_proto(marked(), so, base_dir=base_dir, device=device)

    return load


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def diagnose(ref_path: str | os.PathLike, quant_path: str | os.PathLike, inputs: np.ndarray, *,
             top: int = 5, device: str = "cpu", layers_prefix: str = "model.layers") -> dict[str, Any]:
    """Per-layer and per-GEMM relative errors of the Q/DQ model against the reference on
    ``inputs`` (n, T) token ids; see the module docstring. Returns the ``layers.json`` content."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    ref, quant = load_onnx(ref_path, load_external_data=False), load_onnx(quant_path, load_external_data=False)
    ps = probes(ref, quant, layers_prefix)
    runners = [OnnxrtRunner(_session(ref, [p.ref_name for p in ps], device, Path(ref_path).parent), name="reference"),
               OnnxrtRunner(_session(quant, [p.quant_name for p in ps], device, Path(quant_path).parent),
                            name="quantized")]
    feeds = [{INPUT: inputs[i: i + 1].astype(np.int64)} for i in range(inputs.shape[0])]
    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        results = Comparator.run(runners, data_loader=feeds)
    finally:
        G_LOGGER.module_severity = old
    r_iters, q_iters = results[0][1], results[1][1]

    def err(p: Probe) -> float:
        num = sum(float(np.sum((np.asarray(q[p.quant_name], np.float64) - np.asarray(r[p.ref_name], np.float64)) ** 2))
                  for r, q in zip(r_iters, q_iters))
        den = sum(float(np.sum(np.asarray(r[p.ref_name], np.float64) ** 2)) for r in r_iters)
        return float(np.sqrt(num / max(den, 1e-30)))

    errs = {(p.kind, p.key): err(p) for p in ps}
    logits = Probe("logits", "logits", OUTPUT, OUTPUT)
    layers = []
    prev = 0.0
    for p in ps:
        if p.kind == "layer_output":
            e = errs[(p.kind, p.key)]
            layers.append({"layer": int(p.key), "tensor": p.ref_name, "rel_l2": e, "growth": e - prev})
            prev = e
    gemms = []
    for p in ps:
        if p.kind != "gemm_output":
            continue
        m = p.key
        e_in, e_out = errs[("gemm_input", m)], errs[("gemm_output", m)]
        gemms.append({"module": m, "input_rel": e_in, "qinput_rel": errs.get(("gemm_qinput", m)),
                      "output_rel": e_out, "added": e_out - e_in})
    worst_gemms = sorted(gemms, key=lambda g: -g["added"])[:top]
    worst_layers = sorted(layers, key=lambda x: -x["growth"])[:top]
    return {
        "inputs": {"sequences": int(inputs.shape[0]), "seq_len": int(inputs.shape[1])},
        "metric": "relative L2 error ||q - r|| / ||r|| vs ref.onnx, exact Q/DQ semantics (ORT_ENABLE_BASIC)",
        "logits_rel_l2": err(logits),
        "layers": layers,
        "gemms": gemms,
        "worst_layers": [x["layer"] for x in worst_layers],
        "worst_gemms": [g["module"] for g in worst_gemms],
        "proposed_fp_fallback": propose_fallback(gemms, top),
    }


def propose_fallback(gemms: Sequence[dict[str, Any]], top: int = 5, min_ratio: float = 2.0) -> list[str]:
    """Module names for ``quant.fp_fallback``: at most ``top`` GEMMs, largest added error first,
    each adding at least ``min_ratio`` x the median added error (a GEMM that adds what the typical
    one adds is not an outlier, and keeping it in float buys little)."""
    added = sorted(g["added"] for g in gemms)
    if not added:
        return []
    median = added[len(added) // 2]
    ranked = sorted(gemms, key=lambda g: -g["added"])
    return [g["module"] for g in ranked[:top] if g["added"] > 0 and g["added"] >= min_ratio * max(median, 0.0)]


def render_markdown(d: dict[str, Any], top: int = 5) -> str:
    lines = [f"Logits relative L2 error: {d['logits_rel_l2']:.4g} ({d['metric']}).", "",
             "| worst GEMMs (added error) | input rel | dequantized input rel | output rel | added |",
             "|---|---|---|---|---|"]
    by = {g["module"]: g for g in d["gemms"]}
    for m in d["worst_gemms"][:top]:
        g = by[m]
        q = "n/a" if g["qinput_rel"] is None else f"{g['qinput_rel']:.3g}"
        lines.append(f"| `{m}` | {g['input_rel']:.3g} | {q} | {g['output_rel']:.3g} | {g['added']:+.3g} |")
    lines += ["", "Proposed fp_fallback: " + (", ".join(f"`{m}`" for m in d["proposed_fp_fallback"]) or "none")]
    return "\n".join(lines)
