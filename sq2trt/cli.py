"""``sq2trt`` command line: one subcommand per pipeline step, thin over :mod:`sq2trt.pipeline`.

Config flags are generated from the config dataclasses (so they cannot drift from recipes):
``--level``/``--alpha``/... for ``quant``, ``--calib-<field>`` and ``--eval-<field>`` for the others.
Precedence: built-in defaults < ``--recipe`` file < flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from .config import LEVELS, CalibConfig, Config, EvalConfig, QuantConfig, load_recipe, merge
from .errors import BROKEN_PIPE_EXIT, EXIT_CODES, INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, ConfigError, Sq2trtError
from .trt import TrtConfig

log = logging.getLogger("sq2trt")

# The shipped recipes: the checkout's top-level recipes/ (the package is installed editable).
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"

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
    g.add_argument("--recipe", help="recipe YAML; default: recipes/<family>.yaml of the architecture the "
                   "model's config declares; 'none' for built-in defaults")
    g.add_argument("--opset", type=int, help="ONNX opset of the export (default 21)")
    g.add_argument("--dtype", help="precision of the weights in memory: auto (default: the checkpoint's own, "
                   "FP16/BF16 stay FP16/BF16; FP32 for GGUF and random: models), float32, float16 or bfloat16; "
                   "computation is FP32 either way")
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
    """Defaults < ``--recipe`` (``none``: no recipe) < flags; no recipe is chosen automatically
    (:func:`resolved_config` does that)."""
    recipe = getattr(args, "recipe", None)
    return _config(args, recipe if recipe and recipe.lower() != "none" else None)


def _config(args: argparse.Namespace, recipe: str | None) -> Config:
    base: dict[str, Any] = load_recipe(recipe) if recipe else {}
    over: dict[str, Any] = {"model": args.model, "opset": args.opset, "trust_remote_code": args.trust_remote_code,
                           "dtype": getattr(args, "dtype", None)}
    for section, _, _ in _SECTIONS:
        over[section] = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(section + ".")}
    return Config.from_dict(merge(Config().to_dict(), merge(base, over)))


def resolve_recipe(args: argparse.Namespace) -> str | None:
    """The recipe for this run: ``--recipe`` as given, none for ``--recipe none`` or a ``random:`` test
    model, else the family recipe of the architecture the model's config declares (read without weights; see
    sq2trt.budget.model_config). Logs which was chosen and why."""
    if getattr(args, "recipe", None):
        if args.recipe.lower() == "none":
            log.info("recipe: none (--recipe none): built-in defaults and flags")
            return None
        log.info("recipe: %s (--recipe)", args.recipe)
        return args.recipe
    if not args.model:
        return None
    if args.model.startswith("random:"):  # test models: the built-in defaults, unless a recipe is named
        log.info("recipe: none for %s (random test model; --recipe PATH to use one)", args.model)
        return None
    from .archs import arch_name, recipe_for
    from .budget import model_config

    model_cfg = model_config(args.model, bool(args.trust_remote_code))
    family, why = recipe_for(model_cfg)
    if family is None:
        log.info("recipe: none for %s: %s", args.model, why)
        return None
    path = RECIPE_DIR / f"{family}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {path} (for {arch_name(model_cfg)}) is missing: sq2trt reads its recipes "
                          "from the recipes/ folder of the checkout it is installed from (pip install -e). "
                          "Pass --recipe PATH, or --recipe none for built-in defaults.")
    log.info("recipe: %s, because %s (--recipe PATH to choose another, --recipe none for none)", path, why)
    return str(path)


def resolved_config(args: argparse.Namespace) -> Config:
    """Defaults < the recipe :func:`resolve_recipe` picks < flags: what every command runs with."""
    return _config(args, resolve_recipe(args))


# What each command writes to disk, for the resource estimate (see sq2trt.budget.estimate).
def _artifacts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.command in ("calibrate", "smooth", "sweep"):
        return ()
    if args.command == "export":
        return ("onnx", "fp16") if args.fp16 else ("onnx",)
    if getattr(args, "backend", "ort") == "trt":
        return ("onnx", "fp16", "plan")
    return ("onnx", "engine")


def _budget(args: argparse.Namespace, config: Config, levels: Sequence[str]):
    from . import budget

    est = budget.estimate(config, levels, _artifacts(args))
    return est, budget.available(args.out, config.model, args.device)


def check_resources(args: argparse.Namespace, config: Config, levels: Sequence[str]) -> None:
    """Stop with ResourceBudgetError (exit 5) before anything loads when the run cannot fit."""
    from .budget import SKIP_ENV, check

    if args.no_resource_check or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        log.warning("resource check skipped (--no-resource-check / %s)", SKIP_ENV)
        return
    est, avail = _budget(args, config, levels)
    log.info("resources: host RAM ~%.1f of %.1f GiB available, disk ~%.1f of %.1f GiB (%.2f B parameters)",
             est.ram_bytes / 2**30, avail.ram_bytes / 2**30, est.disk_bytes / 2**30, avail.disk_bytes / 2**30,
             est.params.total / 1e9)
    check(est, avail)


def _tqdm_progress(quiet: bool):
    """The pipeline's progress: a bar on a terminal, log lines in a log file or CI (sq2trt.logs)."""
    from .logs import progress_factory

    return progress_factory(quiet)


def _preflight(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved config and levels of a command that loads a model, after sq2trt.preflight checked
    the whole request without loading weights (levels, architecture, data, tasks, --out, the hub):
    every problem is one typed error now rather than one at a time after minutes. Then the libraries'
    own logging switches (sq2trt.logs.quiet_libraries), before anything loads."""
    from . import preflight
    from .logs import quiet_libraries

    config, levels = preflight.check(args, resolve=resolved_config, flags_only=config_from_args)
    quiet_libraries()
    return config, levels


def _pipeline(args: argparse.Namespace, config: Config | None = None, *, check: bool = True):
    """The Pipeline for this command (preflight first, when no config is given); ``check``: first
    verify the run fits this machine."""
    from .pipeline import Pipeline

    config = config or _preflight(args)[0]
    if check:
        check_resources(args, config, [config.quant.level])
    pipe = Pipeline(config, args.out, device=args.device, progress=_tqdm_progress(args.quiet), force=args.force)
    pipe.report_extras = getattr(args, "report_extras", True)
    return pipe


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

        cfg, _ = _preflight(args)
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

    config, _ = _preflight(args)
    check_resources(args, config, [config.quant.level])
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

    config, levels = _preflight(args)
    levels = _ordered_levels(levels)
    check_resources(args, config, levels)
    shared = None
    reports = []
    for level in levels:
        pipe = _pipeline(args, config.replace(quant={"level": level}), check=False)
        if shared is not None:
            pipe.adopt(shared)
        reports.append(pipe.run())
        shared = pipe
        print(f"[{level}] report: {pipe.path('report.md')}", file=sys.stderr)
    summary = write_summary(reports, shared.model_dir)
    print(summary.read_text())


def cmd_plan_resources(args):
    """Print the resource estimate next to what this machine has; exit 5 when it does not fit."""
    from . import budget

    config, levels = _preflight(args)
    est, avail = _budget(args, config, levels)
    print(budget.render(est, avail))
    budget.check(est, avail)


def cmd_levels(args):
    from .report import support_matrix_markdown

    print(support_matrix_markdown())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sq2trt", description="SmoothQuant -> Q/DQ ONNX -> INT8 engines (ONNX Runtime, TensorRT), with accuracy reports. One subcommand per pipeline step.")
    p.add_argument("-V", "--version", action="version", version=f"sq2trt {__import__('sq2trt').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def step(name: str, fn, help_: str, config: bool = True, resource_check: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if config:
            add_config_flags(sp)
            sp.add_argument("--out", default="build", help="artifact root (default build/)")
            sp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                            help="ONNX Runtime device (default auto)")
            sp.add_argument("--force", action="store_true", help="recompute even when artifacts match")
            if resource_check:
                sp.add_argument("--no-resource-check", action="store_true",
                                help="skip the check that the model fits this machine's RAM, GPU memory and "
                                     "disk (also SQ2TRT_NO_RESOURCE_CHECK=1); see `sq2trt plan-resources`")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
        sp.add_argument("-v", "--verbose", action="count", default=0,
                        help="also other libraries' INFO logs (and sq2trt's DEBUG); -vv their DEBUG too")
        sp.add_argument("--log-file", metavar="PATH", help="also append every log line, with times and other "
                        "libraries' INFO, to PATH")
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
    extras_help = ("per-layer diagnosis and the ORT score of the FP16 graph TensorRT builds, in the report "
                   "(default on; --no-report-extras saves ~1 min a level on the default model)")
    rp.add_argument("--report-extras", action=argparse.BooleanOptionalAction, default=True, help=extras_help)
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
    r.add_argument("--report-extras", action=argparse.BooleanOptionalAction, default=True, help=extras_help)
    pr = step("plan-resources", cmd_plan_resources, "estimate peak host RAM, GPU memory and disk from the model's "
              "config (no weights loaded) and compare with this machine (exit 5 when it does not fit)",
              resource_check=False)
    pr.add_argument("--levels", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    help="comma-separated levels the run would make (default: --level)")
    pr.add_argument("--backend", default="ort", choices=("ort", "trt"),
                    help="trt also counts the FP16 ONNX and the .plan of each level")
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
    from .logs import setup

    try:
        # sq2trt's INFO lines; other libraries from WARNING up unless -v (sq2trt.logs says why and how)
        setup(verbose=args.verbose, quiet=args.quiet, log_file=args.log_file)
        rc = args.fn(args)
    except Sq2trtError as exc:
        print(f"sq2trt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, nothing half-written was left", file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError:  # `sq2trt ... | head`: the reader left; not a bug, and nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return BROKEN_PIPE_EXIT
    except Exception as exc:  # noqa: BLE001 - anything unanticipated is a bug, and gets its own exit code
        return _internal_error(args, exc, sys.argv[1:] if argv is None else list(argv))
    return rc or 0


def _internal_error(args: argparse.Namespace, exc: Exception, argv: list[str]) -> int:
    """Report an exception that is not a typed sq2trt error: a paragraph naming the crash log (full
    traceback, command line, versions) and asking for a report; the traceback on stderr at -v.
    Exit 70, so it cannot be mistaken for a failed accuracy gate (Python's default exit is 1)."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if args.verbose:
        print(tb, file=sys.stderr, end="")
    where = _write_crash_log(args, argv, tb)
    print(f"sq2trt {args.command}: internal error: {type(exc).__name__}: {str(exc)[:500]}\n"
          "This failure is not one sq2trt anticipates, so it is most likely a bug in sq2trt or in a library it "
          "calls rather than a problem with your input. "
          + (f"The traceback, the command line and the library versions are in {where}; please report it to the "
             "sq2trt maintainers with that file attached. " if where else
             "No crash log could be written; please report it to the sq2trt maintainers with the output of the "
             "same command rerun with -v. ")
          + ("" if args.verbose else "Rerun with -v to print the traceback here. ")
          + "Finished artifacts are kept; nothing half-written is reused.", file=sys.stderr)
    return INTERNAL_ERROR_EXIT


def _write_crash_log(args: argparse.Namespace, argv: list[str], tb: str) -> Path | None:
    """``<out>/logs/sq2trt-crash-<time>-<pid>.log`` (the temp folder for commands without --out, or
    when --out is not writable); None when neither can be written."""
    import datetime
    import platform
    import tempfile

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    versions = {m: getattr(sys.modules[m], "__version__", "?") for m in
                ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "numpy") if m in sys.modules}
    text = (f"sq2trt {__import__('sq2trt').__version__} internal error at {stamp}\n"
            f"command: sq2trt {' '.join(argv)}\npython {platform.python_version()} on {platform.platform()}\n"
            f"versions: {versions}\nexit code: {INTERNAL_ERROR_EXIT} ({EXIT_CODES[INTERNAL_ERROR_EXIT]})\n\n{tb}")
    dirs = [Path(args.out) / "logs"] if getattr(args, "out", None) else []
    for d in dirs + [Path(tempfile.gettempdir())]:
        path = d / f"sq2trt-crash-{stamp}-{os.getpid()}.log"
        try:
            d.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
