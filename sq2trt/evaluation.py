"""The ``evaluate`` step: perplexity three ways and zero-shot accuracy, for one pipeline level.

Perplexity (wikitext-2 raw test protocol: joined text, non-overlapping windows):

- ``torch_fp``         PyTorch, floating point (the level's prepared model: smoothed when it smooths,
                       which is the float model up to rounding)
- ``torch_fakequant``  PyTorch under the level's quantization plan (sq2trt.fakequant)
- ``engine_exact``     the exported Q/DQ ONNX run by ONNX Runtime without kernel fusions: Q/DQ
                       semantics exactly. The graph itself is verified against the plan first
                       (sq2trt.verify: ExportMismatchError when wrong). Its perplexity equals
                       ``torch_fakequant`` on benign models; where quantization is coarse, one-step
                       rounding flips from accumulation order are amplified layer by layer, so the
                       gap is reported, not gated.
- ``engine``           the optimized ORT engine (what ships; fused INT8 kernels deviate slightly).

Tasks are scored with PyTorch float (the baseline the accuracy gate compares against) and the
optimized engine.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from .tasks import Example

log = logging.getLogger(__name__)

Resolved = Sequence[tuple[str, Path, list[Example]]]


def tasks_identity(resolved: Resolved) -> list[Any]:
    return [(name, str(p), p.stat().st_size, int(p.stat().st_mtime), len(ex)) for name, p, ex in resolved]


def evaluate_pipeline(pipe, resolved: Resolved, *, batch_tokens: int = 4096) -> dict[str, Any]:
    from .engine import session
    from .errors import ExportMismatchError
    from .evaluate import (ENGINE_PPL_RTOL, ort_logits_fn, paired_summary, perplexity, relative_gap, score_tokens,
                           torch_logits_fn)
    from .fakequant import batch_invariant, fake_quantized
    from .stats import paired_drop_ci
    from .tasks import item_correct, score_examples

    seconds: dict[str, float] = {}
    engine = pipe.build()
    ref, quant = pipe.export()
    exact_path = quant if pipe.scheme.quantizes else ref
    plan = pipe.plan()
    model = pipe.prepared_model()
    windows = pipe._windows("eval")

    def ppl(which: str, fn) -> float:
        bar = pipe._progress(f"perplexity ({which})", windows.shape[0])
        t = time.perf_counter()
        try:
            return perplexity(fn, windows, progress=bar.update)
        finally:
            bar.close()
            seconds[f"ppl_{which}"] = round(time.perf_counter() - t, 2)

    scored = {}

    def paired_ppl(which: str, fn) -> float:  # per-token scores kept: the gated pair is torch_fp vs engine
        bar = pipe._progress(f"perplexity ({which})", windows.shape[0])
        t = time.perf_counter()
        try:
            scored[which] = score_tokens(fn, windows, progress=bar.update)
            return scored[which].perplexity
        finally:
            bar.close()
            seconds[f"ppl_{which}"] = round(time.perf_counter() - t, 2)

    export_check = None
    if plan:
        from .verify import check_export_files

        check = check_export_files(exact_path, ref, model, plan, f"{pipe.arch.layers}.0.",
                                   pipe._windows("compare")[:2, :64].numpy())
        if not check:
            raise ExportMismatchError(f"{exact_path} does not compute its quantization plan: {check}")
        export_check = check.to_dict()

    p: dict[str, float | None] = {}
    p["torch_fp"] = paired_ppl("torch_fp", torch_logits_fn(model))
    if plan:
        with fake_quantized(model, plan):
            p["torch_fakequant"] = ppl("torch_fakequant", torch_logits_fn(model))
    else:
        p["torch_fakequant"] = None
    p["engine_exact"] = ppl("engine_exact", ort_logits_fn(session(exact_path, device="cpu", optimize=False)))
    p["engine"] = paired_ppl("engine", ort_logits_fn(session(engine, device=pipe.device)))

    want = p["torch_fakequant"] if plan else p["torch_fp"]
    log.info("perplexities: %s", p)  # logged before the agreement check, so a failing run still shows them
    exact_gap = relative_gap(p["engine_exact"], want)
    engine_gap = relative_gap(p["engine"], want)
    if engine_gap > ENGINE_PPL_RTOL:
        log.warning("optimized engine perplexity %.4f differs from fake quantization %.4f by %.2e (> %g): ORT's "
                    "fused INT8 kernels deviate from Q/DQ semantics more than usual on this model",
                    p["engine"], want, engine_gap, ENGINE_PPL_RTOL)

    # a run-time per-tensor scale mixes the rows of a batch (padding included): such engines score one
    # request per call, so a choice's log-likelihood never depends on what it was packed with
    task_batch_tokens = batch_tokens if batch_invariant(plan) else 1
    if task_batch_tokens != batch_tokens:
        log.info("%s has run-time per-tensor scales: tasks are scored one request at a time",
                 pipe.config.quant.level)
    tasks: dict[str, Any] = {}
    for name, path, examples in resolved:
        entry: dict[str, Any] = {"file": str(path), "n": len(examples)}
        runs = [("torch_fp", torch_logits_fn(model), batch_tokens),
                ("engine", ort_logits_fn(session(engine, device=pipe.device)), task_batch_tokens)]
        correct: dict[str, dict[str, list[bool]]] = {}
        for which, fn, bt in runs:
            bar = pipe._progress(f"{name} ({which})", sum(len(e.choices) for e in examples))
            t = time.perf_counter()
            try:
                res, lls = score_examples(name, examples, fn, pipe.loaded.tokenizer, batch_tokens=bt,
                                          progress=bar.update)
            finally:
                bar.close()
            seconds[f"{name}_{which}"] = round(time.perf_counter() - t, 2)
            entry[which] = res.to_dict()
            correct[which] = item_correct(examples, lls)
        entry["acc_drop"] = entry["torch_fp"]["acc"] - entry["engine"]["acc"]
        entry["acc_norm_drop"] = entry["torch_fp"]["acc_norm"] - entry["engine"]["acc_norm"]
        # the same drops with 95% intervals paired on the items (both models answer every item)
        entry["paired"] = {key: paired_drop_ci(correct["torch_fp"][key], correct["engine"][key])
                           for key in ("acc", "acc_norm")}
        tasks[name] = entry

    e = pipe.config.eval
    return {
        "level": pipe.config.quant.level,
        "engine_hash": pipe.h("engine"),
        "perplexity": p,
        "ppl_increase": p["engine"] / p["torch_fp"] - 1.0,
        # the same increase with its 95% interval (paired on the same tokens), and top-1 agreement vs PyTorch float
        "paired": paired_summary(scored["torch_fp"], scored["engine"]),
        "agreement": {
            "engine_exact_vs_reference": exact_gap,
            "export_check": export_check,
            "engine_vs_reference": engine_gap,
            "engine_warn_above": ENGINE_PPL_RTOL,
            "reference": "torch_fakequant" if plan else "torch_fp",
        },
        "eval": {"data": e.data, "window": e.window, "max_tokens": e.max_tokens, "tokens": int(windows.numel()),
                 "windows": int(windows.shape[0])},
        "tasks": tasks,
        "seconds": seconds,
    }


# The FP16 graph a strongly typed TensorRT network is built from (<level>.fp16.onnx), scored by ONNX
# Runtime on CPU without fusions. ORT's CPU FP16 path is about twice as slow as the FP32 engine, so at
# most this many evaluation windows are scored (the first ones; the report says how many). Measured on
# SmolLM2-135M, 2 cores, 1,024-token windows, 2026-12-02 (`make engine` at CI's budget): 6.3 s per window
# for the FP16 graph vs 3.3 s for an FP32 graph on a quiet machine, 35 s vs 27 s while other jobs shared
# the cores. 4 windows (CI's whole evaluation) cost ~25 s quiet; the default budget's 16 would cost ~100 s
# quiet and ~9 minutes contended.
FP16_MAX_WINDOWS = 4


def score_fp16(pipe) -> dict[str, Any] | None:
    """Perplexity of ``<level>.fp16.onnx`` (Pipeline.trt_onnx) on the first :data:`FP16_MAX_WINDOWS`
    evaluation windows, paired with the reference's on the same tokens (perplexity increase and top-1
    agreement with 95% intervals): ``<level>/fp16_eval.json``, stamped with a hash of the FP16 graph's
    config, the reference scores' and the window count. None for levels TensorRT does not run."""
    from .artifacts import fresh, read_json, stamp, write_json
    from .config import config_hash, level_support
    from .engine import session
    from .evaluate import ort_logits_fn, paired_summary, score_tokens

    if level_support(pipe.config.quant.level, "trt") is not None:
        return None
    windows = pipe._windows("eval")
    k = min(int(windows.shape[0]), FP16_MAX_WINDOWS)
    h = config_hash(pipe.h("fp16"), pipe.h("ref_ppl"), k, "fp16-eval-v1")
    path = pipe.path("fp16_eval.json")
    if not pipe.force and fresh(path, h):
        return read_json(path)
    fp16 = pipe.trt_onnx(lint=False)
    ref = pipe._cached_ref_ppl()
    t = time.perf_counter()
    if ref is None:  # compare() writes the reference's scores; without them, score the reference here
        ref = score_tokens(ort_logits_fn(session(pipe.path("ref.onnx"), device=pipe.device)), windows[:k])
    bar = pipe._progress("perplexity (FP16 TensorRT input, ORT CPU)", k)
    try:
        scores = score_tokens(ort_logits_fn(session(fp16, device="cpu", optimize=False)), windows[:k],
                              progress=bar.update)
    finally:
        bar.close()
    result = {"file": fp16.name, "fp16_hash": pipe.h("fp16"), "runtime": "onnxruntime CPU, ORT_ENABLE_BASIC",
              "windows": k, "of_windows": int(windows.shape[0]), "window": int(windows.shape[1]),
              "paired": paired_summary(ref.head(k), scores), "seconds": round(time.perf_counter() - t, 1)}
    write_json(path, result)
    stamp(path, h)
    return result
