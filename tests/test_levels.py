"""Levels: the support matrix, TensorRT refusals, recipes, the granularity-driven plan, group/INT4 and
dynamic exports on ONNX Runtime, the W4A16 engine, the paper's outlier pattern, the SmoothQuant+
alpha search and the pipeline end to end for every level."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch


from sq2trt import cli
from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax, per_tensor_absmax
from sq2trt.config import LEVELS, Config, QuantConfig, dump_recipe, get_level, level_support, load_recipe
from sq2trt.errors import LevelNotSupportedError
from sq2trt.export import INPUT, OUTPUT, export_reference, insert_qdq, save_onnx
from sq2trt.fakequant import fake_quantized
from sq2trt.models import load_model
from sq2trt.plan import GemmQuant, make_plan
from sq2trt.report import support_matrix_markdown
from sq2trt.search import GRID, search_alpha
from sq2trt.smooth import enabled_groups, smooth

ROOT = Path(__file__).resolve().parents[1]
DYNAMIC = [lv for lv, s in LEVELS.items() if s.act is not None and not s.act_static]


# --------------------------------------------------------------------------- tables and docs
def test_levels_doc_holds_exactly_the_generated_matrix(capsys):
    text = (ROOT / "docs" / "levels.md").read_text()
    m = re.search(r"<!-- levels:start -->\n(.*?)\n<!-- levels:end -->", text, re.S)
    assert m, "docs/levels.md lost its <!-- levels:start/end --> markers"
    assert m.group(1) == support_matrix_markdown(), "regenerate the matrix: sq2trt levels"
    assert cli.main(["levels"]) == 0
    assert capsys.readouterr().out.strip() == support_matrix_markdown()


def test_table2_levels_exist():
    assert {"fp", "W8A8", "W8A8-dyn", "ZeroQuant", "O1", "O2", "O3", "W4-RTN", "W4A16"} <= set(LEVELS)


@pytest.mark.parametrize("level", DYNAMIC)
def test_dynamic_levels_are_refused_for_tensorrt_naming_o3(level, tmp_path):
    assert level_support(level, "ort") is None
    why = level_support(level, "trt")
    assert why and "dynamic" in why and "O3" in why
    with pytest.raises(LevelNotSupportedError, match="O3"):
        from sq2trt.pipeline import Pipeline

        Pipeline(Config(model="random:llama", quant=QuantConfig(level=level)), tmp_path).build("trt")


def test_static_and_weight_only_levels_are_not_refused_for_tensorrt():
    for level in ("fp", "W8A8", "O3", "W4-RTN", "W4A16"):
        assert level_support(level, "trt") is None
    assert "zero point" in level_support("W4A16-asym", "trt")


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "thresholds.yaml"),
                         ids=lambda p: p.stem)
def test_recipe_round_trips(path, tmp_path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    config = Config.from_dict(load_recipe(path))
    assert config.quant.alpha is not None and raw["family"] == path.stem
    out = tmp_path / path.name
    dump_recipe(config, out, family=raw["family"], notes=raw.get("notes", ""))
    assert out.read_text() == path.read_text()


def _one_gemm(level: str, w: torch.Tensor):
    """A model holding one Linear ``lin`` with weight ``w`` and that level's plan (static amax 4.0)."""
    from collections import OrderedDict

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return torch.nn.Sequential(OrderedDict(lin=lin)), make_plan(["lin"], QuantConfig(level=level), {"lin": 4.0})


def _on_grid(v: torch.Tensor, step: torch.Tensor) -> bool:
    r = v / step
    return bool(torch.allclose(r, torch.round(r), atol=1e-3))


def _observed_weights(level: str) -> str:
    """What fake quantization does to a (6, 256) weight whose rows and 128-blocks differ in scale,
    described in the support matrix's words (bits, the unit sharing one grid, symmetric or not)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g) * torch.tensor([1.0, 3.0, 10.0, 0.3, 2.0, 5.0])[:, None]
    w[:, 128:] *= 4.0
    model, plan = _one_gemm(level, w)
    with fake_quantized(model, plan):
        wq = model.lin.weight.detach().clone()
    if torch.equal(wq, w):
        return "float"
    blocks = [wq[r, b: b + 128] for r in range(6) for b in (0, 128)]
    bits = 4 if max(len(torch.unique(b)) for b in blocks) <= 16 else 8
    qmax = (1 << (bits - 1)) - 1
    for unit, parts in (("per-tensor", [wq]), ("per-channel", list(wq)), ("per-group(128)", blocks)):
        if all(_on_grid(p, p.abs().max() / qmax) for p in parts):
            return f"INT{bits} {unit}"
    if all(_on_grid(b - b.min(), (b.max() - b.min()) / (2 * qmax + 1)) for b in blocks):
        return f"INT{bits} per-group(128) asymmetric"
    return "unrecognised"


def _observed_activations(level: str) -> str:
    """What the GEMM sees of a (2, 5, 256) input whose tokens differ in scale (max|x| ~ 10 > the static 4.0)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 256, generator=g) * torch.linspace(0.5, 3.0, 10).view(2, 5, 1)
    model, plan = _one_gemm(level, torch.randn(6, 256, generator=g))
    seen = []
    with fake_quantized(model, plan):  # registered after fake quantization's own pre-hook: sees its output
        h = model.lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        model(x)
        h.remove()
    (xq,) = seen
    if torch.equal(xq, x):
        return "float"
    if _on_grid(xq, torch.tensor(4.0 / 127)) and xq.abs().max() <= 128 * 4.0 / 127 + 1e-6:
        return "per-tensor static"  # the calibrated clip, whatever this input's range
    if _on_grid(xq, x.abs().max() / 127):
        return "per-tensor dynamic"
    if all(_on_grid(t, t.abs().max() / 127) for t in xq.reshape(-1, 256)):
        return "per-token dynamic"
    return "unrecognised"


@pytest.mark.parametrize("level", list(LEVELS))
def test_each_level_quantizes_as_its_table_row_says(level):
    """Observed on one GEMM under fake quantization (which the export check ties to the ONNX graph), not
    read from the plan: the weight grid (bits, per tensor / channel / 128-block, symmetric or not) and
    the activation grid (float, the calibrated static clip, a run-time max per tensor or per token)
    must be what the support matrix (README, docs/levels.md, `sq2trt levels`) states."""
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:4]]
            for r in support_matrix_markdown().splitlines()[2:]}
    weights, activations = rows[level]
    # with the built-in defaults; "; per-channel in the llama, ... recipes" notes what shipped recipes change
    # (test_gate.py::test_weights_text_is_what_the_plan_applies checks those against the plan)
    assert [_observed_weights(level), _observed_activations(level)] == [weights.split(";")[0], activations]


def test_per_channel_option_upgrades_per_tensor_weights_only():
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)[:, None]
    for level, want_per_channel in (("O1", True), ("W8A8", True), ("ZeroQuant", False), ("W4A16", False)):
        model, _ = _one_gemm(level, w)
        plan = make_plan(["lin"], QuantConfig(level=level, weight_granularity="per-channel"), {"lin": 4.0})
        with fake_quantized(model, plan):
            wq = model.lin.weight.detach().clone()
        assert all(_on_grid(r, r.abs().max() / 127) for r in wq) == want_per_channel, level
    assert make_plan(["lin"], QuantConfig(level="fp"), {}) == {}


# --------------------------------------------------------------------------- a tiny Llama, exported once
def _plant_outliers(model, channels=(5, 21, 50), factor=80.0):
    """Scale a few norm output channels by ``factor`` and divide the reading Linears' columns by it: the
    model is unchanged, but those channels are ~factor x larger than the rest at every token (the paper's
    persistent outlier channels)."""
    arch = get_arch(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for g in enabled_groups(arch):  # the norm groups (the linear folds are opt-in)
                layer.get_submodule(g.producer).weight[list(channels)] *= factor
                for c in g.consumers:
                    layer.get_submodule(c).weight[:, list(channels)] /= factor


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = load_model("random:llama").model
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    _plant_outliers(model)
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    ref = tmp_path_factory.mktemp("llama") / "ref.onnx"
    export_reference(model, ref)
    return model, names, ref


def _ids(shape, seed):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def _ort(proto, path, ids, optimize=False):
    from sq2trt.engine import session

    save_onnx(proto, path)
    return session(path, device="cpu", optimize=optimize).run([OUTPUT], {INPUT: ids})[0]


@pytest.mark.parametrize("bits,sym,act", [(8, True, None), (4, True, None), (4, False, None),
                                          (8, True, "per-token"), (4, False, "per-tensor")])
def test_multi_block_weights_export_matches_fakequant(llama, tmp_path, bits, sym, act):
    model, names, ref = llama
    plan = {n: GemmQuant(None, False, 32, bits, sym, act) for n in names}  # K = 64 / 128: 2-4 full blocks
    proto = insert_qdq(onnx.load(str(ref)), plan, level="custom")
    dq = [n for n in proto.graph.node if n.name.endswith("/weight/DequantizeLinear")]
    assert len(dq) == len(names) and all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in dq)
    init = {i.name: i for i in proto.graph.initializer}
    want_type = {8: onnx.TensorProto.INT8, 4: onnx.TensorProto.INT4 if sym else onnx.TensorProto.UINT4}[bits]
    assert all(init[n.input[0]].data_type == want_type for n in dq)
    ids = _ids((2, 20), 4).numpy()
    got = _ort(proto, tmp_path / "m.onnx", ids)
    with fake_quantized(model, plan), torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel <= 2e-3, rel  # see tests/test_families.py for the tolerance


def test_w4a16_engine_keeps_activations_in_float(llama, tmp_path):
    """ORT fuses INT4 DQ -> MatMul into MatMulNBits; sq2trt's sessions pin accuracy_level 0 (float
    activations). Without it ORT's default (4) quantizes activations to INT8."""
    import onnxruntime as ort

    from sq2trt.engine import build_ort_engine, session

    model, names, ref = llama
    plan = make_plan(names, QuantConfig(level="W4A16"), {})
    q = tmp_path / "w4.onnx"
    save_onnx(insert_qdq(onnx.load(str(ref)), plan, level="W4A16"), q)
    info = build_ort_engine(q, tmp_path / "w4.ort.onnx", device="cpu")
    eng = onnx.load(str(tmp_path / "w4.ort.onnx"))
    nbits = [n for n in eng.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(names), info["ops"]
    assert all({a.name: a.i for a in n.attribute}.get("accuracy_level") == 0 for n in nbits)
    ids = _ids((1, 48), 6).numpy()
    exact = session(q, device="cpu", optimize=False).run([OUTPUT], {INPUT: ids})[0]
    fused = session(q, device="cpu", optimize=True).run([OUTPUT], {INPUT: ids})[0]
    so = ort.SessionOptions()  # ORT's own default, for contrast
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    default = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"]).run([OUTPUT], {INPUT: ids})[0]
    scale = np.abs(exact).max()
    assert np.abs(fused - exact).max() / scale <= 1e-4
    assert np.abs(default - exact).max() / scale > 10 * np.abs(fused - exact).max() / scale


def test_per_token_forms_on_ort():
    """The explicit per-token form is exact; the blocked Q/DQ form is a canary for ORT fixing it."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    import onnxruntime as ort

    k = 256
    x = np.random.default_rng(0).standard_normal((2, 5, k)).astype(np.float32)
    sc = np.abs(x).max(-1, keepdims=True) / 127
    want = np.clip(np.round(x / sc), -128, 127) * sc
    head = [h.make_node("Abs", ["x"], ["a"]), h.make_node("ReduceMax", ["a", "ax"], ["m"], keepdims=1),
            h.make_node("Div", ["m", "c"], ["s"])]
    forms = {
        "explicit": [h.make_node("Div", ["x", "s"], ["d"]), h.make_node("Round", ["d"], ["r"]),
                     h.make_node("Clip", ["r", "lo", "hi"], ["q"]), h.make_node("Mul", ["q", "s"], ["y"])],
        "blocked": [h.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=-1, block_size=k),
                    h.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=-1, block_size=k)],
    }
    err = {}
    for name, tail in forms.items():
        inits = [onnx.numpy_helper.from_array(np.array([-1], np.int64), "ax"),
                 onnx.numpy_helper.from_array(np.array(127, np.float32), "c"),
                 onnx.numpy_helper.from_array(np.array(-128, np.float32), "lo"),
                 onnx.numpy_helper.from_array(np.array(127, np.float32), "hi")]
        g = h.make_graph(head + tail, name, [h.make_tensor_value_info("x", TP.FLOAT, list(x.shape))],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)], initializer=inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
        m.ir_version = 10
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        err[name] = float(np.abs(y - want).max())
    assert err["explicit"] <= 1e-6
    assert err["blocked"] > 1e-3, ("ORT now computes blocked per-token Q/DQ correctly: consider "
                                   "sq2trt.export.PER_TOKEN_FORM = 'blocked'")


def test_what_ort_fuses_for_each_activation_form(llama, tmp_path):
    """Measured on ORT 1.31 CPU (ORT_ENABLE_EXTENDED, as build_ort_engine): a run-time per-tensor scale
    (O2) fuses into MatMulIntegerToFloat exactly where a static one (O3) does; the explicit per-token
    form (O1) never reaches an integer kernel (its INT8 weights become 8-bit MatMulNBits with float
    activations, accuracy_level 0)."""
    from sq2trt.engine import build_ort_engine

    model, names, ref = llama
    amax = {k: float(v) for k, v in collect(model, names, _ids((2, 32), 1), per_tensor_absmax).items()}
    integer = {"MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "QLinearMatMul"}
    found, nbits = {}, {}
    for level in ("O3", "O2", "O1"):
        q = tmp_path / f"{level}.onnx"
        save_onnx(insert_qdq(onnx.load(str(ref)), make_plan(names, QuantConfig(level=level), amax), level=level), q)
        ops = build_ort_engine(q, tmp_path / f"{level}.ort.onnx", device="cpu")["ops"]
        found[level] = sum(v for k, v in ops.items() if k in integer)
        nbits[level] = ops.get("MatMulNBits", 0)
    assert found["O3"] > 0 and found["O2"] == found["O3"], found
    assert found["O1"] == 0 and nbits["O1"] == len(names), (found, nbits)


# --------------------------------------------------------------------------- the paper's pattern
def test_planted_outliers_break_naive_w8a8_and_smoothing_fixes_it(llama):
    """A few persistent outlier channels (80x) make per-tensor activation scales useless for every other
    channel: naive W8A8 loses clearly more than SmoothQuant-O3 at the recipe's alpha (0.85)."""
    model0, names, _ = llama
    calib, ids = _ids((4, 64), 1), _ids((4, 64), 2)
    model = load_model("random:llama").model
    model.load_state_dict(model0.state_dict())
    with torch.no_grad():
        fp = model(ids).logits
    stats = collect(model, names, calib, per_channel_absmax)
    x = stats[names[0]]
    assert float(x.max() / x.median()) > 20  # the phenomenon is there

    def error(level):
        amax = {k: float(v) for k, v in collect(model, names, calib, per_tensor_absmax).items()}
        with fake_quantized(model, make_plan(names, QuantConfig(level=level), amax)), torch.no_grad():
            q = model(ids).logits
        return float((q - fp).norm() / fp.norm())

    naive = error("W8A8")
    smooth(model, get_arch(model), stats, 0.85)
    o3 = error("O3")
    assert naive > 3 * o3, f"W8A8 rel L2 {naive:.3g} vs O3 {o3:.3g}"


def test_alpha_search_picks_the_minimum_and_restores_the_model(llama):
    model, names, _ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect(model, names, _ids((2, 32), 1), per_channel_absmax)
    plan = make_plan(names, QuantConfig(level="W4A16"), {})
    res = search_alpha(model, get_arch(model), stats, plan, _ids((2, 32), 3))  # ~21 tiny forwards
    assert tuple(res.losses) == GRID and res.seconds > 0
    assert res.alpha == min(res.losses, key=res.losses.get)
    assert max(res.losses.values()) > 1.1 * min(res.losses.values())  # alpha changes the loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- numerics every level relies on
@pytest.mark.parametrize("family, level", [("gpt2", "O3"), ("gpt2", "ZeroQuant"), ("mixtral", "O1"),
                                           ("llama", "W4-RTN"), ("llama", "W4A16-asym"), ("llama", "O2")])
def test_fallback_local_error_is_each_gemms_own_fake_quantization_error(family, level):
    """The fallback ranks GEMMs by their local error. It must be the error of the GEMM as the level
    quantizes it: GPT-2's Conv1D weights are stored (in, out), Mixtral's experts are 3-D parameters,
    group-wise and INT4 weights are not per-tensor INT8, and dynamic activations are quantized too."""
    from sq2trt.fallback import local_errors

    model = load_model(f"random:{family}").model
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    ids = _ids((1, 24), 5)
    amax = {k: float(v) for k, v in collect(model, names, ids, per_tensor_absmax).items()}
    plan = make_plan(names, QuantConfig(level=level), amax, layout=arch.layout.value)
    got = local_errors(model, plan, ids)
    calls = {}  # each GEMM's FP call in the FP model: (args, kwargs, output)

    def keep(name, args, kwargs, out) -> None:  # returns None: a forward hook's value replaces the output
        calls.setdefault(name, (args, kwargs, out))

    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, a, k, o, _n=n: keep(_n, a, k, o), with_kwargs=True) for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for n in names:
        args, kwargs, y = calls[n]
        with fake_quantized(model, {n: plan[n]}), torch.no_grad():
            yq = model.get_submodule(n)(*args, **kwargs)
        want = float(((yq - y) ** 2).sum() / (y ** 2).sum())
        assert want > 0 and got[n] == pytest.approx(want, rel=1e-4), n


def test_fp16_requantizes_int4_block_weights_whose_scales_fall_below_fp16(llama):
    """A 2-D block scale (W4, UINT4 with zero points) below FP16's normal range is raised, and its INT4
    weights are re-quantized in their own type, range and zero point, each within half a new step."""
    from onnx import numpy_helper

    from sq2trt.fp16 import FP16_MIN_NORMAL, check, fp16_from_onnx

    model, names, ref = llama
    proto = insert_qdq(onnx.load(str(ref)), make_plan(names, QuantConfig(level="W4A16-asym"), {}), level="W4A16-asym")
    inits = {t.name: t for t in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.name.endswith("/weight/DequantizeLinear"))
    attrs = {a.name: a.i for a in dq.attribute}
    q, s, zp = (numpy_helper.to_array(inits[x]) for x in dq.input)
    assert s.ndim == 2 and attrs["block_size"] == 128
    s = s.copy()
    s[:, 0] = 3e-6  # the first block of every output channel: a subnormal FP16 scale
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(s, dq.input[1]))

    def dequant(qv, sv):
        ax = attrs["axis"]
        expand = lambda t: np.repeat(t, 128, axis=ax).take(np.arange(qv.shape[ax]), axis=ax)  # noqa: E731
        return (qv.astype(np.float64) - expand(zp).astype(np.float64)) * expand(sv).astype(np.float64), expand(sv)

    before, _ = dequant(q, s)
    out, summary = fp16_from_onnx(proto)
    check(out)
    assert summary.requantized_weights == [dq.input[0]]
    new = {t.name: t for t in out.graph.initializer}
    new_dq = next(n for n in out.graph.node if n.name == dq.name)
    assert new[new_dq.input[0]].data_type == onnx.TensorProto.UINT4
    s16 = numpy_helper.to_array(new[new_dq.input[1]]).astype(np.float32)
    assert (s16[:, 0] == FP16_MIN_NORMAL).all()
    after, step = dequant(numpy_helper.to_array(new[new_dq.input[0]]), s16)
    assert (np.abs(after - before) <= step / 2 + np.abs(before) * 2.0 ** -10).all()


def _hf_tokenizer(with_bos: bool):
    """A real Hugging Face fast tokenizer built offline; with_bos: it prefixes <s> like Llama-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("the quick brown fox jumps".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_calibration_windows_start_with_the_bos_the_tokenizer_adds():
    from sq2trt.data import bos_prefix, calibration_windows
    from sq2trt.models import ByteTokenizer

    assert bos_prefix(_hf_tokenizer(with_bos=True)) == 0
    assert bos_prefix(_hf_tokenizer(with_bos=False)) is None
    assert bos_prefix(ByteTokenizer(512)) is None
    ids = torch.arange(100, 400)
    plain = calibration_windows(ids, 4, 16, seed=0)
    first = calibration_windows(ids, 4, 16, seed=0, bos=0)
    assert first.shape == (4, 16) and (first[:, 0] == 0).all()
    assert torch.equal(first[:, 1:], plain[:, :15])  # same offsets, one text token fewer


def test_pipeline_calibrates_with_the_models_bos(calib_text, eval_text, tmp_path):
    from eval_helpers import tiny_config

    from sq2trt.pipeline import Pipeline

    pipe = Pipeline(tiny_config(calib_text, eval_text), tmp_path)
    byte = pipe.loaded.tokenizer
    assert not (pipe._windows("calib")[:, 0] == 1).all()

    def with_bos(text, add_special_tokens=True, **_):
        return {"input_ids": [1] * add_special_tokens + byte(text)["input_ids"]}

    pipe.loaded.tokenizer = with_bos
    pipe._tokens.clear()
    windows = pipe._windows("calib")
    assert (windows[:, 0] == 1).all() and not (windows[:, 1] == 1).all()


# --------------------------------------------------------------------------- end to end
# One level per code path (static unsmoothed, per-token dynamic, per-tensor dynamic smoothed, W4 with the
# alpha search); `sq2trt run --levels <all of LEVELS>` on random:llama passed too (13.5 min on a machine
# loaded 5x over; too slow for the suite).
E2E_LEVELS = ("fp", "W8A8", "ZeroQuant", "O2", "W4A16")


def test_pipeline_runs_every_kind_of_level(calib_text, eval_text, tmp_path, capsys):
    from conftest import tiny_args

    levels = list(E2E_LEVELS)
    rc = cli.main(["run", "--model", "random:llama", "--levels", ",".join(levels)]
                  + tiny_args(calib_text, eval_text, tmp_path))
    assert rc == 0
    summary = (tmp_path / "random-llama" / "summary.md").read_text()
    for level in levels:
        assert f"| {level} |" in summary
    search = (tmp_path / "random-llama" / "W4A16" / "alpha_search.json")
    assert search.is_file()
    for level in levels:
        if get_level(level).act is not None and not get_level(level).act_static:
            assert not (tmp_path / "random-llama" / level / "act_scales.json").exists()
