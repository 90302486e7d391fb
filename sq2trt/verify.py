"""Is the exported Q/DQ graph the plan? Checks that hold on real models too.

Comparing final logits of the Q/DQ graph (ONNX Runtime, no kernel fusions) with PyTorch fake
quantization proves exactness on tiny models (~1e-7), but not on a real one: float
accumulation order differs, so a handful of values land on the other side of a rounding
boundary (one quantization step apart), and each later layer amplifies these flips. Measured
on SmolLM2-135M W8A8: layer 0 inputs match except 1-2 elements of ~10^5 (exactly one step),
yet final logits differ by 0.27 relative L2. So the export is checked in two parts that such
flips cannot fool:

- activations: the quantized inputs of the first decoder layer's GEMMs (DQ outputs in the
  graph, hook-captured fake-quantized inputs in PyTorch) must agree element for element,
  except for rare one-step flips;
- weights: a weights-only variant of the same plan (no activation rounding, so nothing to
  amplify) must match PyTorch fake quantization to float rounding end to end.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx
import torch

from .export import INPUT, OUTPUT, get_metadata, insert_qdq, load_onnx
from .numerics import int8_scale
from .plan import GemmQuant

MAX_FLIP_FRACTION = 1e-3  # one-step flips from accumulation order; a wrong scale disagrees everywhere
MAX_WEIGHTS_ONLY_REL = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    act_elements: int
    act_mismatch_fraction: float  # fraction of layer-0 quantized-input elements that differ
    act_max_step_diff: float  # largest difference in quantization steps (1.0 = a rounding flip)
    weights_only_max_rel: float  # weights-only Q/DQ graph vs PyTorch fake quant, max |d| / max |ref|
    weights_identical: bool  # the shipped graph's INT8 weights and scales are the checked ones, bit for bit
    logits_rel_l2: float  # full graph vs fake quant, end to end (amplified flips; informational)
    logits_top1: float

    def __bool__(self) -> bool:
        return (self.act_mismatch_fraction <= MAX_FLIP_FRACTION and self.act_max_step_diff <= 1.0 + 1e-3
                and self.weights_only_max_rel <= MAX_WEIGHTS_ONLY_REL and self.weights_identical)

    def __str__(self) -> str:
        return (f"layer-0 activations: {self.act_mismatch_fraction:.2e} of {self.act_elements} elements differ "
                f"(max {self.act_max_step_diff:.2f} steps; limit {MAX_FLIP_FRACTION:g}, 1 step); weights-only "
                f"graph vs fake quant {self.weights_only_max_rel:.2e} (limit {MAX_WEIGHTS_ONLY_REL:g}), shipped weights "
                f"{'identical' if self.weights_identical else 'DIFFER'}; "
                f"end-to-end logits rel L2 {self.logits_rel_l2:.3g}, top-1 {self.logits_top1:.2%}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": bool(self)}


def _session(model: onnx.ModelProto, base_dir):
    import onnxruntime as ort

    from .engine import session_from_proto

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # Q/DQ semantics, no int kernels
    return session_from_proto(model, so, base_dir=base_dir)


def check_export(quant: onnx.ModelProto, ref: onnx.ModelProto, model: torch.nn.Module,
                 plan: dict[str, GemmQuant], first_layer_prefix: str, ids: np.ndarray, *,
                 quant_dir=None, ref_dir=None) -> ExportCheck:
    """``quant``: the Q/DQ graph; ``ref``: the same graph without Q/DQ; ``model``: the PyTorch model
    with the same (smoothed) weights; ``ids``: (B, T) token ids. Either graph may be graph-only
    (``load_external_data=False``) with its tensors in ``quant_dir`` / ``ref_dir``."""
    from .evaluate import torch_logits_fn
    from .fakequant import fake_quantized

    node_of = {m: n for n, m in json.loads(get_metadata(quant)["sq2trt.gemm_modules"]).items()}
    first = [m for m in plan if m.startswith(first_layer_prefix) and plan[m].act_amax is not None]
    nodes = {n.name: n for n in quant.graph.node}
    tensors = {m: nodes[node_of[m]].input[0] for m in first}
    names = [OUTPUT, *sorted(set(tensors.values()))]
    added = [onnx.helper.make_empty_tensor_value_info(t) for t in names[1:]]
    quant.graph.output.extend(added)  # probe outputs, removed again below
    try:
        got = dict(zip(names, _session(quant, quant_dir).run(names, {INPUT: ids.astype(np.int64)})))
    finally:
        for _ in added:
            quant.graph.output.pop()

    captured: dict[str, np.ndarray] = {}
    with fake_quantized(model, plan):
        handles = [model.get_submodule(m).register_forward_hook(
            lambda _mod, args, _out, _m=m: captured.__setitem__(_m, args[0].detach().numpy())) for m in first]
        try:
            want = torch_logits_fn(model)(ids)
        finally:
            for h in handles:
                h.remove()
    elements, mismatched, max_steps = 0, 0, 0.0
    for m in first:
        step = float(int8_scale(plan[m].act_amax))
        d = np.abs(got[tensors[m]] - captured[m]) / step
        elements += d.size
        mismatched += int((d > 1e-3).sum())
        max_steps = max(max_steps, float(d.max()))

    weights_only = {m: replace(q, act_amax=None) for m, q in plan.items()}
    wq = insert_qdq(ref, weights_only, level="weights-only-check", base_dir=ref_dir)
    w_got = _session(wq, ref_dir).run([OUTPUT], {INPUT: ids.astype(np.int64)})[0]
    with fake_quantized(model, weights_only):
        w_want = torch_logits_fn(model)(ids)
    g = got[OUTPUT]
    return ExportCheck(
        weights_identical=_weights_identical(quant, wq, quant_dir),
        act_elements=elements, act_mismatch_fraction=mismatched / max(elements, 1), act_max_step_diff=max_steps,
        weights_only_max_rel=float(np.abs(w_got - w_want).max() / max(np.abs(w_want).max(), 1e-12)),
        logits_rel_l2=float(np.linalg.norm(g - want) / max(np.linalg.norm(want), 1e-12)),
        logits_top1=float((g.argmax(-1) == want.argmax(-1)).mean()))


def _weights_identical(a: onnx.ModelProto, b: onnx.ModelProto, a_dir=None) -> bool:
    """Every weight DequantizeLinear input (INT8 values, scale, zero point) of ``b`` is in ``a``, equal.
    ``a``'s external tensors are read from ``a_dir``, one at a time."""
    from onnx import numpy_helper

    def weight_inits(m: onnx.ModelProto, base_dir) -> dict[str, np.ndarray]:
        inits = {i.name: i for i in m.graph.initializer}
        out = {}
        for n in m.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                for name in n.input:
                    out[name] = numpy_helper.to_array(inits[name], base_dir=str(base_dir or ""))
        return out

    wa, wb = weight_inits(a, a_dir), weight_inits(b, None)
    return bool(wb) and all(k in wa and wa[k].dtype == v.dtype and np.array_equal(wa[k], v) for k, v in wb.items())


def check_export_files(quant_path, ref_path, model, plan, first_layer_prefix, ids) -> ExportCheck:
    """:func:`check_export` on saved graphs of any size: only the graphs and the tensors the check
    compares are read into memory; sessions read the rest from the files' directories."""
    from pathlib import Path

    return check_export(load_onnx(quant_path, load_external_data=False), load_onnx(ref_path, load_external_data=False),
                        model, plan, first_layer_prefix, ids, quant_dir=Path(quant_path).parent,
                        ref_dir=Path(ref_path).parent)
