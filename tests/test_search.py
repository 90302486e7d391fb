"""SmoothQuant+ alpha search through the pipeline: it must smooth exactly as the level then does."""
from __future__ import annotations

import pytest
import torch

from sq2trt.artifacts import read_json, read_meta
from sq2trt.config import CalibConfig, Config, EvalConfig, QuantConfig

ALL_FOLDS = ("norm", "down", "o")


def _pipe(tmp_path, calib_text, eval_text, folds):
    from sq2trt.pipeline import Pipeline

    cfg = Config(model="random:llama", quant=QuantConfig(level="W4A16", smooth_folds=folds),
                 calib=CalibConfig(data=str(calib_text), num_samples=4, seq_len=64),
                 eval=EvalConfig(data=str(eval_text), window=128, max_tokens=1024, compare_samples=2,
                                 compare_seq_len=64))
    return Pipeline(cfg, tmp_path)


def _loss(model, plan, windows, ref) -> float:
    """The search's loss (mean per-token KL vs floating point) of ``model`` as it stands."""
    from sq2trt.fakequant import fake_quantized
    from sq2trt.search import output_loss

    total = 0.0
    with torch.no_grad(), fake_quantized(model, plan):
        for i, r in enumerate(ref):
            total += float(output_loss(r, model(input_ids=windows[4 * i: 4 * i + 4], use_cache=False).logits))
    return total / windows.numel()


def test_the_searched_loss_is_the_loss_of_the_model_the_level_builds(tmp_path, calib_text, eval_text):
    from sq2trt.models import load_model
    from sq2trt.plan import make_plan
    from sq2trt.smooth import apply_scales, group_scales

    pipe = _pipe(tmp_path, calib_text, eval_text, ALL_FOLDS)
    alpha = pipe.alpha  # runs the search
    searched = read_json(pipe.path("alpha_search.json"))["losses"][f"{alpha:.2f}"]
    windows = pipe._windows("calib")
    fp = load_model("random:llama").model
    with torch.no_grad():
        ref = [fp(input_ids=windows[i: i + 4], use_cache=False).logits.to(torch.bfloat16)
               for i in range(0, windows.shape[0], 4)]
    plan = make_plan(pipe.gemm_names(), pipe.config.quant, {}, layout=pipe.arch.layout.value)
    level = _loss(pipe.prepared_model(), plan, windows, ref)  # smoothed by the level's own smooth()
    assert level == pytest.approx(searched, rel=1e-3)
    # the folds matter here, so a search smoothing other groups than the level could not match
    from safetensors.torch import load_file

    stats = load_file(str(pipe.calibrate()))
    norm_only = load_model("random:llama").model
    apply_scales(norm_only, pipe.arch, group_scales(norm_only, pipe.arch, stats, alpha, ("norm",)))
    assert abs(_loss(norm_only, plan, windows, ref) - level) > 0.01 * level


def test_the_search_is_redone_when_the_folds_change(tmp_path, calib_text, eval_text):
    first = _pipe(tmp_path, calib_text, eval_text, ("norm",))
    first.alpha
    path = first.path("alpha_search.json")
    h, mtime = read_meta(path)["config_hash"], path.stat().st_mtime_ns
    _pipe(tmp_path, calib_text, eval_text, ("norm",)).alpha
    assert path.stat().st_mtime_ns == mtime  # same folds: reused
    _pipe(tmp_path, calib_text, eval_text, ALL_FOLDS).alpha
    assert read_meta(path)["config_hash"] != h and path.stat().st_mtime_ns != mtime
