"""Dynamic activation levels (W8A8-dyn, ZeroQuant, O1, O2) on batches that mix sequences and padding.

A run-time per-tensor scale is max|x| over the whole (batch, tokens, channels) GEMM input, in the
exported graph (``ReduceMax`` over every axis: the form ONNX Runtime fuses into its integer kernels)
and in PyTorch fake quantization alike. So the other rows of a batch, and the right-padding that
``sq2trt.tasks`` adds (id 0), change every row's scale: the graph and fake quantization agree with each
other, but a sequence's logits depend on what it is batched with. Per-token and static scales do not
mix rows. ``sq2trt.fakequant.batch_invariant`` says which plans are which, and evaluation scores the
others one sequence at a time.

Tolerance for graph vs fake quantization: see tests/test_families.py (one-step flips from accumulation
order, up to ~1.2e-3 relative on these tiny models; 2e-3).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.config import LEVELS, QuantConfig
from sq2trt.export import INPUT, OUTPUT, export_reference, insert_qdq, save_onnx
from sq2trt.fakequant import batch_invariant, fake_quantized
from sq2trt.models import load_model
from sq2trt.plan import make_plan

QUANT_LEVELS = [lv for lv, s in LEVELS.items() if s.quantizes]
DYNAMIC = [lv for lv, s in LEVELS.items() if s.act is not None and not s.act_static]
TOL = 2e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = load_model("random:llama").model
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # distinct norm weights (the exporter merges equal constants)
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    names = quantized_linear_names(model, get_arch(model))
    ref = tmp_path_factory.mktemp("dyn") / "ref.onnx"
    export_reference(model, ref)
    amax = {n: 8.0 for n in names}  # static levels only need some scale here
    return model, names, onnx.load(str(ref)), amax


def _padded_batch():
    """Row 0: a 12-token sequence right-padded with id 0 to 20 (as sq2trt.tasks pads); row 1: 20 other tokens."""
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(1, 512, (12,), generator=g), torch.randint(1, 512, (20,), generator=g)
    batch = torch.zeros((2, 20), dtype=torch.int64)
    batch[0, :12], batch[1] = short, long
    return short[None], batch


def _logits(model, plan, ids):
    with fake_quantized(model, plan), torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("level", DYNAMIC)
def test_graph_and_fakequant_agree_on_a_padded_mixed_batch(tiny, level, tmp_path):
    from sq2trt.engine import session

    model, names, ref, amax = tiny
    plan = make_plan(names, QuantConfig(level=level), amax)
    path = tmp_path / f"{level}.onnx"
    save_onnx(insert_qdq(ref, plan, level=level), path)
    _, batch = _padded_batch()
    got = session(path, device="cpu", optimize=False).run([OUTPUT], {INPUT: batch.numpy()})[0]
    want = _logits(model, plan, batch)
    gap = _rel(got, want)
    assert gap <= TOL, gap
    # the agreement is not trivial: a graph that computed one scale per row (or ignored the padding)
    # would differ from fake quantization by what mixing the rows does, far above the gap
    if not batch_invariant(plan):
        per_row = np.concatenate([_logits(model, plan, batch[i: i + 1]) for i in range(2)])
        assert _rel(per_row, want) > 2 * gap + 1e-4, (_rel(per_row, want), gap)


@pytest.mark.parametrize("level", QUANT_LEVELS)
def test_batch_invariant_says_whether_padding_changes_a_sequence(tiny, level):
    model, names, _, amax = tiny
    plan = make_plan(names, QuantConfig(level=level), amax)
    alone, batch = _padded_batch()
    a = _logits(model, plan, alone)[0]
    b = _logits(model, plan, batch)[0, : alone.shape[1]]
    moved = _rel(b, a)
    if batch_invariant(plan):
        assert moved <= 1e-5, (level, moved)  # float rounding of a different batch shape only
    else:
        assert LEVELS[level].act is not None and str(LEVELS[level].act) == "per-tensor"
        assert moved > 1e-3, (level, moved)


def test_per_tensor_dynamic_engine_scores_tasks_one_sequence_at_a_time(calib_text, eval_text, tmp_path,
                                                                       monkeypatch):
    """O2's engine must never see a padded or mixed batch when it scores tasks: each choice's
    log-likelihood would then depend on the requests packed with it (by default 4,096 tokens a batch)."""
    import sq2trt.evaluate as evaluate
    from eval_helpers import tiny_config, tiny_task_file
    from sq2trt.pipeline import Pipeline

    shapes: list[tuple[int, ...]] = []
    real = evaluate.ort_logits_fn

    def recording(sess):
        fn = real(sess)
        return lambda ids: (shapes.append(tuple(ids.shape)), fn(ids))[1]

    monkeypatch.setattr(evaluate, "ort_logits_fn", recording)
    cfg = tiny_config(calib_text, eval_text, level="O2")
    ev = Pipeline(cfg, tmp_path / "build").evaluate([str(tiny_task_file(tmp_path))])
    assert ev["agreement"]["export_check"]["passed"]
    task_calls = [s for s in shapes if s[1] != cfg.eval.window]  # the rest: perplexity windows
    assert len(task_calls) == 6, shapes  # mini: 3 examples x 2 choices, one engine call each
    assert all(b == 1 for b, _ in shapes), shapes
