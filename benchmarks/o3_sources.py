"""Where does static INT8 (O3) lose accuracy on a real model? One run, printed as a table.

Each row quantizes one thing and keeps the rest in floating point (PyTorch fake quantization, which
the exported Q/DQ graph reproduces; see tests/test_levels.py): weights only (per-tensor vs
per-channel), activations only (per-tensor static, max calibration), each GEMM kind alone, and the
largest per-tensor activation ranges per GEMM. It answers "which remedy can help" before any
remedy is tried: weight granularity, smoothing, or floating-point fallback of a few GEMMs.

    PYTHONPATH=. python benchmarks/o3_sources.py --model $SQ2TRT_SMOLLM2 \
        --calib-data ../shared/data/wikitext2_tokenized/valid.txt \
        --eval-data ../shared/data/wikitext2_raw_test/wiki.test.raw
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax
from sq2trt.config import QuantConfig
from sq2trt.data import calibration_windows, eval_windows, load_text, tokenize
from sq2trt.evaluate import perplexity, torch_logits_fn
from sq2trt.fakequant import fake_quantized
from sq2trt.models import load_model
from sq2trt.plan import make_plan
from sq2trt.smooth import apply_scales, group_scales, smoothed_act_stats

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def kind_of(name: str) -> str:
    for suffix, kind in (("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("o_proj", "o"),
                         ("gate_proj", "mlp_in"), ("up_proj", "mlp_in"), ("down_proj", "down")):
        if name.endswith(suffix):
            return kind
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("SQ2TRT_SMOLLM2", ""))
    ap.add_argument("--calib-data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--calib-num", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=4096)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--alpha", type=float, default=None, help="smoothing alpha (default: the arch row's)")
    ap.add_argument("--top", type=int, default=12, help="GEMMs listed by activation range")
    ap.add_argument("--single", type=int, default=6, help="of those, measure each alone (quantized) and "
                    "each alone left in FP")
    a = ap.parse_args()
    loaded = load_model(a.model)
    model, arch = loaded.model, get_arch(loaded.model)
    alpha = arch.alpha if a.alpha is None else a.alpha
    names = quantized_linear_names(model, arch)
    calib = calibration_windows(tokenize(load_text(a.calib_data), loaded.tokenizer), a.calib_num, a.calib_len, 0)
    evalw = eval_windows(tokenize(load_text(a.eval_data), loaded.tokenizer), a.eval_window, a.eval_max_tokens)
    stats = collect(model, names, calib, per_channel_absmax)
    say(f"calibrated {calib.shape[0]}x{calib.shape[1]}; eval {evalw.numel()} tokens")
    rows: list[tuple[str, float]] = []

    def ppl(plan) -> float:
        with fake_quantized(model, plan):
            return perplexity(torch_logits_fn(model), evalw)

    def row(label: str, plan) -> float:
        t = time.perf_counter()
        v = ppl(plan)
        rows.append((label, v))
        say(f"ROW {label}: {v:.3f} ({time.perf_counter() - t:.0f} s)")
        return v

    fp = row("fp", {})
    amax = {n: float(stats[n].max()) for n in names}
    pt = make_plan(names, QuantConfig(level="O3"), amax)
    pc = make_plan(names, QuantConfig(level="O3", weight_granularity="per-channel"), amax)
    w_only = {n: dataclasses.replace(q, act_amax=None) for n, q in pt.items()}
    wc_only = {n: dataclasses.replace(q, act_amax=None) for n, q in pc.items()}
    row("W8 per-tensor weights only", w_only)
    row("W8 per-channel weights only", wc_only)
    # activations only: per-channel weights at 8 bits are near-lossless (row above), so use them
    row("A8 static per-tensor + W8 per-channel (no smoothing)", pc)
    for kind in ("qkv", "o", "mlp_in", "down"):
        row(f"  only {kind} GEMMs (A8 + W8 per-channel)", {n: q for n, q in pc.items() if kind_of(n) == kind})
    ranked = sorted(names, key=lambda n: -amax[n])
    say("largest activation ranges: " + ", ".join(f"{n.split('model.')[-1]}={amax[n]:.0f}" for n in ranked[:a.top]))
    median = sorted(amax.values())[len(amax) // 2]
    say(f"median per-tensor amax {median:.1f}")
    for n in ranked[: a.single]:
        row(f"  only {n} (amax {amax[n]:.0f})", {n: pc[n]})
    for n in ranked[: a.single]:
        row(f"  all but {n}", {m: q for m, q in pc.items() if m != n})
    for k in (1, 2, 4, 8):
        row(f"  all but the {k} largest ranges", {m: q for m, q in pc.items() if m not in set(ranked[:k])})

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scales = group_scales(model, arch, stats, alpha)
    apply_scales(model, arch, scales)
    sm = smoothed_act_stats(model, arch, stats, scales)
    samax = {n: float(sm[n].max()) for n in names}
    spt = make_plan(names, QuantConfig(level="O3"), samax)
    spc = make_plan(names, QuantConfig(level="O3", weight_granularity="per-channel"), samax)
    row(f"O3 alpha {alpha} per-tensor weights", spt)
    row(f"O3 alpha {alpha} per-channel weights", spc)
    sranked = sorted(names, key=lambda n: -samax[n])
    for k in (1, 2, 4, 8):
        row(f"  O3 per-channel, all but the {k} largest ranges",
            {m: q for m, q in spc.items() if m not in set(sranked[:k])})
    model.load_state_dict(saved)

    print(f"\n{a.model}: calibration {a.calib_num}x{a.calib_len}, eval {evalw.numel()} tokens\n")
    print("| quantized | perplexity | vs fp |\n|---|---|---|")
    for label, v in rows:
        print(f"| {label} | {v:.3f} | {v / fp - 1:+.2%} |")
    print("\nlargest per-tensor input ranges (no smoothing): " +
          ", ".join(f"{n}={amax[n]:.0f}" for n in ranked[:a.top]))
    print(f"after smoothing alpha {alpha}: " + ", ".join(f"{n}={samax[n]:.0f}" for n in sranked[:a.top]))


if __name__ == "__main__":
    main()
