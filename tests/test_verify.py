"""The export check passes on honest graphs and fails on each kind of wrong one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax, per_tensor_absmax
from sq2trt.config import QuantConfig
from sq2trt.export import export_reference, insert_qdq, load_onnx
from sq2trt.models import load_model
from sq2trt.plan import make_plan
from sq2trt.smooth import smooth
from sq2trt.verify import check_export


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    loaded = load_model("random:llama")
    model, arch = loaded.model, get_arch(loaded.model)
    d = tmp_path_factory.mktemp("verify")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    names = quantized_linear_names(model, arch)
    smooth(model, arch, collect(model, names, ids, per_channel_absmax), arch.alpha)
    export_reference(model, d / "ref.onnx")
    amax = {k: float(v) for k, v in collect(model, names, ids, per_tensor_absmax).items()}
    plan = make_plan(names, QuantConfig(level="O3", weight_granularity="per-channel"), amax)
    ref = load_onnx(d / "ref.onnx")
    return model, plan, ref, insert_qdq(ref, plan, level="O3"), ids[:2, :24].numpy()


def _tamper(model_proto, suffix, fn):
    for init in model_proto.graph.initializer:
        if init.name.startswith("model_layers_0_") and init.name.endswith(suffix):
            init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init)), init.name))
            return model_proto
    raise AssertionError(f"no initializer ending with {suffix}")


def test_honest_export_passes(case):
    model, plan, ref, quant, ids = case
    check = check_export(quant, ref, model, plan, "model.layers.0.", ids)
    assert check, str(check)
    assert check.act_mismatch_fraction == 0.0 and check.weights_only_max_rel < 1e-5 and check.weights_identical


@pytest.mark.parametrize("suffix, fn", [
    ("input_scale", lambda s: (s * 2).astype(np.float32)),  # wrong activation scale
    ("weight_int8", lambda w: np.flip(w, axis=1).copy()),  # weights in the wrong order (axis mix-up)
    ("weight_scale", lambda s: (s * 1.5).astype(np.float32)),  # wrong weight scale
])
def test_wrong_export_fails(case, suffix, fn):
    model, plan, ref, quant, ids = case
    bad = type(quant)()
    bad.CopyFrom(quant)
    check = check_export(_tamper(bad, suffix, fn), ref, model, plan, "model.layers.0.", ids)
    assert not check, str(check)
