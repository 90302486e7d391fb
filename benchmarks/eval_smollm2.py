"""Accuracy of SmolLM2-135M at fp / W8A8 / O3: perplexity three ways, COPA and OpenBookQA, worst layers.

    SQ2TRT_SMOLLM2=/path/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONPATH=. python benchmarks/eval_smollm2.py \
        [--out build] [--data ../shared/data] [--alphas 0.5,0.7,0.85] [--task-limit 0]

Same as running, per level, ``sq2trt evaluate`` / ``sq2trt diagnose`` / ``sq2trt report`` with
``--calib-num-samples 32 --calib-seq-len 512 --eval-max-tokens 16384 --eval-window 1024`` and
``sq2trt sweep``, but the model is loaded once. Prints one table, measured in this run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from sq2trt.config import Config, QuantConfig
from sq2trt.pipeline import Pipeline


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SQ2TRT_SMOLLM2", "build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=os.environ.get("SQ2TRT_DATA", "../shared/data"))
    ap.add_argument("--out", default="build")
    ap.add_argument("--alphas", default="0.5,0.7")  # O3's own alpha (0.85) is added from the O3 run
    ap.add_argument("--task-limit", type=int, default=0, help="first N examples of each task (0: all)")
    ap.add_argument("--calib-num-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=16384)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--levels", default="fp,W8A8,O3", help="levels to evaluate (tasks and sweep use O3)")
    ap.add_argument("--report-levels", default="fp,W8A8,O3", help="levels to write report.html for (each "
                    "adds the compare step's two perplexity passes)")
    ap.add_argument("--tasks", default="copa,openbookqa")
    ap.add_argument("--recipe", default="recipes/llama.yaml", help="recipe the quantized levels start from "
                    "(as make engine uses); '' for the built-in defaults")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    d = Path(args.data)
    from sq2trt.config import load_recipe, merge

    recipe = load_recipe(args.recipe) if args.recipe else {}
    base = Config.from_dict(merge(recipe, {
        "model": args.model,
        "calib": {"data": str(d / "wikitext2_tokenized/valid.txt"), "num_samples": args.calib_num_samples,
                  "seq_len": args.calib_seq_len},
        "eval": {"data": str(d / "wikitext2_raw_test/wiki.test.raw"), "window": args.eval_window,
                 "max_tokens": args.eval_max_tokens},
    }))
    tasks = [t for t in args.tasks.split(",") if t]
    t0 = time.perf_counter()
    rows, shared, secs = {}, None, {}
    for level in [lv for lv in ("fp", "W8A8", "O3") if lv in args.levels.split(",")]:
        # the recipe's quant section is O3's; W8A8 stays the paper's naive baseline (per-tensor, no smoothing)
        quant = {"level": level} if level == "O3" else {**QuantConfig(level=level).__dict__}
        pipe = Pipeline(base.replace(quant=quant), args.out)
        if shared is not None:
            pipe.adopt(shared)
        t = time.perf_counter()
        ev = pipe.evaluate(tasks if level == "O3" else (), task_limit=args.task_limit, task_data=str(d))
        secs[f"evaluate {level}"] = time.perf_counter() - t
        diag = None
        if level != "fp":
            t = time.perf_counter()
            diag = pipe.diagnose()
            secs[f"diagnose {level}"] = time.perf_counter() - t
        rep = None
        if level in args.report_levels.split(","):
            t = time.perf_counter()
            rep = pipe.report()
            secs[f"report {level}"] = time.perf_counter() - t
        rows[level] = (ev, diag, rep, pipe)
        shared = pipe
    if args.alphas:
        from sq2trt.artifacts import write_json
        from sq2trt.plots import alpha_sweep, plot_alpha_sweep

        t = time.perf_counter()
        cfg = base.replace(quant={"level": "O3"})
        pts = alpha_sweep(cfg, [float(a) for a in args.alphas.split(",")], args.out)
        o3 = rows["O3"]
        pts.append({"alpha": o3[3].alpha, "ppl": o3[0]["perplexity"]["torch_fakequant"]})
        fp_ppl = rows["fp"][0]["perplexity"]["torch_fp"]
        naive = rows["W8A8"][0]["perplexity"]["torch_fakequant"]
        md = rows["O3"][3].model_dir
        write_json(md / "alpha_sweep.json", {"points": pts, "fp_ppl": fp_ppl, "naive_ppl": naive, "level": "O3",
                                             "metric": "PyTorch fake-quant perplexity"})
        plot_alpha_sweep(pts, md / "alpha_sweep.png", fp_ppl=fp_ppl, naive_ppl=naive)
        secs["alpha sweep"] = time.perf_counter() - t
        if "O3" in args.report_levels.split(","):
            rows["O3"][3].report()  # picks up the sweep plot
    total = time.perf_counter() - t0

    print(f"\n## Perplexity, wikitext-2 raw test, first {args.eval_max_tokens} tokens, {args.eval_window}-token "
          f"windows; calibration {args.calib_num_samples} x {args.calib_seq_len} tokens of wikitext-2 valid")
    print("| level | torch fp | torch fake-quant | exact Q/DQ graph (ORT) | ORT engine | exact vs fq | engine vs fq | engine vs fp |")
    print("|---|---|---|---|---|---|---|---|")
    for level, (ev, _, _, _) in rows.items():
        p, ag = ev["perplexity"], ev["agreement"]
        fq = "n/a" if p["torch_fakequant"] is None else f"{p['torch_fakequant']:.4f}"
        print(f"| {level} | {p['torch_fp']:.4f} | {fq} | {p['engine_exact']:.4f} | {p['engine']:.4f} | "
              f"{ag['engine_exact_vs_reference']:.2e} | {ag['engine_vs_reference']:.2e} | {ev['ppl_increase']:+.2%} |")
    print("\n## Zero-shot (lm-eval prompts), float = PyTorch, O3 = ORT engine")
    print("| task | n | acc float | acc O3 | acc_norm float | acc_norm O3 |")
    print("|---|---|---|---|---|---|")
    for name, t in (rows["O3"][0]["tasks"] if "O3" in rows else {}).items():
        f, e = t["torch_fp"], t["engine"]
        print(f"| {name} | {t['n']} | {f['acc']:.4f} ± {f['acc_stderr']:.4f} | {e['acc']:.4f} ± {e['acc_stderr']:.4f} | "
              f"{f['acc_norm']:.4f} | {e['acc_norm']:.4f} |")
    for level in [lv for lv in ("W8A8", "O3") if lv in rows]:
        diag = rows[level][1]
        print(f"\n## Worst GEMMs at {level} (added rel. L2 error, exact Q/DQ semantics; logits rel L2 "
              f"{diag['logits_rel_l2']:.4g})")
        by = {g["module"]: g for g in diag["gemms"]}
        for m in diag["worst_gemms"]:
            g = by[m]
            print(f"- {m}: input {g['input_rel']:.3g} -> output {g['output_rel']:.3g} (added {g['added']:+.3g})")
        print(f"worst layers (error growth): {diag['worst_layers']}; proposed fp_fallback: "
              f"{diag['proposed_fp_fallback']}")
    if args.alphas:
        print("\n## alpha sweep (O3, PyTorch fake-quant perplexity)")
        for p in pts:
            print(f"- alpha {p['alpha']:.2f}: {p['ppl']:.4f}")
    print("\n## Timings (s, this run, 2 shared CPU cores)")
    for k, v in secs.items():
        print(f"- {k}: {v:.1f}")
    for level, (ev, _, _, _) in rows.items():
        print(f"- {level} evaluate parts: {ev['seconds']}")
    print(f"- total: {total:.1f}")
    print("\nreports: " + ", ".join(str(r[3].path('report.html')) for r in rows.values() if r[2] is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
