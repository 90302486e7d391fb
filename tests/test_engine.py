"""The ONNX Runtime engine runs every quantized GEMM in an integer kernel, OPT's fc1/fc2 too.

OPT's MLP is a 2-D ``Gemm`` (with a float bias in pretrained weights) and fc1 feeds a Relu. ONNX
Runtime's Q/DQ fusion skips a Gemm whose bias is not an INT32 DequantizeLinear, and a GEMM whose only
consumer is a Relu unless a QuantizeLinear right after makes the Relu redundant (symmetric Q/DQ never
does): OPT-1.3B's engine ran 120 of its 144 quantized GEMMs as integer kernels. The engine's input is
rewritten (``engine.split_gemm_bias``, ``engine.relus_to_max``), the Q/DQ graph TensorRT builds is not.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_tensor_absmax
from sq2trt.config import QuantConfig
from sq2trt.engine import build_ort_engine, relus_to_max, session, split_gemm_bias
from sq2trt.export import INPUT, OUTPUT, export_reference, insert_qdq, save_onnx
from sq2trt.models import load_model
from sq2trt.plan import make_plan

INTEGER_KERNELS = {"MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "QLinearMatMul"}


@pytest.fixture(scope="module", params=["zero-bias", "bias"])
def opt_o3(request, tmp_path_factory):
    """random:opt at O3; "bias": nonzero linear biases, as pretrained OPT has (the tiny random model's are
    zero, and the exporter drops a zero bias, which changes the GEMM's form)."""
    model = load_model("random:opt").model
    if request.param == "bias":
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp(f"opt-{request.param}")
    export_reference(model, d / "ref.onnx")
    names = quantized_linear_names(model, get_arch(model))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    amax = {k: float(v) for k, v in collect(model, names, ids, per_tensor_absmax).items()}
    plan = make_plan(names, QuantConfig(level="O3"), amax)
    save_onnx(insert_qdq(onnx.load(str(d / "ref.onnx")), plan, level="O3"), d / "O3.onnx")
    return d, names, request.param


def test_every_quantized_opt_gemm_runs_in_an_integer_kernel(opt_o3):
    d, names, kind = opt_o3
    info = build_ort_engine(d / "O3.onnx", d / "O3.ort.onnx", device="cpu")
    integer = sum(v for k, v in info["ops"].items() if k in INTEGER_KERNELS)
    assert integer == len(names) == 12, info["ops"]
    if kind == "bias":  # fc1 and fc2 of each layer; fc1's Relu then reads the Add
        assert (info["bias_split"], info["relu_as_max"]) == (4, 0), info
    else:  # the exporter dropped the zero biases: fc1 feeds its Relu directly
        assert (info["bias_split"], info["relu_as_max"]) == (0, 2), info
    assert "DequantizeLinear" not in info["ops"], info["ops"]  # no GEMM left on dequantized weights
    assert not list(d.glob(".tmp-*")), "the rewritten copy was left behind"
    # the source graph, which TensorRT builds, keeps its Relus
    assert sum(n.op_type == "Relu" for n in onnx.load(str(d / "O3.onnx")).graph.node) == 2


def test_the_rewritten_engine_computes_the_q_dq_graph(opt_o3):
    """Engine vs the exact Q/DQ graph (ORT without fusions): the same numbers up to the integer kernels'
    rounding order (measured on these tiny models: 0.3% relative L2 with biases, 1.3% without, where the
    engine before the rewrite was 1.0%)."""
    d, _, _ = opt_o3
    build_ort_engine(d / "O3.onnx", d / "O3.ort.onnx", device="cpu")
    ids = (np.arange(64).reshape(2, 32) * 7) % 512
    exact = session(d / "O3.onnx", device="cpu", optimize=False).run([OUTPUT], {INPUT: ids})[0]
    got = session(d / "O3.ort.onnx", device="cpu").run([OUTPUT], {INPUT: ids})[0]
    rel = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    assert rel < 0.03, rel
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.95


def test_only_quantized_gemms_are_rewritten(opt_o3):
    d, _, kind = opt_o3
    ref = onnx.load(str(d / "ref.onnx"), load_external_data=False)  # float GEMMs: nothing to fuse
    assert split_gemm_bias(ref) == 0 and relus_to_max(ref) == 0
    q = onnx.load(str(d / "O3.onnx"), load_external_data=False)
    split, relus = split_gemm_bias(q), relus_to_max(q)
    assert (split, relus) == ((4, 0) if kind == "bias" else (0, 2))
    assert split_gemm_bias(q) == 0 and relus_to_max(q) == 0  # idempotent
    onnx.checker.check_model(q)  # still a valid, topologically sorted graph
    if kind == "bias":
        gemms = [n for n in q.graph.node if n.op_type == "Gemm"]
        assert len(gemms) == 4 and all(len(n.input) == 2 for n in gemms)
    else:
        maxes = [n for n in q.graph.node if n.op_type == "Max"]
        zero = {t.name: t for t in q.graph.initializer}[maxes[0].input[1]]
        assert onnx.numpy_helper.to_array(zero) == 0 and zero.data_type == onnx.TensorProto.FLOAT
