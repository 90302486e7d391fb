"""Tests for sq2trt.lint: a good Q/DQ graph passes clean, and each rule fires on a graph breaking it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sq2trt.lint import RULES, Finding, LintInputError, LintReport, lint_model, rule_ids

OPSET = 21
D_IN, D_HID, D_OUT = 8, 16, 4
RNG_SEED = 0


# ---------------------------------------------------------------------------------------------
# Graph builders
# ---------------------------------------------------------------------------------------------


def _finish(nodes, inputs, outputs, inits, metadata=None, opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _metadata(level="O3", gemms=("fc1", "fc2"), bmm="false") -> dict[str, str]:
    return {
        "sq2trt.level": level,
        "sq2trt.quantized_gemms": json.dumps(list(gemms)),
        "sq2trt.quantize_bmm": bmm,
    }


def _params(seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    p = {}
    for layer, (k, n) in (("fc1", (D_IN, D_HID)), ("fc2", (D_HID, D_OUT))):
        w = rng.standard_normal((k, n)).astype(np.float32)
        w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output channel, [N]
        p[f"{layer}_w_q"] = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
        p[f"{layer}_w_scale"] = w_scale
        p[f"{layer}_w_zp"] = np.zeros(n, np.int8)
        p[f"{layer}_in_scale"] = np.array(0.02 if layer == "fc1" else 0.05, np.float32)
        p[f"{layer}_in_zp"] = np.array(0, np.int8)
        p[f"{layer}_b"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return p


def make_mlp(
    *,
    x_shape=(2, 3, D_IN),
    metadata: dict | None = None,
    weight_layout: str = "KN",
) -> onnx.ModelProto:
    """The GOOD quantized 2-layer MLP, in sq2trt's export convention.

    x -> Q -> DQ -> MatMul(fc1, B = DQ(int8 W1, axis=1)) -> Add(bias) -> Relu
      -> Q -> DQ -> MatMul(fc2, B = DQ(int8 W2, axis=1)) -> Add(bias) -> y

    weight_layout "NK": weights stored [N, K] -> DQ(axis=0) -> Transpose -> MatMul (also valid).
    """
    p = _params()
    inits, nodes = [], []
    h = "x"
    for layer in ("fc1", "fc2"):
        w_q = p[f"{layer}_w_q"]
        axis = 1
        if weight_layout == "NK":
            w_q, axis = np.ascontiguousarray(w_q.T), 0
        for name in ("in_scale", "in_zp", "w_scale", "w_zp", "b"):
            inits.append(numpy_helper.from_array(p[f"{layer}_{name}"], f"{layer}_{name}"))
        inits.append(numpy_helper.from_array(w_q, f"{layer}_w_q"))
        qdq_in = [h, f"{layer}_in_scale", f"{layer}_in_zp"]
        nodes += [
            helper.make_node("QuantizeLinear", qdq_in, [f"{layer}_xq"], name=f"{layer}_in_q"),
            helper.make_node(
                "DequantizeLinear",
                [f"{layer}_xq", f"{layer}_in_scale", f"{layer}_in_zp"],
                [f"{layer}_xdq"],
                name=f"{layer}_in_dq",
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{layer}_w_q", f"{layer}_w_scale", f"{layer}_w_zp"],
                [f"{layer}_w"],
                name=f"{layer}_w_dq",
                axis=axis,
            ),
        ]
        w = f"{layer}_w"
        if weight_layout == "NK":
            nodes.append(helper.make_node("Transpose", [w], [f"{layer}_wt"], name=f"{layer}_w_t"))
            w = f"{layer}_wt"
        nodes += [
            helper.make_node("MatMul", [f"{layer}_xdq", w], [f"{layer}_mm"], name=layer),
            helper.make_node("Add", [f"{layer}_mm", f"{layer}_b"], [f"{layer}_out"], name=f"{layer}_bias"),
        ]
        h = f"{layer}_out"
        if layer == "fc1":
            nodes.append(helper.make_node("Relu", [h], ["relu1_out"], name="relu1"))
            h = "relu1_out"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], D_OUT])
    return _finish(nodes, [x], [y], inits, _metadata() if metadata is None else metadata)


def reference_mlp(x: np.ndarray) -> np.ndarray:
    """NumPy fake-quant reference of make_mlp (round half to even, saturate to int8)."""
    p = _params()

    def fake_quant(v, scale):
        return (np.clip(np.rint(v / scale), -128, 127) * scale).astype(np.float32)

    h = x.astype(np.float32)
    for layer in ("fc1", "fc2"):
        w = p[f"{layer}_w_q"].astype(np.float32) * p[f"{layer}_w_scale"]
        h = fake_quant(h, p[f"{layer}_in_scale"]) @ w + p[f"{layer}_b"]
        if layer == "fc1":
            h = np.maximum(h, 0)
    return h


def make_bmm(*, metadata: dict | None = None) -> onnx.ModelProto:
    """Attention-like BMM: both inputs are activations with Q/DQ (no constant input)."""
    nodes, inits = [], [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    for name in ("qh", "kt"):
        nodes += [
            helper.make_node("QuantizeLinear", [name, "s", "zp"], [f"{name}_q"], name=f"{name}_quant"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "zp"], [f"{name}_dq"], name=f"{name}_dequant"),
        ]
    nodes.append(helper.make_node("MatMul", ["qh_dq", "kt_dq"], ["scores"], name="bmm"))
    inputs = [
        helper.make_tensor_value_info("qh", TensorProto.FLOAT, [2, 4, 8]),
        helper.make_tensor_value_info("kt", TensorProto.FLOAT, [2, 8, 4]),
    ]
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4, 4])
    meta = {"sq2trt.level": "O3", "sq2trt.quantized_gemms": "[]", "sq2trt.quantize_bmm": "false"}
    return _finish(nodes, inputs, [out], inits, meta if metadata is None else metadata)


def make_w4a16(*, block: bool = True, dtype: int = TensorProto.INT4) -> onnx.ModelProto:
    """W4A16: int4 weight [K, N] -> DQ(block_size=4 along K, scale [K/4, N]) -> MatMul; float acts."""
    rng = np.random.default_rng(1)
    k, n, bs = 8, 4, 4
    w_q = rng.integers(-8, 8, (k, n)) if dtype == TensorProto.INT4 else rng.integers(0, 16, (k, n))
    inits = [helper.make_tensor("w_q", dtype, [k, n], w_q.reshape(-1).tolist())]
    if block:
        scale = (0.01 + 0.01 * rng.random((k // bs, n))).astype(np.float32)
        dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=0, block_size=bs)
    else:
        scale = np.full(n, 0.01, np.float32)
        dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=1)
    inits.append(numpy_helper.from_array(scale, "w_scale"))
    nodes = [dq, helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])
    return _finish(nodes, [x], [y], inits, _metadata(level="W4A16", gemms=["fc"]))


def make_gemm(*, axis: int = 0) -> onnx.ModelProto:
    """Gemm with transB=1: weight stored [N, K], per-channel axis must be 0."""
    rng = np.random.default_rng(2)
    k, n = 8, 6
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, (n, k)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.full(n if axis == 0 else k, 0.01, np.float32), "w_s"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xdq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w_dq", axis=axis),
        helper.make_node("Gemm", ["xdq", "w"], ["y"], name="gemm", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])
    return _finish(nodes, [x], [y], inits, _metadata(gemms=["gemm"]))


# ---------------------------------------------------------------------------------------------
# Mutation helpers
# ---------------------------------------------------------------------------------------------


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(value, name))


def set_attr(model: onnx.ModelProto, node_name: str, key: str, value) -> None:
    n = node(model, node_name)
    for a in list(n.attribute):
        if a.name == key:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(key, value))


def insert_before(model: onnx.ModelProto, consumer: str, index: int, op: str, name: str, extra=(), **attrs):
    """Insert `op` on input `index` of node `consumer`."""
    n = node(model, consumer)
    src = n.input[index]
    new = helper.make_node(op, [src, *extra], [f"{name}_out"], name=name, **attrs)
    n.input[index] = f"{name}_out"
    pos = list(model.graph.node).index(n)
    model.graph.node.insert(pos, new)


def findings(report: LintReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def assert_fires(report: LintReport, rule: str, node_name: str, severity: str = "error") -> Finding:
    hits = findings(report, rule)
    assert hits, f"expected [{rule}] finding, got:\n{report}"
    match = [f for f in hits if f.node == node_name]
    assert match, f"[{rule}] fired on {[f.node for f in hits]}, expected {node_name}:\n{report}"
    assert match[0].severity == severity
    assert bool(report) is (severity == "warning" and not report.errors)
    return match[0]


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Run on ONNX Runtime CPU with the ONNX-spec Q/DQ semantics (basic graph optimizations).

    Extended optimizations are avoided on purpose: in onnxruntime 1.31 (CPU) the int8 -> uint8
    QDQ rewrite (QDQS8ToU8Transformer) makes an opset-21 MatMul+Add on 3-D activations fail to load
    ("output_dtype INT8 does not match y_zero_point type UINT8"), and on AVX2-only CPUs (no VNNI)
    its U8S8 kernels saturate with full-range int8 weights, so they do not match the spec math.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ---------------------------------------------------------------------------------------------
# Good graphs
# ---------------------------------------------------------------------------------------------


def test_rule_table():
    ids = rule_ids()
    assert len(ids) == len(set(ids))
    for rule_id in (
        "scale-not-constant", "scale-not-positive", "zero-point-nonzero", "unsupported-type",
        "dynamic-quantize", "wrong-axis", "block-scale-on-int8", "qdq-not-adjacent", "gemv-qdq",
        "bmm-qdq", "missing-qdq", "output-quantized",
    ):
        assert rule_id in ids
    assert all(r.doc for r in RULES), "every rule documents the TensorRT requirement it encodes"


def test_good_mlp_passes_clean():
    model = make_mlp()
    onnx.checker.check_model(model, full_check=True)
    report = lint_model(model)
    assert report.findings == (), str(report)
    assert bool(report) and report.checked_gemms == 2
    assert report.model == "<in-memory>"
    assert "PASSED" in str(report)


def test_good_mlp_runs_in_onnxruntime():
    model = make_mlp()
    x = np.random.default_rng(5).standard_normal((2, 3, D_IN)).astype(np.float32)
    (y,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(y, reference_mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(lambda: make_mlp(weight_layout="NK"), id="dq-axis0-transpose"),
        pytest.param(lambda: make_mlp(metadata={}), id="no-metadata"),
        pytest.param(lambda: make_mlp(x_shape=("batch", "seq", D_IN)), id="dynamic-shapes"),
        pytest.param(lambda: make_gemm(axis=0), id="gemm-transB"),
        pytest.param(make_w4a16, id="w4a16-int4-blocked"),
        pytest.param(lambda: make_bmm(metadata={"sq2trt.quantize_bmm": "true"}), id="bmm-requested"),
        pytest.param(lambda: make_mlp(metadata=_metadata(level="fp", gemms=[])), id="fp-level"),
    ],
)
def test_good_variants_pass_clean(variant):
    model = variant()
    report = lint_model(model)
    assert report.findings == (), str(report)


def _opset13() -> onnx.ModelProto:
    model = make_mlp()
    model.opset_import[0].version = 13
    return model


def _per_tensor_weights() -> onnx.ModelProto:
    model = make_mlp()
    for layer in ("fc1", "fc2"):
        set_attr(model, f"{layer}_w_dq", "axis", 1)
        set_init(model, f"{layer}_w_scale", np.array(0.02, np.float32))
        set_init(model, f"{layer}_w_zp", np.array(0, np.int8))
    return model


def _float_weight_qdq() -> onnx.ModelProto:
    """fp32 weight initializer -> Q(axis=1) -> DQ(axis=1) -> MatMul (pytorch-quantization style)."""
    model = make_mlp()
    p = _params()
    set_init(model, "fc2_w_f", p["fc2_w_q"].astype(np.float32) * p["fc2_w_scale"])
    dq = node(model, "fc2_w_dq")
    dq.input[0] = "fc2_w_fq"
    pos = list(model.graph.node).index(dq)
    model.graph.node.insert(pos, helper.make_node(
        "QuantizeLinear", ["fc2_w_f", "fc2_w_scale", "fc2_w_zp"], ["fc2_w_fq"], name="fc2_w_q", axis=1))
    return model


def _shared_qdq() -> onnx.ModelProto:
    """One activation Q/DQ and one weight DQ feeding two MatMuls (q/k/v-style sharing)."""
    model = make_mlp(metadata=_metadata(gemms=["fc1", "fc1_twin", "fc2"]))
    model.graph.node.append(helper.make_node("MatMul", ["fc1_xdq", "fc1_w"], ["twin"], name="fc1_twin"))
    model.graph.output.append(helper.make_tensor_value_info("twin", TensorProto.FLOAT, [2, 3, D_HID]))
    return model


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(_opset13, id="opset13"),
        pytest.param(_per_tensor_weights, id="per-tensor-weights"),
        pytest.param(_float_weight_qdq, id="float-weight-q-dq"),
        pytest.param(_shared_qdq, id="shared-qdq"),
    ],
)
def test_more_good_variants_pass_clean_and_run(variant):
    model = variant()
    assert lint_model(model).findings == (), str(lint_model(model))
    x = np.random.default_rng(7).standard_normal((2, 3, D_IN)).astype(np.float32)
    run_ort(model, {"x": x})


def test_lint_does_not_need_tensorrt():
    import sys

    lint_model(make_mlp())
    assert "tensorrt" not in sys.modules


def test_good_variants_run_in_onnxruntime():
    x = np.random.default_rng(6).standard_normal((2, 3, D_IN)).astype(np.float32)
    (y,) = run_ort(make_mlp(weight_layout="NK"), {"x": x})
    np.testing.assert_allclose(y, reference_mlp(x), rtol=1e-5, atol=1e-5)
    run_ort(make_gemm(axis=0), {"x": x[0]})
    run_ort(make_w4a16(), {"x": x})


def test_constant_node_scale_is_fine():
    model = make_mlp()
    n = node(model, "fc2_in_q")
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["c_scale"], name="c", value_float=0.05)
    )
    n.input[1] = "c_scale"
    assert lint_model(model).findings == ()


def test_path_with_external_data(tmp_path):
    model = make_mlp()
    w_scale = _params()["fc1_w_scale"].copy()
    w_scale[2] = -1.0
    set_init(model, "fc1_w_scale", w_scale)
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    report = lint_model(path)
    assert report.model == str(path)
    assert_fires(report, "scale-not-positive", "fc1_w_dq")
    assert len(report.findings) == 1, str(report)


# ---------------------------------------------------------------------------------------------
# One test per rule
# ---------------------------------------------------------------------------------------------


def test_scale_not_constant():
    model = make_mlp()
    # fc1's activation scale computed at run time: max|x| / 127
    model.graph.initializer.append(numpy_helper.from_array(np.array(127.0, np.float32), "c127"))
    model.graph.node.insert(0, helper.make_node("Abs", ["x"], ["ax"], name="absx"))
    model.graph.node.insert(1, helper.make_node("ReduceMax", ["ax"], ["amax"], name="amax", keepdims=0))
    model.graph.node.insert(2, helper.make_node("Div", ["amax", "c127"], ["dyn_scale"], name="dyn_scale"))
    node(model, "fc1_in_q").input[1] = "dyn_scale"
    node(model, "fc1_in_dq").input[1] = "dyn_scale"
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})  # still real ONNX
    report = lint_model(model)
    f = assert_fires(report, "scale-not-constant", "fc1_in_q")
    assert "O3" in f.message and "Div" in f.message
    assert len(findings(report, "scale-not-constant")) == 1  # Q/DQ pair reported once


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_scale_not_positive(bad):
    model = make_mlp()
    w_scale = _params()["fc2_w_scale"].copy()
    w_scale[1] = bad
    set_init(model, "fc2_w_scale", w_scale)
    assert_fires(lint_model(model), "scale-not-positive", "fc2_w_dq")


def test_scale_not_positive_activation():
    model = make_mlp()
    set_init(model, "fc1_in_scale", np.array(0.0, np.float32))
    report = lint_model(model)
    assert_fires(report, "scale-not-positive", "fc1_in_q")
    assert len(findings(report, "scale-not-positive")) == 1


def test_zero_point_nonzero():
    model = make_mlp()
    set_init(model, "fc1_in_zp", np.array(3, np.int8))
    f = assert_fires(lint_model(model), "zero-point-nonzero", "fc1_in_q")
    assert "symmetric" in f.message


def test_unsupported_type_uint8_activation():
    model = make_mlp()
    set_init(model, "fc2_in_zp", np.array(0, np.uint8))
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    f = assert_fires(report, "unsupported-type", "fc2_in_q")
    assert "int8" in f.message
    assert len(findings(report, "unsupported-type")) == 1


def test_unsupported_type_uint8_weight():
    model = make_mlp()
    p = _params()
    set_init(model, "fc1_w_q", (p["fc1_w_q"].astype(np.int16) + 128).astype(np.uint8))
    set_init(model, "fc1_w_zp", np.zeros(D_HID, np.uint8))
    assert_fires(lint_model(model), "unsupported-type", "fc1_w_dq")


def test_unsupported_type_implicit_uint8_is_warning():
    model = make_mlp()
    del node(model, "fc1_in_q").input[2]
    del node(model, "fc1_in_dq").input[2]
    assert_fires(lint_model(model), "unsupported-type", "fc1_in_q", severity="warning")
    set_attr(model, "fc1_in_q", "output_dtype", TensorProto.INT8)
    assert lint_model(model).findings == ()


def test_unsupported_type_fp8_is_warning():
    model = make_mlp()
    model.graph.initializer.append(helper.make_tensor("fp8_zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    node(model, "fc1_in_q").input[2] = "fp8_zp"
    node(model, "fc1_in_dq").input[2] = "fp8_zp"
    f = assert_fires(lint_model(model), "unsupported-type", "fc1_in_q", severity="warning")
    assert "Hopper" in f.message


def test_unsupported_type_int4_without_blocks():
    report = lint_model(make_w4a16(block=False))
    assert_fires(report, "unsupported-type", "w_dq")


def test_unsupported_type_int4_activation():
    model = make_mlp()
    model.graph.initializer.append(helper.make_tensor("i4_zp", TensorProto.INT4, [], [0]))
    node(model, "fc1_in_q").input[2] = "i4_zp"
    node(model, "fc1_in_dq").input[2] = "i4_zp"
    assert_fires(lint_model(model), "unsupported-type", "fc1_in_q")


def test_dynamic_quantize():
    model = make_mlp()
    q = node(model, "fc1_in_q")
    model.graph.node.remove(q)
    model.graph.node.insert(
        0, helper.make_node("DynamicQuantizeLinear", ["x"], ["fc1_xq", "dyn_s", "dyn_zp"], name="fc1_dyn_q")
    )
    dq = node(model, "fc1_in_dq")
    dq.input[1], dq.input[2] = "dyn_s", "dyn_zp"
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    f = assert_fires(report, "dynamic-quantize", "fc1_dyn_q")
    assert "O3" in f.message
    # the run-time uint8 scales are reported by their own rules too
    assert findings(report, "scale-not-constant") and findings(report, "unsupported-type")


def test_qoperator_op():
    model = make_mlp()
    n = node(model, "fc1")
    n.op_type = "MatMulInteger"
    n.input[0], n.input[1] = "fc1_xq", "fc1_w_q"
    assert_fires(lint_model(model), "qoperator-op", "fc1")


def test_wrong_axis_weight():
    model = make_mlp()
    set_attr(model, "fc1_w_dq", "axis", 0)
    set_init(model, "fc1_w_scale", np.full(D_IN, 0.01, np.float32))  # consistent, still wrong
    set_init(model, "fc1_w_zp", np.zeros(D_IN, np.int8))
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    f = assert_fires(lint_model(model), "wrong-axis", "fc1_w_dq")
    assert "axis=1" in f.message


def test_wrong_axis_through_transpose():
    model = make_mlp(weight_layout="NK")
    set_attr(model, "fc2_w_dq", "axis", 1)
    set_init(model, "fc2_w_scale", np.full(D_HID, 0.01, np.float32))
    set_init(model, "fc2_w_zp", np.zeros(D_HID, np.int8))
    f = assert_fires(lint_model(model), "wrong-axis", "fc2_w_dq")
    assert "axis=0" in f.message


def test_wrong_axis_gemm_transB():
    f = assert_fires(lint_model(make_gemm(axis=1)), "wrong-axis", "w_dq")
    assert "axis=0" in f.message


def test_wrong_axis_per_channel_activation():
    model = make_mlp()
    set_init(model, "fc1_in_scale", np.full(D_IN, 0.02, np.float32))
    set_init(model, "fc1_in_zp", np.zeros(D_IN, np.int8))
    set_attr(model, "fc1_in_q", "axis", -1)
    set_attr(model, "fc1_in_dq", "axis", -1)
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    f = assert_fires(report, "wrong-axis", "fc1_in_q")
    assert "per-tensor" in f.message
    assert len(findings(report, "wrong-axis")) == 1


def test_block_scale_on_int8():
    model = make_mlp()
    block = 4
    set_attr(model, "fc1_w_dq", "axis", 0)
    set_attr(model, "fc1_w_dq", "block_size", block)
    set_init(model, "fc1_w_scale", np.full((D_IN // block, D_HID), 0.01, np.float32))
    set_init(model, "fc1_w_zp", np.zeros((D_IN // block, D_HID), np.int8))
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    assert_fires(report, "block-scale-on-int8", "fc1_w_dq")
    assert not findings(report, "wrong-axis")


def test_qdq_not_adjacent_error():
    model = make_mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.full(D_HID, 1.5, np.float32), "smooth"))
    insert_before(model, "fc2", 0, "Mul", "unfolded_smooth", extra=["smooth"])
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    f = assert_fires(report, "qdq-not-adjacent", "fc2")
    assert "Mul" in f.message and "fc2_in_dq" in f.message
    assert not findings(report, "missing-qdq")  # the same defect is reported once


def test_qdq_not_adjacent_foreign_model():
    model = make_mlp(metadata={})
    insert_before(model, "fc2", 0, "Sigmoid", "act")
    assert_fires(lint_model(model), "qdq-not-adjacent", "fc2")


def test_qdq_not_adjacent_movement_on_activation_is_warning():
    model = make_mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.array([6, D_HID], np.int64), "shape2d"))
    insert_before(model, "fc2", 0, "Reshape", "flatten_tokens", extra=["shape2d"])
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    f = assert_fires(lint_model(model), "qdq-not-adjacent", "fc2", severity="warning")
    assert "Reshape" in f.message and "1604" in f.message


def test_gemv_qdq():
    report = lint_model(make_mlp(x_shape=(1, 1, D_IN)))
    assert_fires(report, "gemv-qdq", "fc1", severity="warning")
    assert_fires(report, "gemv-qdq", "fc2", severity="warning")
    # batch > 1 with one token: a weight GEMM folds batch into M, so not a GEMV
    assert not findings(lint_model(make_mlp(x_shape=(4, 1, D_IN))), "gemv-qdq")


def test_bmm_qdq():
    report = lint_model(make_bmm())
    f = assert_fires(report, "bmm-qdq", "bmm", severity="warning")
    assert "--quantize-bmm" in f.message
    assert lint_model(make_bmm(), allow_bmm_qdq=True).findings == ()
    assert lint_model(make_bmm(metadata={"sq2trt.quantize_bmm": "true"})).findings == ()
    run_ort(make_bmm(), {"qh": np.ones((2, 4, 8), np.float32), "kt": np.ones((2, 8, 4), np.float32)})


def test_missing_qdq_weight():
    model = make_mlp()
    dq = node(model, "fc2_w_dq")
    model.graph.node.remove(dq)
    w = _params()["fc2_w_q"].astype(np.float32) * _params()["fc2_w_scale"]
    set_init(model, "fc2_w", w)
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    f = assert_fires(lint_model(model), "missing-qdq", "fc2")
    assert "B (weight)" in f.message


def _drop_act_qdq(model: onnx.ModelProto, layer: str) -> None:
    src = node(model, f"{layer}_in_q").input[0]
    for name in (f"{layer}_in_q", f"{layer}_in_dq"):
        model.graph.node.remove(node(model, name))
    node(model, layer).input[0] = src


def test_missing_qdq_activation():
    model = make_mlp()
    _drop_act_qdq(model, "fc1")
    f = assert_fires(lint_model(model), "missing-qdq", "fc1")
    assert "A (activation)" in f.message


def test_missing_qdq_respects_level_and_foreign_models():
    model = make_mlp(metadata=_metadata(level="W4A16"))
    _drop_act_qdq(model, "fc1")
    assert not findings(lint_model(model), "missing-qdq")  # W4A16: activations stay float
    model = make_mlp(metadata={})
    _drop_act_qdq(model, "fc1")
    assert not findings(lint_model(model), "missing-qdq")  # no intent metadata: no claim
    model = make_mlp(metadata=_metadata(gemms=["fc2"]))
    _drop_act_qdq(model, "fc1")
    assert lint_model(model).findings == ()  # fc1 not listed


def test_output_quantized():
    model = make_mlp()
    n = node(model, "fc2_bias")
    n.input[0] = "fc2_mm_dq"
    model.graph.node.insert(
        list(model.graph.node).index(n),
        helper.make_node("QuantizeLinear", ["fc2_mm", "fc2_in_scale", "fc2_in_zp"], ["fc2_mm_q"], name="fc2_out_q"),
    )
    model.graph.node.insert(
        list(model.graph.node).index(n),
        helper.make_node("DequantizeLinear", ["fc2_mm_q", "fc2_in_scale", "fc2_in_zp"], ["fc2_mm_dq"], name="fc2_out_dq"),
    )
    run_ort(model, {"x": np.ones((2, 3, D_IN), np.float32)})
    report = lint_model(model)
    assert_fires(report, "output-quantized", "fc2_out_q", severity="warning")
    assert len(report.findings) == 1, str(report)


def test_output_q_feeding_next_gemm_is_input_quantization():
    model = make_mlp()
    # fc1's output goes straight into fc2's Q/DQ (no bias / activation in between): fine
    node(model, "fc2_in_q").input[0] = "fc1_mm"
    assert not findings(lint_model(model), "output-quantized")


def test_bad_metadata():
    model = make_mlp(metadata={"sq2trt.level": "O3", "sq2trt.quantized_gemms": "[fc1"})
    assert_fires(lint_model(model), "bad-metadata", "<metadata>", severity="warning")
    model = make_mlp(metadata=_metadata(gemms=["fc1", "fc2", "lm_head"]))
    assert_fires(lint_model(model), "bad-metadata", "lm_head", severity="warning")


# ---------------------------------------------------------------------------------------------
# Report and inputs
# ---------------------------------------------------------------------------------------------


def test_report_to_dict_and_str():
    model = make_mlp(x_shape=(1, 1, D_IN))
    set_init(model, "fc1_in_zp", np.array(3, np.int8))
    report = lint_model(model)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False and d["checked_gemms"] == 2
    assert d["errors"] == 1 and d["warnings"] == 2
    assert {f["rule"] for f in d["findings"]} == {"zero-point-nonzero", "gemv-qdq"}
    text = str(report)
    assert len(text.splitlines()) == len(report.findings) + 1
    assert "FAILED" in text.splitlines()[-1]
    assert "[zero-point-nonzero] fc1_in_q" in text


def test_finding_rejects_bad_severity():
    with pytest.raises(ValueError):
        Finding("x", "n", "m", severity="fatal")


def test_corrupt_file_raises(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(LintInputError, match="bad.onnx"):
        lint_model(bad)


def test_truncated_file_raises(tmp_path):
    data = make_mlp().SerializeToString()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(LintInputError):
        lint_model(str(trunc))


def test_missing_file_raises(tmp_path):
    with pytest.raises(LintInputError, match="not found"):
        lint_model(tmp_path / "nope.onnx")
    assert issubclass(LintInputError, ValueError)
