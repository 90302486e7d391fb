"""``sq2trt`` command line: one subcommand per pipeline step, thin over :mod:`sq2trt.pipeline`.

Config flags are generated from the config dataclasses (so they cannot drift from recipes):
``--level``/``--alpha``/... for ``quant``, ``--calib-<field>`` and ``--eval-<field>`` for the others.
Precedence: built-in defaults < ``--recipe`` file < flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from .config import LEVELS, CalibConfig, Config, EvalConfig, QuantConfig, load_recipe, merge
from .errors import Sq2trtError
from .trt import TrtConfig

log = logging.getLogger("sq2trt")

_SECTIONS = (("quant", QuantConfig, ""), ("calib", CalibConfig, "calib-"), ("eval", EvalConfig, "eval-"),
             ("trt", TrtConfig, "trt-"))


def _flag_type(tp: Any):
    tp = str(tp)
    if "bool" in tp:
        return "bool"
    if "dict" in tp:  # key=value,key=value
        return lambda s: {k.strip(): float(v) for k, v in (kv.split("=", 1) for kv in s.split(",") if kv.strip())}
    if "tuple" in tp:
        return lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
    if "float" in tp:
        return float
    if "int" in tp:
        return int
    return str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (overrides the recipe)")
    g.add_argument("--model", help="HF id, model directory, .gguf file, or random:<arch|config.json>")
    g.add_argument("--recipe", help="recipe YAML (recipes/<family>.yaml)")
    g.add_argument("--opset", type=int, help="ONNX opset of the export (default 21)")
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow model code from the hub (off unless asked)")
    hints = {"level": f"one of {', '.join(LEVELS)}", "alpha": "migration strength in [0, 1] (default: the "
             "architecture's)", "fp_fallback": "comma-separated module-name suffixes kept in floating point",
             "smooth_folds": "comma-separated exact folds: norm,down,o", "alpha_by_kind": "per group kind, "
             "e.g. down=0.6,o=0.5", "max_ppl_increase": "automatic FP fallback target, e.g. 0.01 (= 1%%)",
             "act_clip": "static activation clip: max, percentile, mse, or auto (per GEMM kind, whichever gives "
             "the lowest calibration KL)", "weight_granularity": "per-tensor or per-channel (both TensorRT INT8)",
             "search_alpha_by_kind": "search alpha per group kind on calibration KL (starts from --alpha / "
             "--alpha-by-kind)"}
    for section, cls, prefix in _SECTIONS:
        hints_cls = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + prefix + f.name.replace("_", "-")
            kind = _flag_type(hints_cls[f.name])
            default = f.default if f.default is not MISSING else None
            help_ = hints.get(f.name, "") + (f" (default {default!r})" if default not in (None, "") else "")
            if kind == "bool":
                g.add_argument(flag, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=help_)
            else:
                g.add_argument(flag, dest=f"{section}.{f.name}", type=kind, default=None, help=help_)


def config_from_args(args: argparse.Namespace) -> Config:
    base: dict[str, Any] = {}
    if getattr(args, "recipe", None):
        base = load_recipe(args.recipe)
    over: dict[str, Any] = {"model": args.model, "opset": args.opset, "trust_remote_code": args.trust_remote_code}
    for section, _, _ in _SECTIONS:
        over[section] = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(section + ".")}
    return Config.from_dict(merge(Config().to_dict(), merge(base, over)))


def _tqdm_progress(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    # disable=None: bars on a terminal, none in logs (CI); the INFO line per step remains
    return lambda desc, total: tqdm(total=total, desc=desc, unit="seq", leave=False, file=sys.stderr, disable=None)


def _pipeline(args: argparse.Namespace, config: Config | None = None):
    from .pipeline import Pipeline

    return Pipeline(config or config_from_args(args), args.out, device=args.device,
                    progress=_tqdm_progress(args.quiet), force=args.force)


def cmd_calibrate(args):
    pipe = _pipeline(args)
    print(pipe.calibrate())
    if pipe.scheme.act_static:
        pipe.act_scales()
        print(pipe.path("act_scales.json"))


def cmd_smooth(args):
    print(_pipeline(args).smooth() or "level has no smoothing")


def cmd_export(args):
    pipe = _pipeline(args)
    ref, quant = pipe.export()
    print(ref)
    print(quant)
    if args.fp16:
        print(pipe.trt_onnx())


def cmd_lint(args):
    from .lint import lint_model

    report = lint_model(args.model, allow_bmm_qdq=True if args.allow_bmm_qdq else None)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report else 1


def cmd_build(args):
    print(_pipeline(args).build(args.backend))


def cmd_compare(args):
    if args.reference and args.engine:
        from .compare import compare_logits
        from .data import eval_windows, load_text, tokenize
        from .models import load_model

        cfg = config_from_args(args)
        tok = load_model(cfg.model).tokenizer if cfg.model else None
        if tok is None:
            raise Sq2trtError("--model is needed to tokenize the comparison text")
        ids = eval_windows(tokenize(load_text(cfg.eval.data), tok), cfg.eval.compare_seq_len)
        diff = compare_logits(args.reference, args.engine, ids[: cfg.eval.compare_samples].numpy(),
                              device=args.device)
        print(diff)
        return
    print(json.dumps(_pipeline(args).compare(), indent=2))


def cmd_report(args):
    if args.from_json:
        from .artifacts import read_json

        try:
            rep = read_json(args.from_json)
        except (OSError, ValueError) as exc:
            raise Sq2trtError(f"cannot read report {args.from_json}: {exc}") from None
    else:
        pipe = _pipeline(args)
        rep = pipe.report()
        print(pipe.path("report.md").read_text())
    if args.check:
        from .gate import enforce, load_thresholds

        print(enforce(rep, load_thresholds(args.check)))  # raises AccuracyGateError (exit 1) on failure


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_evaluate(args):
    pipe = _pipeline(args)
    res = pipe.evaluate(args.tasks or (), task_limit=args.task_limit, task_data=args.task_data,
                        batch_tokens=args.batch_tokens)
    p = res["perplexity"]
    print(f"perplexity ({res['eval']['windows']} x {res['eval']['window']} tokens): "
          + ", ".join(f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in p.items()))
    print(f"exact graph vs {res['agreement']['reference']}: {res['agreement']['engine_exact_vs_reference']:.2e}; "
          f"optimized engine: {res['agreement']['engine_vs_reference']:.2e}")
    for name, t in res["tasks"].items():
        print(f"{name} (n={t['n']}): acc float {t['torch_fp']['acc']:.4f} engine {t['engine']['acc']:.4f}; "
              f"acc_norm float {t['torch_fp']['acc_norm']:.4f} engine {t['engine']['acc_norm']:.4f}")
    print(pipe.path("eval.json"))


def cmd_diagnose(args):
    from .diagnose import render_markdown

    pipe = _pipeline(args)
    d = pipe.diagnose(top=args.top)
    print(render_markdown(d, args.top))
    if d["proposed_fp_fallback"]:
        print("try: --fp-fallback " + ",".join(d["proposed_fp_fallback"]))
    print(pipe.path("layers.json"))


def cmd_sweep(args):
    from .artifacts import write_json
    from .pipeline import Pipeline
    from .plots import alpha_sweep, plot_alpha_sweep

    config = config_from_args(args)
    points = alpha_sweep(config, [float(a) for a in args.alphas], args.out, progress=_tqdm_progress(args.quiet))
    model_dir = Pipeline(config, args.out).model_dir
    d = {"points": points, "level": config.quant.level, "calib": config.to_dict()["calib"],
         "eval": config.to_dict()["eval"], "metric": "PyTorch fake-quant perplexity"}
    write_json(model_dir / "alpha_sweep.json", d)
    png = plot_alpha_sweep(points, model_dir / "alpha_sweep.png")
    for p in points:
        print(f"alpha {p['alpha']:.2f}: perplexity {p['ppl']:.4f}")
    print(png)


def _ordered_levels(levels: Sequence[str]) -> list[str]:
    from .config import get_level

    return sorted(dict.fromkeys(levels), key=lambda lv: get_level(lv).smooth)  # unsmoothed first


def cmd_run(args):
    from .report import write_summary

    config = config_from_args(args)
    levels = _ordered_levels(args.levels or [config.quant.level])
    shared = None
    reports = []
    for level in levels:
        pipe = _pipeline(args, config.replace(quant={"level": level}))
        if shared is not None:
            pipe.adopt(shared)
        reports.append(pipe.run())
        shared = pipe
        print(f"[{level}] report: {pipe.path('report.md')}", file=sys.stderr)
    summary = write_summary(reports, shared.model_dir)
    print(summary.read_text())


def cmd_levels(args):
    from .report import support_matrix_markdown

    print(support_matrix_markdown())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sq2trt", description="SmoothQuant -> Q/DQ ONNX -> INT8 engines (ONNX Runtime, TensorRT), with accuracy reports. One subcommand per pipeline step.")
    p.add_argument("-V", "--version", action="version", version=f"sq2trt {__import__('sq2trt').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def step(name: str, fn, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if config:
            add_config_flags(sp)
            sp.add_argument("--out", default="build", help="artifact root (default build/)")
            sp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                            help="ONNX Runtime device (default auto)")
            sp.add_argument("--force", action="store_true", help="recompute even when artifacts match")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        return sp

    step("calibrate", cmd_calibrate, "per-channel activation maxima (and static scales for static levels)")
    step("smooth", cmd_smooth, "compute SmoothQuant scales and save them")
    e = step("export", cmd_export, "export ref.onnx and the Q/DQ <level>.onnx")
    e.add_argument("--fp16", action="store_true", help="also write <level>.fp16.onnx, the strongly typed FP16 + "
                   "INT8 Q/DQ graph TensorRT builds from (trtexec --stronglyTyped), and lint it")
    b = step("build", cmd_build, "build the engine (ONNX Runtime here; TensorRT with --backend trt)")
    b.add_argument("--backend", default="ort", choices=("ort", "trt"))
    c = step("compare", cmd_compare, "Polygraphy comparison of engine vs reference, and perplexity")
    c.add_argument("--reference", help="compare these two files directly instead of the pipeline's")
    c.add_argument("--engine", help="engine (.onnx / .ort.onnx / .plan) to compare with --reference")
    rp = step("report", cmd_report, "write report.json, report.md and report.html for a level")
    rp.add_argument("--check", metavar="THRESHOLDS_YAML",
                    help="accuracy gate: exit 1 naming each metric outside the thresholds (recipes/thresholds.yaml)")
    rp.add_argument("--from", dest="from_json", metavar="REPORT_JSON",
                    help="check this existing report.json instead of running the pipeline")
    ev = step("evaluate", cmd_evaluate, "perplexity three ways (float, fake-quant, engine) and zero-shot tasks")
    ev.add_argument("--tasks", type=_csv, help="comma-separated: copa, openbookqa, or task .jsonl files "
                    "({context, choices, label} lines)")
    ev.add_argument("--task-limit", type=int, default=0, help="first N examples of each task (default all)")
    ev.add_argument("--task-data", help="folder holding copa/ and openbookqa/ (default $SQ2TRT_DATA or "
                    "../shared/data)")
    ev.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batched forward when scoring")
    dg = step("diagnose", cmd_diagnose, "per-layer / per-GEMM error of the Q/DQ model (Polygraphy), layers.json")
    dg.add_argument("--top", type=int, default=5, help="how many worst layers/GEMMs to list and propose")
    sw = step("sweep", cmd_sweep, "perplexity vs alpha (PyTorch fake quantization), alpha_sweep.json + PNG")
    sw.add_argument("--alphas", type=_csv, default=["0.5", "0.65", "0.8", "0.9"],
                    help="comma-separated alphas (default 0.5,0.65,0.8,0.9)")
    r = step("run", cmd_run, "the whole flow: calibrate, smooth, export, build, compare, report")
    r.add_argument("--levels", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated levels to run in one go (e.g. fp,W8A8,O3); default: --level")
    step("levels", cmd_levels, "print the level x backend support matrix", config=False)
    lt = step("lint", cmd_lint, "check an ONNX file against TensorRT's Q/DQ rules (exit 0 pass, 1 fail)",
              config=False)
    lt.add_argument("model", help="ONNX file")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    lt.add_argument("--allow-bmm-qdq", action="store_true",
                    help="accept Q/DQ on attention BMMs (Q*K^T, P*V) even without the model's metadata saying so")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "onnxscript", "transformers", "polygraphy", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        rc = args.fn(args)
    except Sq2trtError as exc:
        print(f"sq2trt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, nothing half-written was left", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
