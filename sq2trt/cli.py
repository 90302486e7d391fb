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

log = logging.getLogger("sq2trt")

_SECTIONS = (("quant", QuantConfig, ""), ("calib", CalibConfig, "calib-"), ("eval", EvalConfig, "eval-"))


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
             "e.g. down=0.6,o=0.5", "max_ppl_increase": "automatic FP fallback target, e.g. 0.01 (= 1%%)"}
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

    return lambda desc, total: tqdm(total=total, desc=desc, unit="seq", leave=False, file=sys.stderr)


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
    ref, quant = _pipeline(args).export()
    print(ref)
    print(quant)


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
    pipe = _pipeline(args)
    pipe.report()
    print(pipe.path("report.md").read_text())


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
    p = argparse.ArgumentParser(prog="sq2trt", description=__doc__.splitlines()[0])
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
    step("export", cmd_export, "export ref.onnx and the Q/DQ <level>.onnx")
    b = step("build", cmd_build, "build the engine (ONNX Runtime here; TensorRT with --backend trt)")
    b.add_argument("--backend", default="ort", choices=("ort", "trt"))
    c = step("compare", cmd_compare, "Polygraphy comparison of engine vs reference, and perplexity")
    c.add_argument("--reference", help="compare these two files directly instead of the pipeline's")
    c.add_argument("--engine", help="engine (.onnx / .ort.onnx / .plan) to compare with --reference")
    step("report", cmd_report, "write report.json and report.md for a level")
    r = step("run", cmd_run, "the whole flow: calibrate, smooth, export, build, compare, report")
    r.add_argument("--levels", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated levels to run in one go (e.g. fp,W8A8,O3); default: --level")
    step("levels", cmd_levels, "print the level x backend support matrix", config=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "onnxscript", "transformers", "polygraphy", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        args.fn(args)
    except Sq2trtError as exc:
        print(f"sq2trt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, nothing half-written was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
