"""Export fidelity and the TensorRT Q/DQ rules on the pipeline's own graphs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax, per_tensor_absmax
from sq2trt.config import QuantConfig
from sq2trt.engine import session
from sq2trt.evaluate import ort_logits_fn, torch_logits_fn
from sq2trt.export import (check_against_torch, export_reference, get_metadata, insert_qdq, load_onnx,
                           refresh_weights, save_onnx)
from sq2trt.fakequant import fake_quantized
from sq2trt.lint import lint_model
from sq2trt.models import load_model
from sq2trt.plan import make_plan
from sq2trt.smooth import smooth


@pytest.fixture(scope="module", params=["llama", "opt"])
def exported(request, tmp_path_factory):
    kind = request.param
    loaded = load_model(f"random:{kind}")
    model, arch = loaded.model, get_arch(loaded.model)
    d = tmp_path_factory.mktemp(kind)
    export_reference(model, d / "base.onnx")
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))
    names = quantized_linear_names(model, arch)
    smooth(model, arch, collect(model, names, ids, per_channel_absmax), arch.alpha)
    amax = {k: float(v) for k, v in collect(model, names, ids, per_tensor_absmax).items()}
    return kind, model, names, amax, d


def test_reference_matches_pytorch_at_other_shapes(exported):
    _, model, _, _, d = exported
    ref = refresh_weights(load_onnx(d / "base.onnx"), model)  # smoothed weights into the same graph
    save_onnx(ref, d / "ref.onnx")
    for shape in [(1, 7), (3, 21), (2, 100)]:
        assert check_against_torch(model, d / "ref.onnx", shape=shape) <= 1e-4
    assert load_onnx(d / "ref.onnx").ir_version <= 10  # loadable by onnxruntime 1.31


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_qdq_graph_equals_fake_quant_and_obeys_tensorrt_rules(exported, granularity):
    kind, model, names, amax, d = exported
    ref = refresh_weights(load_onnx(d / "base.onnx"), model)
    plan = make_plan(names, QuantConfig(level="O3", weight_granularity=granularity), amax)
    q = insert_qdq(ref, plan, level="O3")
    path = d / f"o3-{granularity}.onnx"
    save_onnx(q, path)
    onnx.checker.check_model(str(path))

    # Q/DQ semantics (ORT without its fused integer kernels) == PyTorch fake quantization
    ids = np.random.default_rng(0).integers(0, 512, (2, 33))
    got = ort_logits_fn(session(path, device="cpu", optimize=False))(ids)
    with fake_quantized(model, plan):
        want = torch_logits_fn(model)(ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5

    # TensorRT's Q/DQ requirements (docs/tensorrt.md), checked directly ...
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        scale, zp = inits[n.input[1]], inits[n.input[2]]  # constant initializers, not computed
        assert np.isfinite(scale).all() and (scale > 0).all()
        assert zp.dtype == np.int8 and not zp.any()
        assert scale.ndim <= 1
    # ... and by the linter, which must be quiet on our own exports
    report = lint_model(q)
    assert report, str(report)
    assert not report.findings, str(report)

    # Q/DQ on exactly the planned GEMMs: both inputs of each come from a DequantizeLinear
    meta = get_metadata(q)
    gemms = json.loads(meta["sq2trt.quantized_gemms"])
    assert len(gemms) == len(names) and meta["sq2trt.level"] == "O3"
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    for node in q.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            fed = [producers.get(i) == "DequantizeLinear" for i in node.input[:2]]
            assert all(fed) == (node.name in gemms), node.name


def test_fallback_layers_stay_float(exported):
    _, model, names, amax, d = exported
    keep = ".".join(names[-1].split(".")[-3:])  # "1.mlp.down_proj" / "1.fc2": one layer's GEMM
    arch = get_arch(model)
    planned = quantized_linear_names(model, arch, skip=(keep,))
    assert len(planned) == len(names) - 1
    q = insert_qdq(refresh_weights(load_onnx(d / "base.onnx"), model),
                   make_plan(planned, QuantConfig(level="O3"), amax), level="O3")
    assert len(json.loads(get_metadata(q)["sq2trt.quantized_gemms"])) == len(names) - 1


def test_attention_bmm_quantization_option(tmp_path, calib_text, eval_text):
    from sq2trt.cli import main

    from conftest import tiny_args

    assert main(["export", "--model", "random:llama", "--quantize-bmm", *tiny_args(calib_text, eval_text, tmp_path)]) == 0
    q = load_onnx(tmp_path / "random-llama" / "O3" / "O3.onnx")
    assert get_metadata(q)["sq2trt.quantize_bmm"] == "true"
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    linears = set(json.loads(get_metadata(q)["sq2trt.quantized_gemms"]))
    bmms = [n for n in q.graph.node if n.op_type == "MatMul" and n.name not in linears
            and all(producers.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(bmms) == 4  # Q·Kᵀ and P·V in each of the 2 layers
    assert lint_model(q), str(lint_model(q))  # metadata says BMMs were requested: no bmm-qdq warning
    sess = session(tmp_path / "random-llama" / "O3" / "O3.onnx", device="cpu")
    out = sess.run(None, {"input_ids": np.zeros((1, 9), dtype=np.int64)})[0]
    assert np.isfinite(out).all()
