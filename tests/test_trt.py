"""TensorRT path: config and profiles, plan metadata and the version/GPU check, the missing-TensorRT
error, the FP16 transform (run in ONNX Runtime), and the Q/DQ lint on the pipeline's own exports.

Tests that need TensorRT itself are marked ``trt`` and skip here (no TensorRT, no NVIDIA GPU).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from sq2trt import config as config_mod
from sq2trt.cli import build_parser, config_from_args, main
from sq2trt.config import Config, PerTensor, Scheme
from sq2trt.errors import BackendUnavailableError, ConfigError, LevelNotSupportedError, OnnxInputError
from sq2trt.fp16 import (FP16_MAX, FP16_MIN_NORMAL, fp16_from_onnx, fp16_scale, requantize_int8,
                         to_fp16_clamped)
from sq2trt.lint import lint_model
from sq2trt.trt import (STRONGLY_TYPED, WEAKLY_TYPED, PlanMismatchError, TrtConfig, build_mode,
                        check_plan_compatible, default_timing_cache, metadata_path, onnx_digest, plan_metadata,
                        read_plan_metadata)

from conftest import data_file, tiny_args

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (needs an NVIDIA GPU machine)")
U16 = 2.0 ** -11  # FP16 unit roundoff


# --------------------------------------------------------------------------- start-up and missing TensorRT
def test_nothing_imports_tensorrt_at_startup():
    code = ("import sys, sq2trt.cli, sq2trt.pipeline, sq2trt.trt, sq2trt.fp16, sq2trt.compare; "
            "sq2trt.cli.build_parser(); assert 'tensorrt' not in sys.modules, 'tensorrt imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_build_trt_without_tensorrt_says_what_to_install(tmp_path, capsys):
    rc = main(["build", "--backend", "trt", "--model", "random:llama", "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert rc == BackendUnavailableError.exit_code == 3
    assert "pip install" in err and "NVIDIA GPU" in err and "--backend ort" in err
    assert not list(tmp_path.rglob("*.onnx")), "no export should run before the TensorRT check"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_plan_runner_without_tensorrt(tmp_path):
    from sq2trt.compare import runner_for

    with pytest.raises(BackendUnavailableError, match="NVIDIA GPU"):
        runner_for(tmp_path / "model.plan")


def test_dynamic_activation_level_fails_for_trt_naming_o3(monkeypatch, tmp_path):
    from sq2trt.pipeline import Pipeline

    monkeypatch.setitem(config_mod.LEVELS, "DYN", Scheme(PerTensor(), PerTensor(), act_static=False))
    pipe = Pipeline(Config(model="random:llama", quant=config_mod.QuantConfig(level="DYN")), tmp_path)
    with pytest.raises(LevelNotSupportedError, match="O3"):
        pipe.build("trt")


# --------------------------------------------------------------------------- config and profiles
def test_trt_config_validates():
    for bad in ({"min_seq": 0}, {"opt_seq": 4096}, {"min_batch": 5}, {"builder_optimization_level": 6},
                {"workspace_mib": -1}):
        with pytest.raises(ConfigError):
            TrtConfig(**bad)
    with pytest.raises(ConfigError, match="unknown key"):
        Config.from_dict({"trt": {"max_sequence": 8}})


def test_trt_section_round_trips_and_cli_flags():
    c = Config(model="random:llama").replace(trt={"max_seq": 4096, "opt_seq": 1024, "workspace_mib": 2048})
    assert Config.from_dict(c.to_dict()) == c
    args = build_parser().parse_args(["build", "--backend", "trt", "--model", "random:llama", "--trt-max-seq", "4096",
                                      "--trt-opt-batch", "2", "--trt-builder-optimization-level", "5",
                                      "--trt-timing-cache", "/tmp/x.cache"])
    t = config_from_args(args).trt
    assert (t.max_seq, t.opt_batch, t.builder_optimization_level, t.timing_cache) == (4096, 2, 5, "/tmp/x.cache")
    assert config_from_args(build_parser().parse_args(["build", "--model", "m"])).trt == TrtConfig()


def test_profile_shapes_and_coverage():
    t = TrtConfig(min_batch=1, opt_batch=2, max_batch=8, min_seq=16, opt_seq=256, max_seq=1024)
    assert t.profile_shapes() == {"input_ids": ((1, 16), (2, 256), (8, 1024))}
    assert t.uncovered(8, 1024) is None and t.uncovered(1, 16) is None
    assert "--trt-max-seq" in t.uncovered(1, 2048)
    assert t.uncovered(9, 64) is not None and t.uncovered(1, 8) is not None


def test_build_mode_by_version():
    assert build_mode("11.0.0.5", has_strongly_typed_flag=False) == STRONGLY_TYPED  # 11: always strongly typed
    assert build_mode("11.3.1", has_strongly_typed_flag=True) == STRONGLY_TYPED
    assert build_mode("10.3.0", has_strongly_typed_flag=True) == STRONGLY_TYPED
    assert build_mode("8.6.1", has_strongly_typed_flag=False) == WEAKLY_TYPED
    with pytest.raises(ConfigError):
        build_mode("unknown", has_strongly_typed_flag=True)


def test_installed_polygraphy_builds_strongly_typed_networks():
    from sq2trt.trt import _require_polygraphy_strongly_typed

    _require_polygraphy_strongly_typed()  # NetworkFromOnnxPath(path, strongly_typed=...) exists
    assert HAVE_TRT or "tensorrt" not in sys.modules  # and asking did not import TensorRT


# --------------------------------------------------------------------------- metadata and compatibility
ENV = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _meta(**over):
    m = plan_metadata(env=ENV, config=TrtConfig(), mode=STRONGLY_TYPED, onnx={"path": "x.onnx", "sha256": "0" * 64},
                      level="O3", alpha=0.85, calibration={"num_samples": 64})
    m.update(over)
    return m


def test_plan_metadata_fields(tmp_path):
    src = tmp_path / "O3.fp16.onnx"
    src.write_bytes(b"not really onnx, only hashed")
    (tmp_path / "O3.fp16.onnx.data").write_bytes(b"weights")
    digest = onnx_digest(src)
    assert digest["sha256"] == hashlib.sha256(b"not really onnx, only hashed").hexdigest()
    assert digest["data_sha256"] == hashlib.sha256(b"weights").hexdigest()
    meta = plan_metadata(env=ENV, config=TrtConfig(max_seq=1024), mode=STRONGLY_TYPED, onnx=digest, level="O3",
                         alpha=0.85, calibration={"num_samples": 64, "amax_max": 12.5})
    for key in ("tensorrt", "gpu", "compute_capability", "profiles", "level", "alpha", "calibration", "onnx",
                "build_mode", "trt_config"):
        assert key in meta
    assert meta["profiles"] == [{"input_ids": [[1, 1], [1, 512], [4, 1024]]}]
    plan = tmp_path / "O3.plan"
    assert metadata_path(plan).name == "O3.plan.json"
    assert read_plan_metadata(plan) is None
    metadata_path(plan).write_text(json.dumps(meta))
    assert read_plan_metadata(plan) == json.loads(json.dumps(meta))
    metadata_path(plan).write_text("{truncated")
    with pytest.raises(PlanMismatchError, match="rebuild"):
        read_plan_metadata(plan)


def test_compatible_plan_passes_clean():
    assert check_plan_compatible(_meta(), ENV) == []


def test_tensorrt_version_mismatch_is_a_typed_error():
    with pytest.raises(PlanMismatchError) as exc:
        check_plan_compatible(_meta(tensorrt="10.3.0.26"), ENV)
    msg = str(exc.value)
    assert "10.3.0.26" in msg and "10.13.0.35" in msg and "sq2trt build --backend trt" in msg
    assert exc.value.exit_code == 3


def test_gpu_architecture_mismatch_is_a_typed_error():
    with pytest.raises(PlanMismatchError, match="compute capability 8.9"):
        check_plan_compatible(_meta(gpu="NVIDIA L4", compute_capability="8.9"), ENV)


def test_same_architecture_other_gpu_warns():
    warnings = check_plan_compatible(_meta(gpu="NVIDIA H100 PCIe"), ENV)
    assert len(warnings) == 1 and "H100 PCIe" in warnings[0]


def test_unknown_gpu_warns_and_foreign_metadata_fails():
    assert "could not compare" in check_plan_compatible(_meta(), {**ENV, "gpu": None, "compute_capability": None})[0]
    with pytest.raises(PlanMismatchError, match="not sq2trt's"):
        check_plan_compatible({"engine": "from trtexec"}, ENV)


def test_default_timing_cache_names_gpu_and_version(tmp_path):
    p = default_timing_cache(tmp_path, ENV)
    assert p.parent == tmp_path and "H100" in p.name and "10.13.0.35" in p.name and " " not in p.name


# --------------------------------------------------------------------------- FP16 numerics (pure)
def test_fp16_clamps_instead_of_inf():
    out, clamped = to_fp16_clamped(np.array([-3.4e38, -1.0, 7e4, np.inf, 0.5], np.float32))
    assert clamped and out.dtype == np.float16
    assert out.tolist()[:3] == [-FP16_MAX, -1.0, FP16_MAX] and np.isinf(out[3]) and out[4] == 0.5


def test_fp16_scale_rules():
    s16, raised = fp16_scale(np.array([0.02, 1e-3], np.float32))
    assert not raised and s16.dtype == np.float16
    assert np.all(np.abs(s16.astype(np.float32) / np.array([0.02, 1e-3]) - 1) <= U16)
    s16, raised = fp16_scale(np.array(1e-6, np.float32))
    assert raised and float(s16) == FP16_MIN_NORMAL
    for bad in (0.0, -1.0, np.nan, np.inf, 1e6):
        with pytest.raises(OnnxInputError):
            fp16_scale(np.array(bad, np.float32))


def test_requantize_int8_to_a_larger_scale():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (6, 5)).astype(np.int8)
    s = np.full((1, 5), 1e-6, np.float32)
    s2 = np.full((1, 5), FP16_MIN_NORMAL, np.float32)
    q2 = requantize_int8(q, s, s2)
    assert np.abs(q2 * s2 - q * s.astype(np.float64)).max() <= FP16_MIN_NORMAL / 2 + 1e-12
    assert np.array_equal(requantize_int8(q, s, s), q)  # same scale: unchanged


def _toy_graph() -> onnx.ModelProto:
    """x (float input) -> RMS norm -> Q/DQ MatMul, + ConstantOfShape (default FP32 zeros), + a
    Cos of x * 100 (position-like math) -> MatMul; Constant nodes with value_float."""
    from onnx import helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8), "w_q"),
             numpy_helper.from_array(w_scale, "w_scale"), numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array([2, 4], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Constant", [], ["two"], value_float=2.0),
             helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["xn"]),
             helper.make_node("QuantizeLinear", ["xn", "x_scale", "x_zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wdq"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xdq", "wdq"], ["y"], name="fc"),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
             helper.make_node("Constant", [], ["hundred"], value_float=100.0),
             helper.make_node("Mul", ["x", "hundred"], ["angle"], name="angle"),
             helper.make_node("Cos", ["angle"], ["cos"]),
             helper.make_node("MatMul", ["cos", "w2"], ["y2"]),
             helper.make_node("Add", ["y", "zeros"], ["y0"]),
             helper.make_node("Add", ["y0", "y2"], ["out"])]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_fp16_transform_on_a_toy_graph():
    import onnxruntime as ort

    model = _toy_graph()
    out, summary = fp16_from_onnx(model)
    onnx.checker.check_model(out, full_check=True)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(out, strict_mode=True).graph.value_info}
    assert types["angle"] == TensorProto.FLOAT  # position math stays FP32 up to Cos
    assert types["mse"] == TensorProto.FLOAT and types["ms"] == TensorProto.FLOAT  # x**2 and its mean
    assert types["xdq"] == types["wdq"] == types["y"] == types["zeros"] == TensorProto.FLOAT16
    assert {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Cos", "Mul"} <= set(summary.fp32_ops)
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [TensorProto.FLOAT]
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32) * 300  # x**2 > 65504
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    want, got = run(model), run(out)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # a few INT8 steps of 0.03 at most


# --------------------------------------------------------------------------- the pipeline's own exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """random:llama and random:opt at O3 through the CLI: ref.onnx, O3.onnx, O3.fp16.onnx (linted)."""
    calib, evalp = data_file("wikitext2_tokenized/valid.txt"), data_file("wikitext2_raw_test/wiki.test.raw")
    out = tmp_path_factory.mktemp("trt-exports")
    dirs = {}
    for arch in ("llama", "opt"):
        rc = main(["export", "--fp16", "--model", f"random:{arch}", "--level", "O3", *tiny_args(calib, evalp, out)])
        assert rc == 0
        dirs[arch] = out / f"random-{arch}" / "O3"
    # the reference also through the FP16 transform: pure FP16 error, no INT8 rounding flips
    from sq2trt.fp16 import write_fp16

    for d in dirs.values():
        write_fp16(d / "ref.onnx", d / "ref.fp16.onnx")
    return dirs


ARCHS = ("llama", "opt")


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_exports_lint_clean(exports, arch, capsys):
    d = exports[arch]
    for name in ("O3.onnx", "O3.fp16.onnx"):
        report = lint_model(d / name)
        assert report, str(report)
        assert not report.warnings, str(report)
        assert report.checked_gemms > 0
        assert main(["lint", str(d / name)]) == 0
        assert main(["lint", "--json", str(d / name)]) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{"):])["passed"] is True


def test_lint_cli_exit_codes_on_a_broken_export(exports, tmp_path, capsys):
    proto = onnx.load(exports["llama"] / "O3.onnx")
    act_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    for init in proto.graph.initializer:
        if init.name == act_q.input[1]:
            init.CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, bad)
    assert main(["lint", str(bad)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["lint", "--json", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and any(f["rule"] == "scale-not-positive" for f in report["findings"])
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2


def _by_type(proto, op):
    return [n for n in proto.graph.node if n.op_type == op]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_graph_keeps_qdq_and_types(exports, arch):
    d = exports[arch]
    src, dst = onnx.load(d / "O3.onnx"), onnx.load(d / "O3.fp16.onnx")
    onnx.checker.check_model(dst, full_check=True)
    for op in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm"):
        assert len(_by_type(src, op)) == len(_by_type(dst, op)), op
    inits = {t.name: t for t in dst.graph.initializer}
    src_inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    consumers = {}
    for n in dst.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for dq in _by_type(dst, "DequantizeLinear"):
        scale = inits[dq.input[1]]
        assert scale.data_type == TensorProto.FLOAT16, dq.name  # DQ outputs FP16 ...
        assert all(c.op_type in ("MatMul", "Gemm") for c in consumers[dq.output[0]]), dq.name  # ... into the GEMM
        if dq.input[0] in inits:  # weight: same INT8 values, scale = FP16 of the FP32 scale
            w = numpy_helper.to_array(inits[dq.input[0]])
            assert w.dtype == np.int8 and np.array_equal(w, src_inits[dq.input[0]])
            s32 = src_inits[dq.input[1]]
            assert np.array_equal(numpy_helper.to_array(scale), s32.astype(np.float16))
    for q in _by_type(dst, "QuantizeLinear"):  # Q reads FP16 activations with the scale its DQ uses
        dq = consumers[q.output[0]][0]
        assert dq.op_type == "DequantizeLinear" and dq.input[1] == q.input[1]
    assert {o.name: o.type.tensor_type.elem_type for o in dst.graph.output} == {"logits": TensorProto.FLOAT}
    meta = {p.key: p.value for p in dst.metadata_props}
    assert meta["sq2trt.precision"] == "fp16" and meta["sq2trt.level"] == "O3"
    assert "Softmax" in meta["sq2trt.fp32_ops"]
    assert ("LayerNormalization" if arch == "opt" else "ReduceMean") in meta["sq2trt.fp32_ops"]
    if arch == "llama":
        assert "Cos" in meta["sq2trt.fp32_ops"]


def _run(path, ids):
    from sq2trt.engine import session

    return session(path, device="cpu", optimize=False).run(None, {"input_ids": ids})[0]


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_matches_fp32_reference(exports, arch):
    """Tolerances. Without Q/DQ (ref.fp16 vs ref): FP16 rounds weights and activations with unit
    roundoff u = 2**-11; through a few dozen roundings per layer the logits' relative L2 error
    grows like sqrt(#roundings) * u, a few u for these 2-layer models (measured ~1u): the bound is
    8u = 3.9e-3. Rotary angles or x**2 computed in FP16 break it (angle 64 has FP16 spacing
    1/16). With Q/DQ: FP16 activations cross INT8 rounding boundaries the FP32 graph did not
    (each crossing is a whole INT8 step), so the FP16 graph is held to the FP32 *reference*
    (ref.onnx) and must be as accurate as the FP32 Q/DQ graph, within 25% (measured 0.99-1.01x)."""
    d = exports[arch]
    ids = np.random.default_rng(0).integers(0, 500, (2, 48))
    ref, ref16 = _run(d / "ref.onnx", ids), _run(d / "ref.fp16.onnx", ids)
    assert ref16.dtype == np.float32 and np.isfinite(ref16).all()
    assert _rel_l2(ref16, ref) <= 8 * U16
    assert np.abs(ref16 - ref).max() / np.abs(ref).max() <= 16 * U16
    assert (ref16.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
    q32, q16 = _run(d / "O3.onnx", ids), _run(d / "O3.fp16.onnx", ids)
    assert np.isfinite(q16).all()
    assert _rel_l2(q16, ref) <= 1.25 * _rel_l2(q32, ref)


def test_fp16_raises_tiny_weight_scale_and_requantizes(exports):
    proto = onnx.load(exports["llama"] / "O3.onnx")
    inits = {t.name: t for t in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    q = numpy_helper.to_array(inits[dq.input[0]])
    tiny = np.array(3e-6, np.float32)  # weights of magnitude <= 127 * 3e-6: subnormal scale in FP16
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(tiny, dq.input[1]))
    out, summary = fp16_from_onnx(proto)
    assert summary.raised_scales == [dq.input[1]] and summary.requantized_weights == [dq.input[0]]
    new = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert float(new[dq.input[1]]) == FP16_MIN_NORMAL
    w_before = q.astype(np.float64) * float(tiny)
    w_after = new[dq.input[0]].astype(np.float64) * FP16_MIN_NORMAL
    assert np.abs(w_after - w_before).max() <= FP16_MIN_NORMAL / 2 + 1e-12


# --------------------------------------------------------------------------- needs TensorRT (GPU machines)
@pytest.mark.trt
@needs_trt
def test_plan_builds_runs_and_matches_reference(exports, tmp_path):
    from sq2trt.compare import compare_logits
    from sq2trt.evaluate import perplexity
    from sq2trt.trt import build_plan, runtime_environment, trt_logits_fn

    d = exports["llama"]
    plan = tmp_path / "O3.plan"
    t = TrtConfig(max_batch=2, opt_seq=64, max_seq=128)
    meta = build_plan(d / "O3.fp16.onnx", d / "O3.onnx", plan, t, timing_cache=tmp_path / "t.cache", level="O3")
    assert plan.stat().st_size > 0 and (tmp_path / "t.cache").exists()
    assert read_plan_metadata(plan) == json.loads(json.dumps(meta))
    assert check_plan_compatible(meta, runtime_environment()) == []
    ids = np.random.default_rng(0).integers(0, 500, (2, 64))
    diff = compare_logits(d / "ref.onnx", plan, ids, device="cpu")
    q32 = compare_logits(d / "ref.onnx", d / "O3.onnx", ids, device="cpu")
    assert diff.rel_l2 <= 1.5 * q32.rel_l2 + 8 * U16, (diff, q32)
    import torch

    fn = trt_logits_fn(plan)
    try:
        ppl = perplexity(fn, torch.from_numpy(ids))
    finally:
        fn.close()
    assert np.isfinite(ppl)


@pytest.mark.trt
@needs_trt
def test_plan_from_other_tensorrt_is_refused(exports, tmp_path):
    from sq2trt.trt import build_plan, trt_runner

    plan = tmp_path / "O3.plan"
    meta = build_plan(exports["opt"] / "O3.fp16.onnx", exports["opt"] / "O3.onnx", plan,
                      TrtConfig(max_batch=1, opt_seq=32, max_seq=64), timing_cache=tmp_path / "t.cache")
    metadata_path(plan).write_text(json.dumps({**meta, "tensorrt": "0.0.1"}))
    with pytest.raises(PlanMismatchError, match="0.0.1"):
        trt_runner(plan)
