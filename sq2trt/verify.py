"""Is the exported Q/DQ graph the plan? Checks that hold on real models too.

Comparing final logits of the Q/DQ graph (ONNX Runtime, no kernel fusions) with PyTorch fake
quantization proves exactness on tiny models (~1e-7), but not on a real one: float
accumulation order differs, so a handful of values land on the other side of a rounding
boundary (one quantization step apart), and each later layer amplifies these flips. Measured
on SmolLM2-135M W8A8: layer 0 inputs match except 1-2 elements of ~10^5 (exactly one step),
yet final logits differ by 0.27 relative L2. Run-time scales amplify them even inside layer 0:
per-token steps are fine, so one flip in a q/k/v input at one token moves the attention output of
every later token by many steps (SmolLM2 ZeroQuant: 13.5% of down_proj's layer-0 inputs one or two
steps off PyTorch's, although the graph quantizes exactly). So the export is checked in parts that
such flips cannot fool:

- activations: in the first decoder layer, each GEMM's input in the graph must be exactly the plan's
  quantization (static, dynamic per tensor or per token: ``fakequant.quantize_input``) of the float
  tensor the reference graph's same GEMM reads, computed from the graph's own values, element for
  element (rare one-step flips from arithmetic order allowed). That float tensor must be the one
  PyTorch feeds the module under the same plan, up to the drift upstream flips cause (relative L2);
  a Q/DQ on another tensor or GEMM is off by O(1);
- weights: a weights-only variant of the same plan (no activation rounding of any kind, static
  or dynamic, so nothing to amplify) must match PyTorch fake quantization to float rounding end
  to end.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx
import torch

from .export import INPUT, OUTPUT, get_metadata, insert_qdq, load_onnx
from .fakequant import quantize_input
from .numerics import dynamic_scale, int8_scale
from .plan import GemmQuant

MAX_FLIP_FRACTION = 1e-3  # one-step flips from arithmetic order; a wrong scale disagrees everywhere
MAX_WEIGHTS_ONLY_REL = 1e-4
# Layer-0 GEMM float inputs, graph vs PyTorch under the same plan: one-step flips upstream move them a
# little (measured on SmolLM2-135M, largest over layer 0: W8A8 3.6e-7, O3 4.2e-7, W8A8-dyn 5.9e-7, O2
# 6.4e-5, O1 4.0e-4, ZeroQuant 6.0e-3), another GEMM's or tensor's input is off by O(1).
MAX_INPUT_REL_L2 = 5e-2


@dataclass(frozen=True)
class ExportCheck:
    act_elements: int
    act_mismatch_fraction: float  # fraction of layer-0 GEMM-input elements off the plan's quantization of
    #                               the graph's own float input
    act_max_step_diff: float  # largest difference in quantization steps (1.0 = a rounding flip)
    weights_only_max_rel: float  # weights-only Q/DQ graph vs PyTorch fake quant, max |d| / max |ref|
    weights_identical: bool  # the shipped graph's INT8 weights and scales are the checked ones, bit for bit
    logits_rel_l2: float  # full graph vs fake quant, end to end (amplified flips; informational)
    logits_top1: float
    act_input_rel_l2: float = 0.0  # layer-0 GEMM float inputs, graph vs PyTorch: largest relative L2

    def __bool__(self) -> bool:
        return (self.act_mismatch_fraction <= MAX_FLIP_FRACTION and self.act_max_step_diff <= 1.0 + 1e-3
                and self.act_input_rel_l2 <= MAX_INPUT_REL_L2
                and self.weights_only_max_rel <= MAX_WEIGHTS_ONLY_REL and self.weights_identical)

    def __str__(self) -> str:
        return (f"layer-0 activations: {self.act_mismatch_fraction:.2e} of {self.act_elements} elements differ "
                f"from the plan's quantization of the graph's own inputs (max {self.act_max_step_diff:.2f} steps; "
                f"limit {MAX_FLIP_FRACTION:g}, 1 step), inputs vs PyTorch {self.act_input_rel_l2:.2e} relative L2 "
                f"(limit {MAX_INPUT_REL_L2:g}); weights-only "
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
    first = [m for m in plan if m.startswith(first_layer_prefix) and quantizes_input(plan[m])]
    nodes = {n.name: n for n in quant.graph.node}
    ref_nodes = {n.name: n for n in ref.graph.node}
    gemm_in = {m: nodes[node_of[m]].input[0] for m in first}  # what the GEMM reads: the quantized input
    float_in = {m: ref_nodes[node_of[m]].input[0] for m in first}  # what the reference GEMM reads
    names = [OUTPUT, *sorted(set(gemm_in.values()) | set(float_in.values()))]
    added = [onnx.helper.make_empty_tensor_value_info(t) for t in names[1:]]
    quant.graph.output.extend(added)  # probe outputs, removed again below
    try:
        got = dict(zip(names, _session(quant, quant_dir).run(names, {INPUT: ids.astype(np.int64)})))
    finally:
        for _ in added:
            quant.graph.output.pop()

    captured: dict[str, np.ndarray] = {}  # each module's float input, before fake quantization's pre-hook
    handles = [model.get_submodule(m).register_forward_pre_hook(
        lambda _mod, args, _m=m: captured.__setitem__(_m, args[0].detach().float().cpu().numpy().copy())) for m in first]
    try:
        with fake_quantized(model, plan):
            want = torch_logits_fn(model)(ids)
    finally:
        for h in handles:
            h.remove()
    elements, mismatched, max_steps, input_rel = 0, 0, 0.0, 0.0
    for m in first:
        x = torch.from_numpy(got[float_in[m]])
        d = np.abs(got[gemm_in[m]] - quantize_input(x, plan[m]).numpy()) / input_step(plan[m], x)
        elements += d.size
        mismatched += int((d > 1e-3).sum())
        max_steps = max(max_steps, float(d.max()))
        t = captured[m]
        if t.shape != x.shape and t.size == x.numel() and t.shape[-1] == x.shape[-1]:
            t = t.reshape(x.shape)  # GPT-2's Conv1D multiplies the (batch * tokens, channels) view
        input_rel = max(input_rel, float(np.linalg.norm(x.numpy() - t) / max(np.linalg.norm(t), 1e-12))
                        if t.shape == x.shape else float("inf"))

    weights_only = weights_only_plan(plan)
    wq = insert_qdq(ref, weights_only, level="weights-only-check", base_dir=ref_dir)
    w_got = _session(wq, ref_dir).run([OUTPUT], {INPUT: ids.astype(np.int64)})[0]
    with fake_quantized(model, weights_only):
        w_want = torch_logits_fn(model)(ids)
    g = got[OUTPUT]
    return ExportCheck(
        weights_identical=_weights_identical(quant, wq, quant_dir),
        act_elements=elements, act_mismatch_fraction=mismatched / max(elements, 1), act_max_step_diff=max_steps,
        act_input_rel_l2=input_rel,
        weights_only_max_rel=float(np.abs(w_got - w_want).max() / max(np.abs(w_want).max(), 1e-12)),
        logits_rel_l2=float(np.linalg.norm(g - want) / max(np.linalg.norm(want), 1e-12)),
        logits_top1=float((g.argmax(-1) == want.argmax(-1)).mean()))


def quantizes_input(q: GemmQuant) -> bool:
    return q.act_amax is not None or q.act_dynamic is not None


def input_step(q: GemmQuant, x: torch.Tensor) -> np.ndarray | float:
    """The quantization step of the float GEMM input ``x`` under ``q``: the static scale, or the
    run-time scale of ``x`` (a scalar per tensor, ``(..., 1)`` per token)."""
    if q.act_amax is not None:
        return float(int8_scale(q.act_amax))
    return dynamic_scale(x, q.act_dynamic == "per-token").numpy()


def weights_only_plan(plan: dict[str, GemmQuant]) -> dict[str, GemmQuant]:
    """``plan`` with every activation left floating point (static and dynamic): only weight rounding
    remains, which float accumulation order cannot amplify. (Keeping a dynamic activation here made
    the "weights-only" graph of O1/O2/ZeroQuant quantize activations, and 30 layers of amplified
    one-step flips failed it on SmolLM2 at 6e-2 instead of float rounding.)"""
    return {m: replace(q, act_amax=None, act_dynamic=None) for m, q in plan.items()}


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
