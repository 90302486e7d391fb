"""Every architecture row on a tiny random model: smoothing is exact, the export matches PyTorch,
Q/DQ sits on exactly the table's GEMMs, and every level's Q/DQ graph computes what PyTorch fake
quantization computes.

Tolerance for the graph-vs-fake-quant check (ORT without fusions, ``optimize=False``): the graph
computes the same IEEE operations as PyTorch, but GEMMs accumulate in a different order (~1e-7
relative). An activation that lands within that distance of a rounding boundary flips one INT8 code
(one quantization step, max|x|/127, in one element) in the next quantized GEMM, static or dynamic
scale alike; measured on these tiny models: up to ~1.2e-3 relative on the logits. The bound 2e-3 allows
a few flips and still fails on any real export mistake (a wrong axis, block, zero point or a missing
Q/DQ moves the logits by the quantization error itself, which each test also requires to be 2x larger
than the graph-vs-fake-quant gap).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sq2trt.archs import ARCH_VARIANTS, ARCHS, get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax, per_tensor_absmax
from sq2trt.config import LEVELS, QuantConfig
from sq2trt.errors import UnsupportedArchitectureError
from sq2trt.export import (INPUT, OUTPUT, check_against_torch, export_base, export_reference, get_metadata,
                           insert_qdq, refresh_weights, save_onnx)
from sq2trt.fakequant import fake_quantized
from sq2trt.models import TINY_CONFIGS, load_model
from sq2trt.plan import make_plan
from sq2trt.smooth import enabled_groups, smooth

FAMILIES = list(TINY_CONFIGS)
EXPORTABLE = [f for f in FAMILIES if f != "mixtral"]
QUANT_LEVELS = [lv for lv, s in LEVELS.items() if s.quantizes]
TOL = 2e-3


def _ids(shape, seed=0):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def _prepared(family: str):
    """Tiny model of ``family``, its calibration statistics, smoothed in place at the row's alpha."""
    loaded = load_model(f"random:{family}")
    model, arch = loaded.model, get_arch(loaded.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # trained-like norms and biases: distinct values (the exporter merges equal
        for p in model.parameters():  # constants, e.g. all-ones norm weights, which refresh_weights cannot split)
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    names = quantized_linear_names(model, arch)
    calib = _ids((4, 32))
    stats = collect(model, names, calib, per_channel_absmax)
    return model, arch, names, calib, stats


def test_every_row_has_a_tiny_config():
    covered = [get_arch(load_model(f"random:{f}").model) for f in FAMILIES]
    rows = list(ARCHS.values()) + [v for vs in ARCH_VARIANTS.values() for v in vs]
    missing = [r.notes or r.layers for r in rows if not any(r is c for c in covered)]
    assert not missing, f"rows without a tiny config in TINY_CONFIGS: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_preserves_outputs(family):
    model, arch, _, calib, stats = _prepared(family)
    ids = _ids((2, 24), seed=3)
    with torch.no_grad():
        before = model(ids).logits
    scales = smooth(model, arch, stats, arch.alpha)
    with torch.no_grad():
        after = model(ids).logits
    # the paper's norm folds (the default); the exact linear folds are opt-in and tested in test_o3.py
    assert len(scales) == len(enabled_groups(arch)) * model.config.num_hidden_layers
    assert max(float((s - 1).abs().max()) for s in scales.values()) > 0.1  # smoothing really moved weights
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel <= 1e-5, f"{family}: smoothing changed the logits by {rel:.2e}"


@pytest.fixture(scope="module", params=EXPORTABLE)
def exported(request, tmp_path_factory):
    """(family, smoothed model, names, static amax, ref.onnx path, export error vs torch)."""
    family = request.param
    model, arch, names, calib, stats = _prepared(family)
    d = tmp_path_factory.mktemp(family)
    how = export_base(model, d / "base.onnx")  # raw model, as the pipeline exports once per model
    base_err = check_against_torch(model, d / "base.onnx", shape=(3, 21))
    smooth(model, arch, stats, arch.alpha)
    ref = d / "ref.onnx"
    save_onnx(refresh_weights(onnx.load(str(d / "base.onnx")), model), ref)  # smoothed weights, same graph
    err = check_against_torch(model, ref, shape=(3, 21))  # not the traced (2, 16)
    amax = {k: float(v) for k, v in collect(model, names, calib, per_tensor_absmax).items()}
    return family, model, names, amax, ref, (err, base_err, how)


# GPT-J computes its rotary sin/cos from a buffer in a way torch.export cannot trace with the weights on
# the meta device: its base graph comes from a trace of an FP32 copy (export.export_base's fallback)
TRACED_WITH_WEIGHTS = {"gptj"}


def test_export_matches_torch(exported):
    family, *_, (err, base_err, how) = exported
    assert how == ("fp32-copy" if family in TRACED_WITH_WEIGHTS else "weightless"), (family, how)
    assert base_err <= 1e-4, f"{family}: base graph ({how} trace) vs PyTorch {base_err:.2e} at shape (3, 21)"
    assert err <= 1e-4, f"{family}: ONNX (refreshed smoothed weights) vs PyTorch {err:.2e} at shape (3, 21)"


def _dq_fed_gemms(proto: onnx.ModelProto) -> dict[str, tuple[bool, bool]]:
    """{GEMM node name: (input A fed through Q/DQ or dynamic fake-quant, input B fed by DequantizeLinear)}."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = (producer.get(x) for x in n.input[:2])
        a_q = a is not None and (a.op_type == "DequantizeLinear" or a.name.endswith("/input/Mul"))
        b_q = b is not None and b.op_type == "DequantizeLinear"
        if a_q or b_q:
            out[n.name] = (a_q, b_q)
    return out


@pytest.mark.parametrize("level", ["O3", "O1", "W4A16"])
def test_qdq_sits_on_exactly_the_tables_gemms(exported, level):
    family, model, names, amax, ref, _ = exported
    plan = make_plan(names, QuantConfig(level=level), amax, layout=get_arch(model).layout.value)
    proto = insert_qdq(onnx.load(str(ref)), plan, level=level)
    fed = _dq_fed_gemms(proto)
    modules = json.loads(get_metadata(proto)["sq2trt.gemm_modules"])
    assert sorted(modules[n] for n in fed) == sorted(names), f"{family}: Q/DQ on {sorted(fed)}"
    act_quantized = LEVELS[level].act is not None
    assert all(a == act_quantized and b for a, b in fed.values()), fed
    assert len(fed) == len(names)  # nothing else (lm_head, attention BMMs) gained Q/DQ


def _ort_logits(proto: onnx.ModelProto, ids: np.ndarray, path) -> np.ndarray:
    from sq2trt.engine import session

    save_onnx(proto, path)
    return session(path, device="cpu", optimize=False).run([OUTPUT], {INPUT: ids})[0]


@pytest.mark.parametrize("level", QUANT_LEVELS)
def test_level_graph_matches_fakequant(exported, level, tmp_path):
    family, model, names, amax, ref, _ = exported
    quant = QuantConfig(level=level)
    plan = make_plan(names, quant, amax, layout=get_arch(model).layout.value)
    ids = _ids((2, 24), seed=5).numpy()
    got = _ort_logits(insert_qdq(onnx.load(str(ref)), plan, level=level), ids, tmp_path / f"{level}.onnx")
    with fake_quantized(model, plan), torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    with torch.no_grad():
        fp = model(torch.from_numpy(ids)).logits.numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    moved = float(np.abs(fp - want).max() / np.abs(fp).max())
    tol = TOL
    assert rel <= tol, f"{family} {level}: Q/DQ graph vs PyTorch fake quant {rel:.2e} > {tol}"
    assert moved > 2 * rel, f"{family} {level}: quantization changed nothing measurable ({moved:.2e})"


def test_fp_fallback_removes_exactly_those_gemms(exported):
    family, model, _, amax, ref, _ = exported
    arch = get_arch(model)
    skip = (arch.gemms[-1],)
    names = quantized_linear_names(model, arch, skip=skip)
    proto = insert_qdq(onnx.load(str(ref)), make_plan(names, QuantConfig(level="O1", fp_fallback=skip), amax,
                                                        layout=arch.layout.value), level="O1")
    modules = json.loads(get_metadata(proto)["sq2trt.gemm_modules"])
    assert sorted(modules[n] for n in _dq_fed_gemms(proto)) == sorted(names)
    assert not any(m.endswith(skip[0]) for m in modules.values())


def test_mixtral_quantizes_in_pytorch_and_refuses_export_with_a_typed_error(tmp_path):
    model, arch, names, calib, stats = _prepared("mixtral")
    assert "model.layers.0.mlp.experts" in names and not any(n.endswith("mlp.gate") for n in names)
    smooth(model, arch, stats, arch.alpha)
    ids = _ids((2, 24), seed=5)
    with torch.no_grad():
        fp = model(ids).logits
    for level in ("O3", "O1", "W4A16"):
        amax = {k: float(v) for k, v in collect(model, names, calib, per_tensor_absmax).items()}
        plan = make_plan(names, QuantConfig(level=level), amax)
        router = model.model.layers[0].mlp.gate.weight.detach().clone()
        with fake_quantized(model, plan), torch.no_grad():
            q = model(ids).logits
            assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # router stays float
        assert 1e-5 < float((q - fp).abs().max() / fp.abs().max()) < 0.5
    with pytest.raises(UnsupportedArchitectureError, match="MixtralExperts"):
        export_reference(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedArchitectureError, match="MixtralExperts"):  # refused before any trace
        export_base(model, tmp_path / "m.onnx")
