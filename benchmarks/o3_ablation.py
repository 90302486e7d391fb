"""Ablation of the O3 (static per-tensor INT8) remedies on a real model; prints a table.

Rows (each adds to the one above): fp, W8A8 naive (no smoothing), O3 norm folding only (the paper's
O3: per-tensor weights), + per-channel weights (--weight-granularity; TensorRT accepts per-channel
INT8 weight scales), + down_proj fold, + o_proj fold, + clipping (max, percentile or MSE-optimal per GEMM kind, whichever
gives the lowest whole-model KL on calibration windows), + per-kind alpha search,
+ automatic FP fallback (target on held-out calibration windows). Perplexity on the evaluation
text (wikitext-2 raw test); every choice is made on calibration text only (wikitext-2 valid).
Perplexities use PyTorch fake quantization, which equals the exact Q/DQ ONNX graph
(tests/test_o3.py::test_folded_export_has_same_ops_lints_and_matches_fakequant). With --latency
the last row and the all-INT8 row are exported, built as ORT engines, and timed side by side
(prefill, batch 4 x 256 tokens, alternating runs).

    PYTHONPATH=. python benchmarks/o3_ablation.py --model $SQ2TRT_SMOLLM2 \
        --calib-data ../shared/data/wikitext2_tokenized/valid.txt \
        --eval-data ../shared/data/wikitext2_raw_test/wiki.test.raw
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from sq2trt.alpha_search import amax_loss, logits_of, search_alphas
from sq2trt.archs import gemm_kind, get_arch, quantized_linear_names
from sq2trt.calibrate import collect, collect_with, per_channel_absmax
from sq2trt.clipping import choose_clips, clip_candidates, clip_from_hist, hist_update
from sq2trt.config import QuantConfig
from sq2trt.data import calibration_starts, calibration_windows, eval_windows, load_text, tokenize
from sq2trt.evaluate import perplexity, torch_logits_fn
from sq2trt.fakequant import fake_quantized
from sq2trt.fallback import auto_fallback, heldout_windows
from sq2trt.models import load_model
from sq2trt.plan import make_plan
from sq2trt.smooth import apply_scales, group_scales, smoothed_act_stats

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def ppl(model, windows) -> float:
    return perplexity(torch_logits_fn(model), windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("SQ2TRT_SMOLLM2", ""))
    ap.add_argument("--calib-data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--calib-num", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--hist-num", type=int, default=0, help="calibration windows for the clipping histograms "
                    "(default: all)")
    ap.add_argument("--eval-max-tokens", type=int, default=8192)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--clip-everywhere-row", action="store_true",
                    help="also measure MSE clipping on every GEMM (the naive clipping row)")
    ap.add_argument("--search-windows", type=int, default=2)
    ap.add_argument("--search-len", type=int, default=256)
    ap.add_argument("--alpha-step", type=float, default=0.05)
    ap.add_argument("--max-ppl-increase", type=float, default=0.01)
    ap.add_argument("--heldout-num", type=int, default=2)
    ap.add_argument("--measure-top", type=int, default=16)
    ap.add_argument("--max-fallback", type=int, default=None)
    ap.add_argument("--latency", action="store_true", help="export the last and the all-INT8 rows, time ORT")
    ap.add_argument("--out", default="build/o3_ablation")
    ap.add_argument("--weight-granularity", default="per-channel", choices=("per-tensor", "per-channel"),
                    help="weights of every row after 'O3 norm folding only' (that row is per-tensor, as in the paper)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "onnxscript", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(a.model)
    model, arch = loaded.model, get_arch(loaded.model)
    say(f"loaded {a.model}")
    cids = tokenize(load_text(a.calib_data), loaded.tokenizer)
    calib = calibration_windows(cids, a.calib_num, a.calib_len, 0)
    starts = calibration_starts(cids.numel(), a.calib_num, a.calib_len, 0)
    heldout = heldout_windows(cids, starts, a.calib_len, a.heldout_num, a.calib_len)
    evalw = eval_windows(tokenize(load_text(a.eval_data), loaded.tokenizer), a.eval_window, a.eval_max_tokens)
    search = calib[: a.search_windows, : a.search_len]
    names = quantized_linear_names(model, arch)
    base_alpha = arch.alpha
    rows: list[dict] = []

    def row(label: str, value: float, **extra) -> None:
        rows.append({"row": label, "ppl": value, **extra})
        say(f"ROW {label}: ppl {value:.3f} {extra if extra else ''}")
        (out / "rows.json").write_text(json.dumps(rows, indent=2))

    row("fp", ppl(model, evalw))
    stats = collect(model, names, calib, per_channel_absmax)
    say("per-channel stats collected")

    wg = a.weight_granularity

    def quant_ppl(folds, alphas, amax_of, fp=(), granularity=None) -> tuple[float, dict]:
        q = QuantConfig(smooth_folds=folds or ("norm",), weight_granularity=granularity or wg)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            scales = group_scales(model, arch, stats, alphas, folds) if folds else {}
            apply_scales(model, arch, scales)
            amax = amax_of(scales)
            plan = make_plan([n for n in names if n not in set(fp)], q, amax)
            with fake_quantized(model, plan):
                return ppl(model, evalw), amax
        finally:
            model.load_state_dict(saved)

    def max_amax(scales):
        s = smoothed_act_stats(model, arch, stats, scales)
        return {n: float(s[n].max()) for n in names}

    row("W8A8 naive (no smoothing)", quant_ppl((), base_alpha, max_amax, granularity="per-tensor")[0])
    norm_alpha = {"qkv": base_alpha, "mlp_in": base_alpha, "down": base_alpha, "o": base_alpha}
    row("O3 norm folding only", quant_ppl(("norm",), norm_alpha, max_amax, granularity="per-tensor")[0])
    if wg != "per-tensor":
        row(f"+ {wg} weights", quant_ppl(("norm",), norm_alpha, max_amax)[0])
    row("+ down_proj fold", quant_ppl(("norm", "down"), norm_alpha, max_amax)[0])
    folds = ("norm", "down", "o")
    row("+ o_proj fold", quant_ppl(folds, norm_alpha, max_amax)[0])

    hist_windows = calib[: a.hist_num] if a.hist_num else calib
    q_all = QuantConfig(smooth_folds=folds, weight_granularity=wg)
    kinds = {n: gemm_kind(arch, n) for n in names}
    ref_search = logits_of(model, search)
    choices: dict = {}

    def clip_amax(scales):
        """Per GEMM kind, max / percentile / MSE clip, whichever gives the lowest KL on the search
        windows (calibration text). Runs on the smoothed model (``quant_ppl`` folded ``scales``)."""
        exact = smoothed_act_stats(model, arch, stats, scales)
        hists = collect_with(model, names, hist_windows, hist_update)
        cands = clip_candidates(hists, {n: float(exact[n].max()) for n in names})
        ch = choose_clips(kinds, cands, amax_loss(model, names, q_all, search, ref_search))
        choices["last"] = ch
        say(f"clip choice {ch.methods}: KL {ch.start_loss:.4g} -> {ch.loss:.4g}")
        return ch.amax

    def mse_everywhere(scales):
        hists = collect_with(model, names, hist_windows, hist_update)
        return {n: clip_from_hist(h, "mse") for n, h in hists.items()}

    if a.clip_everywhere_row:
        row("  (MSE clipping on every GEMM; not kept)", quant_ppl(folds, norm_alpha, mse_everywhere)[0])
    p, _ = quant_ppl(folds, norm_alpha, clip_amax)
    row("+ clipping (per kind: max/percentile/MSE by calibration KL)", p, clips=choices["last"].methods)

    res = search_alphas(model, arch, stats, names, q_all, search, step=a.alpha_step, ref_logits=ref_search)
    say(f"alpha search: {res.alphas} loss {res.start_loss:.4g} -> {res.loss:.4g} ({len(res.history)} evals)")
    p_alpha, amax_alpha = quant_ppl(folds, res.alphas, clip_amax)
    row("+ alpha search (clipping re-chosen)", p_alpha, alphas=res.alphas, kl=[res.start_loss, res.loss],
        clips=choices["last"].methods)

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_scales(model, arch, group_scales(model, arch, stats, res.alphas, folds))
    plan = make_plan(names, q_all, amax_alpha)
    fb = auto_fallback(model, plan, search, heldout, a.max_ppl_increase, measure_top=a.measure_top,
                       max_layers=a.max_fallback)
    say(f"fallback: {len(fb.fallback)} GEMMs {fb.fallback} held-out increase {fb.increase:.4f} met={fb.met}")
    with fake_quantized(model, {n: q for n, q in plan.items() if n not in set(fb.fallback)}):
        p_fb = ppl(model, evalw)
    row(f"+ automatic fallback ({len(fb.fallback)} GEMMs in FP)", p_fb, fallback=fb.fallback,
        heldout_increase=fb.increase, met=fb.met)

    fp = rows[0]["ppl"]
    print(f"\nO3 ablation: {a.model}\ncalibration {a.calib_num}x{a.calib_len} tokens of {a.calib_data}; "
          f"eval {evalw.numel()} tokens ({evalw.shape[0]} x {a.eval_window}) of {a.eval_data}\n")
    print("| row | perplexity | vs fp |\n|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['ppl']:.3f} | {r['ppl'] / fp - 1:+.2%} |")
    print(f"\nalpha per kind: {res.alphas} (start {base_alpha}); fallback: {fb.fallback}")

    if a.latency:
        latency(a, model, loaded, plan, fb.fallback, out)
    model.load_state_dict(saved)


def latency(a, model, loaded, plan, fallback, out: Path) -> None:
    """Export the all-INT8 and the fallback rows from one graph; time ORT prefill side by side."""
    import numpy as np

    from sq2trt.engine import build_ort_engine, session
    from sq2trt.export import check_against_torch, export_reference, insert_qdq, load_onnx, save_onnx

    ref = out / "ref.onnx"
    export_reference(model, ref)  # the smoothed model (current weights)
    say(f"exported reference, max rel vs torch {check_against_torch(model, ref):.2e}")
    engines = {}
    for label, p in (("all INT8", plan), (f"{len(fallback)} GEMMs FP", {n: q for n, q in plan.items()
                                                                         if n not in set(fallback)})):
        q = out / f"q{len(p)}.onnx"
        save_onnx(insert_qdq(load_onnx(ref), p, level="O3"), q)
        eng = out / f"q{len(p)}.ort.onnx"
        build_ort_engine(q, eng, device="cpu")
        engines[label] = session(eng, device="cpu")
    ids = np.random.default_rng(0).integers(0, 1000, (4, 256)).astype(np.int64)
    times = {k: [] for k in engines}
    for s in engines.values():
        s.run(None, {"input_ids": ids})  # warm-up
    for _ in range(3):
        for k, s in engines.items():
            t = time.perf_counter()
            s.run(None, {"input_ids": ids})
            times[k].append(time.perf_counter() - t)
    print("\nORT prefill latency, batch 4 x 256 tokens (median of 3, alternating):")
    for k, v in times.items():
        print(f"  {k}: {sorted(v)[1] * 1000:.0f} ms  (runs: {', '.join(f'{x * 1000:.0f}' for x in v)})")


if __name__ == "__main__":
    main()
