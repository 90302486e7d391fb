"""Loading at the checkpoint's precision and computing in FP32 one layer at a time (sq2trt.onload).

Everything here runs the CPU path (the CI machine has no GPU); the GPU path is the same hooks with
another ``device``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax
from sq2trt.config import CalibConfig, Config, EvalConfig, QuantConfig
from sq2trt.errors import ConfigError
from sq2trt.fakequant import fake_quantized, module_weights, quantized_weight
from sq2trt.models import TINY_CONFIGS, load_model
from sq2trt.onload import Layerwise, active, fp32_cpu, layerwise, needs_layerwise, units
from sq2trt.plan import make_plan
from sq2trt.smooth import apply_scales, group_scales

from conftest import tiny_args


def _half_model(name: str, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    model = load_model(f"random:{name}").model
    return model.to(dtype)


def _ids(n: int = 2, t: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and v.device == before[k].device, k
        assert torch.equal(v, before[k]), f"{k} changed"


def _write_fp16_dir(path: Path, name: str = "llama", dtype: torch.dtype = torch.float16) -> Path:
    """A tiny Hugging Face directory stored in ``dtype`` (safetensors + byte tokenizer), as
    ``sq2trt.checkpoints`` writes public shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sq2trt.checkpoints import byte_tokenizer

    cfg = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    return _write_fp16_dir(tmp_path_factory.mktemp("ckpt") / "tiny-llama-fp16")


# --------------------------------------------------------------------------- loading
def test_fp16_checkpoint_loads_as_fp16_without_an_fp32_copy(fp16_dir):
    model = load_model(str(fp16_dir)).model
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float16}
    assert sum(p.numel() * p.element_size() for p in params) == sum(p.numel() for p in params) * 2
    assert load_model(str(fp16_dir), dtype="float32").model.dtype == torch.float32
    assert load_model(str(fp16_dir), dtype="bfloat16").model.dtype == torch.bfloat16


def test_random_models_stay_fp32_unless_their_config_says_otherwise(tmp_path):
    assert load_model("random:llama").model.dtype == torch.float32  # the built-in tiny models: as before
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY_CONFIGS["opt"], "torch_dtype": "bfloat16"}))
    assert load_model(f"random:{cfg}").model.dtype == torch.bfloat16
    cfg.write_text(json.dumps(TINY_CONFIGS["opt"]))
    assert load_model(f"random:{cfg}").model.dtype == torch.float32
    assert load_model(f"random:{cfg}", dtype="float16").model.dtype == torch.float16


def test_unknown_dtype_is_a_config_error_before_loading():
    with pytest.raises(ConfigError, match="dtype"):
        Config(model="random:llama", dtype="fp8")
    with pytest.raises(ConfigError, match="dtype"):
        load_model("random:llama", dtype="int4")


# --------------------------------------------------------------------------- layer-wise compute
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_layerwise_equals_the_fp32_upcast_model(name):
    """Logits and calibration statistics of an FP16-stored model under ``layerwise`` are those of its
    FP32 upcast; the stored weights are bit for bit what they were, still FP16, hooks gone."""
    model = _half_model(name)
    ref = copy.deepcopy(model).float()
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    windows = _ids(4, 19)
    before = _snapshot(model)
    with torch.no_grad():
        want = ref(input_ids=windows, use_cache=False).logits
        want_stats = collect(ref, names, windows, per_channel_absmax, batch_size=2)
    with layerwise(model, arch, "cpu") as lw:
        assert active(model) is lw
        with torch.no_grad():
            got = model(input_ids=windows, use_cache=False).logits
        got_stats = collect(model, names, windows, per_channel_absmax, batch_size=2)
        _assert_unchanged(model, before)  # between forwards the stored tensors are in place
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert set(got_stats) == set(want_stats) == set(names)
    for n in names:
        torch.testing.assert_close(got_stats[n], want_stats[n], rtol=1e-6, atol=0)
    _assert_unchanged(model, before)
    assert active(model) is None and not model._forward_pre_hooks and not model._forward_hooks


def test_units_cover_every_tensor_once():
    for name in TINY_CONFIGS:
        model = _half_model(name)
        seen: list[int] = []
        for _, module, recurse in units(model, get_arch(model)):
            seen += [id(t) for t in module.parameters(recurse=recurse)]
            seen += [id(t) for t in module.buffers(recurse=recurse)]
        every = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        assert set(seen) == every, name
        twice = {k for k in seen if seen.count(k) > 1}
        tied = {id(model.get_input_embeddings().weight)} if model.config.tie_word_embeddings else set()
        assert twice <= tied, f"{name}: a tensor other than tied embeddings belongs to two units"


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("name", ["llama", "opt", "gpt2", "mixtral"])
def test_fake_quant_under_layerwise_quantizes_the_stored_weights_in_fp32(name, granularity):
    model = _half_model(name)
    ref = copy.deepcopy(model).float()  # an FP32 copy of the same stored weights
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    windows = _ids(2, 21, seed=3)
    stats = collect(ref, names, windows, lambda x: x.detach().abs().amax().float())
    plan = make_plan(names, QuantConfig(level="O3", weight_granularity=granularity),
                     {n: float(v) for n, v in stats.items()}, layout=arch.layout.value)
    before = _snapshot(model)
    with torch.no_grad(), fake_quantized(ref, plan):
        want = ref(input_ids=windows, use_cache=False).logits
    with layerwise(model, arch, "cpu") as lw:
        seen: dict[str, torch.Tensor] = {}
        first = names[0]
        def grab(m, _args):  # the weight the GEMM computes with, while its layer is onloaded
            seen.setdefault("w", next(iter(module_weights(m).values())).detach().clone())

        h = model.get_submodule(first).register_forward_pre_hook(grab)
        with torch.no_grad(), fake_quantized(model, plan):
            _assert_unchanged(model, before)  # no quantized copy of the model: the stored weights stay
            got = model(input_ids=windows, use_cache=False).logits
        h.remove()
        assert not lw.transforms  # fake quantization's transforms are gone after its block
    q = plan[first]
    stored = next(iter(module_weights(model.get_submodule(first)).values()))
    assert torch.equal(seen["w"], quantized_weight(stored.detach().float(), q))  # exactly, from the stored FP16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])
def test_smoothing_fp16_storage_computes_in_fp32_and_rounds_once(name):
    model = _half_model(name)
    ref = copy.deepcopy(model).float()
    arch = get_arch(model)
    stats = collect(ref, quantized_linear_names(ref, arch), _ids(2, 19), per_channel_absmax)
    folds = ("norm", "down", "o") if name in ("llama", "opt") else ("norm",)
    scales = group_scales(model, arch, stats, 0.5, folds)
    want = group_scales(ref, arch, stats, 0.5, folds)  # max|W| of FP16 weights is exact in FP32
    for k in want:
        assert torch.equal(scales[k], want[k]), k
    apply_scales(model, arch, scales)
    apply_scales(ref, arch, scales)
    for (k, got), exp in zip(model.state_dict().items(), ref.state_dict().values()):
        assert got.dtype == torch.float16, k
        assert torch.equal(got, exp.to(torch.float16)), f"{k}: not FP32 math rounded once to FP16"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_folded_tensors_are_all_that_smoothing_changes(name):
    """What alpha search saves and restores (smooth.folded_tensors) covers every tensor a fold changes."""
    from sq2trt.alpha_search import restored
    from sq2trt.smooth import ALL_FOLDS, folded_tensors

    model = _half_model(name)
    arch = get_arch(model)
    stats = collect(model.float(), quantized_linear_names(model, arch), _ids(2, 19), per_channel_absmax)
    model.half()
    scales = group_scales(model, arch, stats, 0.5, ALL_FOLDS)
    listed = {id(t) for t in folded_tensors(model, arch)}
    before = _snapshot(model)
    with restored(model, folded_tensors(model, arch)):
        apply_scales(model, arch, scales)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        tensors = dict(model.state_dict(keep_vars=True))
        assert changed and all(id(tensors[k]) in listed for k in changed), changed
    _assert_unchanged(model, before)


def test_fp32_cpu_for_the_exporter_is_exact_and_temporary():
    model = _half_model("llama")
    arch = get_arch(model)
    ids = _ids()
    before = _snapshot(model)
    lw = Layerwise(model, arch, "cpu").attach()
    with torch.no_grad():
        hooked = model(input_ids=ids, use_cache=False).logits
    with fp32_cpu(model) as m:
        assert m is model and active(model) is None and not model._forward_pre_hooks
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits
    assert active(model) is lw  # hooks back
    _assert_unchanged(model, before)
    torch.testing.assert_close(plain, hooked, rtol=0, atol=0)
    lw.detach()


def test_weightless_trace_holds_no_weight_and_gives_the_model_back():
    """The base export's trace (onload.weightless): every parameter meta and FP32 inside, buffers real FP32,
    tied parameters still one tensor, no hooks; afterwards the very same tensors, hooks back."""
    from sq2trt.onload import weightless

    model = _half_model("opt")  # OPT ties lm_head to the embedding
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    before = _snapshot(model)
    lw = Layerwise(model, get_arch(model), "cpu").attach()
    with weightless(model) as m:
        assert m is model and active(model) is None and not model._forward_pre_hooks
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float32)}
        assert all(b.device.type == "cpu" and (b.dtype == torch.float32 or not b.is_floating_point())
                   for b in model.buffers())
        assert m.lm_head.weight is m.model.decoder.embed_tokens.weight
        assert sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta") == 0
    assert active(model) is lw
    assert all(p is params[n] for n, p in model.named_parameters(remove_duplicate=False))
    _assert_unchanged(model, before)
    lw.detach()


def test_a_dropped_model_is_freed_at_once():
    """No reference cycle through the hooks: a pipeline that reloads its model frees the old one
    right away, not at some later garbage collection (a multi-GB model would linger)."""
    import gc
    import weakref

    model = _half_model("opt")
    Layerwise(model, get_arch(model), "cpu").attach()
    with torch.no_grad():
        model(input_ids=_ids(), use_cache=False)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()


def test_a_failed_onload_leaves_the_stored_weights():
    """An onload that fails (a transform raising here; out of GPU memory on a device) puts back what
    it had onloaded, and the next forward onloads and restores as usual."""
    model = _half_model("llama")
    arch = get_arch(model)
    before = _snapshot(model)
    w = model.get_submodule(quantized_linear_names(model, arch)[-1]).weight
    with layerwise(model, arch, "cpu") as lw:
        def boom(t):
            raise MemoryError("planted")

        lw.set_transform(w, boom)
        with pytest.raises(MemoryError), torch.no_grad():
            model(input_ids=_ids(), use_cache=False)
        _assert_unchanged(model, before)
        assert not lw._stored and not lw._refs
        lw.set_transform(w, None)
        with torch.no_grad():
            model(input_ids=_ids(), use_cache=False)
        _assert_unchanged(model, before)


def test_no_hooks_for_fp32_on_the_cpu(fp16_dir):
    assert not needs_layerwise(load_model("random:llama").model, torch.device("cpu"))
    assert needs_layerwise(load_model(str(fp16_dir)).model, torch.device("cpu"))


# --------------------------------------------------------------------------- the pipeline
def _config(model: str, calib: Path, evalp: Path, **kw) -> Config:
    return Config(model=model, quant=QuantConfig(level="O3", smooth_folds=("norm", "down")),
                  calib=CalibConfig(data=str(calib), num_samples=4, seq_len=64),
                  eval=EvalConfig(data=str(evalp), window=128, max_tokens=1024, compare_samples=2,
                                  compare_seq_len=64), **kw)


def test_pipeline_exports_an_fp16_checkpoint(fp16_dir, calib_text, eval_text, tmp_path):
    from sq2trt.artifacts import read_meta
    from sq2trt.pipeline import Pipeline

    pipe = Pipeline(_config(str(fp16_dir), calib_text, eval_text), tmp_path, device="cpu")
    ref, quant = pipe.export()
    model = pipe.loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # stored FP16 after the FP32 export
    assert active(model) is not None  # computing layer-wise again
    assert read_meta(ref)["max_rel_vs_torch"] < 1e-4
    assert read_meta(quant)["export_check"]["passed"]
    # the ORT engine keeps the stored FP16 weights too (saved without constant folding) and still runs every
    # planned GEMM as a fused integer kernel
    engine = pipe.build()
    size = lambda p: sum(f.stat().st_size for f in p.parent.glob(p.name + "*") if not f.name.endswith(".json"))  # noqa: E731
    assert size(engine) < 1.05 * size(quant)
    ops = read_meta(engine)["ops"]
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) == len(pipe.plan())
    h16 = pipe.h("stats")
    assert h16 != Pipeline(_config(str(fp16_dir), calib_text, eval_text, dtype="float32"), tmp_path,
                           device="cpu").h("stats")
    assert h16 == Pipeline(_config(str(fp16_dir), calib_text, eval_text, dtype="auto"), tmp_path,
                           device="cpu").h("stats")


def test_cli_export_of_an_fp16_checkpoint(fp16_dir, calib_text, eval_text, tmp_path):
    from sq2trt.cli import main

    assert main(["export", "--model", str(fp16_dir), "--level", "O3", *tiny_args(calib_text, eval_text, tmp_path)]) == 0
    assert (tmp_path / fp16_dir.name / "O3" / "O3.onnx").is_file()


def test_dtype_flag_reaches_the_config():
    from sq2trt.cli import build_parser, config_from_args

    args = build_parser().parse_args(["export", "--model", "random:llama", "--dtype", "float16"])
    assert config_from_args(args).dtype == "float16"


# --------------------------------------------------------------------------- references kept as stored
@pytest.mark.parametrize("name,dtype", [("llama", torch.float16), ("opt", torch.float16), ("gpt2", torch.float16),
                                        ("llama", torch.bfloat16)])
def test_reference_keeps_weights_as_stored_and_computes_the_model(name, dtype, tmp_path):
    """write_reference on an FP16/BF16 model: every weight the model owns is written in its stored dtype
    (half the bytes of FP32) and cast to float32 in the graph, the graph computes what PyTorch does, a base
    written that way can be retargeted again, and Q/DQ insertion reads the weights through their Casts."""
    import numpy as np
    import onnx

    from sq2trt.export import (STORED, check_against_torch, export_reference, insert_qdq, load_onnx,
                               stored_casts, write_reference)
    from sq2trt.lint import lint_model

    model = _half_model(name, dtype)
    arch = get_arch(model)
    lw = Layerwise(model, arch, "cpu").attach()
    with lw.suspended_fp32_cpu() as m:
        export_reference(m, tmp_path / "fp32.onnx")
    write_reference(load_onnx(tmp_path / "fp32.onnx", load_external_data=False), model, tmp_path / "base.onnx",
                    base_dir=tmp_path)
    assert check_against_torch(model, tmp_path / "base.onnx") < 1e-4
    g = load_onnx(tmp_path / "base.onnx")
    casts = stored_casts(g.graph)
    low = {onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.BFLOAT16}
    stored = [t for t in g.graph.initializer if t.name.endswith(STORED)]
    assert {t.data_type for t in stored} == low and len(casts) == len(stored)
    gemm_weights = [n.input[1] for n in g.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in casts]
    names = quantized_linear_names(model, arch)
    assert len(gemm_weights) >= len(names)  # every quantizable GEMM reads a stored weight
    big_fp32 = [t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 4096]
    assert not big_fp32, big_fp32  # nothing the model owns is left as FP32 (rotary tables are small)

    # a base written this way is a valid base for the next reference (smoothing rewrites it per level)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 2.0 ** -6)
    write_reference(load_onnx(tmp_path / "base.onnx", load_external_data=False), model, tmp_path / "ref.onnx",
                    base_dir=tmp_path)
    assert check_against_torch(model, tmp_path / "ref.onnx") < 1e-4

    # Q/DQ from the stored weights: the same INT8 weights as from the FP32 graph, and TensorRT's rules hold
    ids = _ids(2, 17).numpy()
    amax = {k: float(v.abs().max()) for k, v in collect(model, names, _ids(2, 17), per_channel_absmax).items()}
    plan = make_plan(names, QuantConfig(level="O3"), amax, layout=arch.layout.value)
    q_stored = insert_qdq(load_onnx(tmp_path / "ref.onnx", load_external_data=False), plan, level="O3",
                          base_dir=tmp_path)
    producers = {o: n.op_type for n in q_stored.graph.node for o in n.output}
    quantized = [n for n in q_stored.graph.node if n.op_type in ("MatMul", "Gemm")
                 and producers.get(n.input[1]) == "DequantizeLinear"]
    assert len(quantized) == len(names)  # each planned GEMM's stored weight became INT8 -> DequantizeLinear
    from sq2trt.export import refresh_weights

    ref32 = refresh_weights(load_onnx(tmp_path / "fp32.onnx"), model)  # the same weights, upcast, in memory
    q_fp32 = insert_qdq(ref32, plan, level="O3")
    ints = lambda q: {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer  # noqa: E731
                      if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("weight_int8")}
    a, b = ints(q_stored), ints(q_fp32)
    assert a.keys() == b.keys() and len(a) == len(names)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    from sq2trt.export import save_onnx

    save_onnx(q_stored, tmp_path / "O3.onnx", base_dir=tmp_path)
    assert lint_model(tmp_path / "O3.onnx")
    import onnxruntime as ort

    out = ort.InferenceSession(str(tmp_path / "O3.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.astype(np.int64)})[0]
    assert np.isfinite(out).all()
    lw.detach()


def test_compute_on_moves_the_compute_device_for_the_block_only():
    from sq2trt.onload import compute_on

    model = _half_model("llama")
    plain = load_model("random:llama").model
    with compute_on(plain, "cpu") as m:  # no Layerwise: the model itself, untouched
        assert m is plain and active(plain) is None
    lw = Layerwise(model, get_arch(model), "cpu").attach()
    lw.device = torch.device("meta")  # stands in for a GPU: any device other than the CPU
    with compute_on(model, "cpu") as m:
        assert m is model and lw.device == torch.device("cpu")
        logits = m(input_ids=_ids()).logits  # computes (a meta device could not)
        assert torch.isfinite(logits).all()
    assert lw.device == torch.device("meta")
    lw.detach()
