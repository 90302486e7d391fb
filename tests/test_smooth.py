"""Smoothing numerics and the output-preservation invariant for every architecture in the table."""
from __future__ import annotations

import pytest
import torch

from sq2trt.archs import ARCHS, get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax
from sq2trt.export import LogitsOnly
from sq2trt.models import TINY_CONFIGS, load_model
from sq2trt.numerics import fake_quant, int8_scale, quantize, smoothing_scales
from sq2trt.smooth import smooth

TABLE_TINY = [k for k, v in TINY_CONFIGS.items() if v["architectures"][0] in ARCHS]


def test_every_table_row_has_a_tiny_config():
    covered = {TINY_CONFIGS[k]["architectures"][0] for k in TABLE_TINY}
    assert covered == set(ARCHS), f"rows without a tiny test config: {set(ARCHS) - covered}"


def test_smoothing_scales_formula_and_clamps():
    x = torch.tensor([4.0, 1.0, 0.0, 1e-9])
    w = torch.tensor([1.0, 4.0, 2.0, 1.0])
    s = smoothing_scales(x, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))  # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)
    assert s[2] == 1.0  # a channel that never fires is left alone
    assert s[3] == pytest.approx((1e-5) ** 0.5 / 1.0)  # max|X| clamped to 1e-5 before the power
    assert torch.isfinite(s).all() and (s > 0).all()
    # alpha = 1 moves everything into the weights: s = max|X|
    assert torch.allclose(smoothing_scales(x[:2], w[:2], 1.0), x[:2])


def test_int8_numerics_round_half_even_and_clamp():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -300.0])
    assert quantize(x, s).tolist() == [0, 2, 2, 0, 127, -128]
    assert fake_quant(torch.tensor([1.26]), torch.tensor(0.5)).item() == pytest.approx(1.5)
    assert int8_scale(0.0) > 0  # an all-zero tensor still gets a valid TensorRT scale


@pytest.mark.parametrize("kind", TABLE_TINY)
def test_smoothing_preserves_outputs(kind):
    loaded = load_model(f"random:{kind}")
    model, arch = loaded.model, get_arch(loaded.model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = LogitsOnly(model)(ids)
    stats = collect(model, quantized_linear_names(model, arch), ids, per_channel_absmax)
    scales = smooth(model, arch, stats, alpha=arch.alpha)
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())  # it did something
    with torch.no_grad():
        out = LogitsOnly(model)(ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"{kind}: smoothing changed the FP32 output by {rel:.2e} (relative)"


def test_smoothing_flattens_planted_outliers():
    """The point of SmoothQuant: after smoothing, an outlier channel's activation range shrinks."""
    loaded = load_model("random:llama")
    model, arch = loaded.model, get_arch(loaded.model)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight[[3, 17]] *= 80.0  # persistent outlier channels at the q/k/v input
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    names = quantized_linear_names(model, arch)
    before = collect(model, names, ids, per_channel_absmax)["model.layers.0.self_attn.q_proj"]
    smooth(model, arch, collect(model, names, ids, per_channel_absmax), alpha=0.5)
    after = collect(model, names, ids, per_channel_absmax)["model.layers.0.self_attn.q_proj"]
    ratio = lambda t: (t.max() / t.median()).item()  # noqa: E731
    assert ratio(after) < ratio(before) / 4
