"""Reports: ``report.json`` (versioned schema), ``report.md`` and a self-contained ``report.html``
for one model and level.

Schema history: 1 = model, level, alpha, quant, calibration, compare, timings, environment.
2 adds optional ``eval`` (eval.json: perplexity three ways, zero-shot tasks), ``diagnosis``
(layers.json: per-layer / per-GEMM error, proposed fp_fallback) and ``plots`` ({name: PNG path
relative to the report}); every version-1 key keeps its meaning. Within version 2, added keys only:
``compare.paired`` / ``eval.paired`` (perplexity increase and top-1 agreement with 95% intervals,
sq2trt.stats), ``fp16`` (the FP16 graph TensorRT is given, scored by ONNX Runtime) and ``resolved``
(the quantization the run's plan really applies; ``level_description`` is written from it)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_text, write_json

SCHEMA_VERSION = 2


def effective_weights(scheme, weight_granularity: str) -> str:
    """The weight quantization a level applies under ``quant.weight_granularity`` (sq2trt.plan.make_plan's
    rule: per-channel upgrades per-tensor weights, group-wise weights stay group-wise), e.g. "INT8
    per-channel"; "float" for levels that keep weights in floating point."""
    from .config import PerChannel, PerGroup

    w = scheme.weight
    if w is None:
        return "float"
    if isinstance(w, PerGroup):
        g = str(w)
    elif weight_granularity == "per-channel" or isinstance(w, PerChannel):
        g = "per-channel"
    else:
        g = "per-tensor"
    return f"INT{scheme.weight_bits} {g}" + ("" if scheme.weight_symmetric else " asymmetric")


def activations_text(scheme) -> str:
    if scheme.act is None:
        return "float"
    return f"{scheme.act} {'static' if scheme.act_static else 'dynamic'}"


def resolved_quant(scheme, plan: dict[str, Any] | None, gemms_total: int | None = None) -> dict[str, Any]:
    """What the run's quantization plan applies (not what the level's name suggests): weight types
    as the plan's GemmQuant entries say, activation kind, GEMM counts."""
    weights = sorted({f"INT{g.weight_bits} {g.weight_granularity}" + ("" if g.weight_symmetric else " asymmetric")
                      for g in (plan or {}).values()}) if plan else ["float"]
    return {"weights": ", ".join(weights), "activations": activations_text(scheme),
            "quantized_gemms": len(plan or {}), "gemms": gemms_total}


def describe_level(level: str, scheme, resolved: dict[str, Any], alpha: float | None) -> str:
    """One sentence for the report's head, written from the resolved plan (sq2trt.report.resolved_quant)."""
    if not scheme.quantizes:
        return scheme.description or level
    name = scheme.description.split(":", 1)[0] if ":" in scheme.description else level
    w = resolved["weights"]
    parts = [f"{w} weights" if w != "float" else "float weights",
             f"{resolved['activations']} activations" if resolved["activations"] != "float" else "float activations",
             f"smoothing (alpha {alpha:.2f})" if scheme.smooth and alpha is not None else "no smoothing"]
    total, n = resolved.get("gemms"), resolved["quantized_gemms"]
    if total and n < total:
        parts.append(f"{total - n} of {total} GEMMs kept in floating point")
    return f"{name}: " + ", ".join(parts)


def build_report(pipe, compare: dict[str, Any], *, evaluation: dict[str, Any] | None = None,
                 diagnosis: dict[str, Any] | None = None, plots: dict[str, str] | None = None,
                 fp16: dict[str, Any] | None = None) -> dict[str, Any]:
    c = pipe.config
    plan = pipe.plan()
    resolved = resolved_quant(pipe.scheme, plan, len(pipe.gemm_names(with_fallback=True)) if plan else None)
    alpha = pipe.alpha if pipe.scheme.smooth else None
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"source": c.model, "name": pipe.name, "architecture": type(pipe.loaded.model).__name__},
        "level": c.quant.level,
        "level_description": describe_level(c.quant.level, pipe.scheme, resolved, alpha),
        "resolved": resolved,
        "alpha": alpha,
        "quant": c.to_dict()["quant"],
        "calibration": {"data": c.calib.data, "num_samples": c.calib.num_samples, "seq_len": c.calib.seq_len,
                        "seed": c.calib.seed},
        "compare": compare,
        "timings_s": pipe.timings,
        "environment": pipe.environment(),
        "config_hash": pipe.h("compare"),
        "eval": evaluation,
        "diagnosis": diagnosis,
        "fp16": fp16,
        "plots": plots or {},
    }


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _check(check: dict[str, Any] | None, key: str) -> str:
    if not check:
        return "n/a"
    return f"{check[key]:.2e} ({'passed' if check['passed'] else 'FAILED'})"


def _run_settings(r: dict[str, Any]) -> str:
    """The settings that refine the level's definition (recipe or flags), in words."""
    q = r.get("quant") or {}
    parts = [f"alpha = {_fmt(r['alpha'], '.2f')}"]
    if q.get("alpha_by_kind"):
        parts.append("alpha by kind " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(q["alpha_by_kind"].items())))
    if q.get("search_alpha_by_kind"):
        parts.append("alpha per kind searched")
    if q.get("smooth_folds"):
        parts.append("smoothing folds " + "+".join(q["smooth_folds"]))
    res = r.get("resolved")
    if res:  # what the plan applies, so this line cannot contradict the level's description
        parts.append(f"weights {res['weights']}")
    if q.get("act_clip"):
        parts.append(f"activation clip {q['act_clip']}")
    fb = q.get("fp_fallback") or []
    parts.append(f"{len(fb)} GEMM pattern(s) kept in floating point" if fb else "no floating-point fallback")
    if q.get("max_ppl_increase"):
        parts.append(f"automatic fallback target +{q['max_ppl_increase']:.2%}")
    return ", ".join(parts)


def _pct_ci(d: dict[str, Any] | None, signed: bool = True) -> str:
    if not d:
        return "no interval"
    f = "+.2%" if signed else ".2%"
    return f"95% interval {format(d['lo'], f)} to {format(d['hi'], f)}"


def _plain_ci(d: dict[str, Any] | None) -> str:
    return "" if not d else f" (95% interval {d['lo']:.4g} to {d['hi']:.4g}, {d['blocks']} blocks)"


def _drop_ci(d: dict[str, Any] | None) -> str:
    return "" if not d else (f" ({d['lo']:+.4f} to {d['hi']:+.4f}; {d['discordant']} of {d['items']} items "
                             "answered differently)")


def _paired_rows(cmp: dict[str, Any]) -> list[str]:
    pr = cmp.get("paired")
    lg = cmp["logits"]
    if not pr:
        return [f"| perplexity increase | {cmp['ppl_increase']:+.2%} |",
                f"| top-1 agreement with reference | {lg['top1_agreement']:.2%} ({lg['tokens']} tokens) |"]
    inc, top = pr["ppl_increase"], pr["top1_agreement"]
    return [f"| perplexity increase (paired, same tokens) | {inc['value']:+.2%} ({_pct_ci(inc)}; "
            f"{inc['tokens']} tokens in {inc['blocks']} blocks) |",
            f"| top-1 agreement with reference, evaluation text | {top['value']:.2%} ({_pct_ci(top, False)}; "
            f"{top['tokens']} tokens) |",
            f"| top-1 agreement with reference, comparison windows (Polygraphy) | {lg['top1_agreement']:.2%} "
            f"({lg['tokens']} tokens) |"]


def _fp16_rows(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    pr = f["paired"]
    inc, top = pr["ppl_increase"], pr["top1_agreement"]
    subset = "" if f["windows"] == f["of_windows"] else f", first {f['windows']} of {f['of_windows']} windows"
    return [f"| FP16 TensorRT input `{f['file']}` (ONNX Runtime CPU{subset}): perplexity | "
            f"{pr['ppl_engine']:.3f} (reference {pr['ppl_reference']:.3f} on the same tokens) |",
            f"| FP16 TensorRT input: perplexity increase over reference | {inc['value']:+.2%} ({_pct_ci(inc)}) |",
            f"| FP16 TensorRT input: top-1 agreement with reference | {top['value']:.2%} ({_pct_ci(top, False)}; "
            f"{top['tokens']} tokens) |"]


def render_markdown(r: dict[str, Any]) -> str:
    cmp, lg, ppl = r["compare"], r["compare"]["logits"], r["compare"]["ppl"]
    lines = [
        f"# sq2trt report: {r['model']['name']} @ {r['level']}",
        "",
        f"{r['level_description']}. Model `{r['model']['source']}` ({r['model']['architecture']}). "
        f"This run: {_run_settings(r)}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity, reference (FP) | {_fmt(ppl['reference'], '.3f')} |",
        f"| perplexity, engine | {_fmt(ppl['engine'], '.3f')} |",
        *_paired_rows(cmp),
        *_fp16_rows(r.get("fp16")),
        f"| logits max abs error | {_fmt(lg['max_abs'])} |",
        f"| logits mean abs error | {_fmt(lg['mean_abs'])} |",
        f"| logits max relative error (max abs / max ref) | {_fmt(lg['max_rel'])} |",
        f"| logits relative L2 error | {_fmt(lg['rel_l2'])}{_plain_ci(lg.get('rel_l2_interval'))} |",
        f"| export check: layer-0 Q/DQ inputs differing from PyTorch fake-quant | "
        f"{_check(cmp.get('export_check'), 'act_mismatch_fraction')} |",
        f"| export check: weights-only Q/DQ graph vs fake-quant (max rel) | "
        f"{_check(cmp.get('export_check'), 'weights_only_max_rel')} |",
        "",
        f"Perplexity: `{cmp['eval']['data']}`, {cmp['eval']['windows']} non-overlapping windows of "
        f"{cmp['eval']['window']} tokens ({cmp['eval']['tokens']} tokens). Calibration: "
        f"`{r['calibration']['data']}`, {r['calibration']['num_samples']} x {r['calibration']['seq_len']} tokens, "
        f"seed {r['calibration']['seed']}.",
        "",
        *_interval_note(cmp, r.get("fp16")),
        *_eval_markdown(r.get("eval")),
        *_diagnosis_markdown(r.get("diagnosis")),
        *[f"![{name}]({rel})" for name, rel in (r.get("plots") or {}).items()],
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()),
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in r["environment"].items()),
        "",
    ]
    return "\n".join(lines)


def _interval_note(cmp: dict[str, Any], fp16: dict[str, Any] | None) -> list[str]:
    pr = cmp.get("paired")
    if not pr:
        return []
    note = ("Intervals: the reference and the engine score the same tokens; the perplexity increase's 95% "
            f"interval is a {pr['ppl_increase']['method']}; top-1 agreement's is a "
            f"{pr['top1_agreement']['method']}. The accuracy gate fails a threshold whose interval crosses it "
            "(docs/evaluation.md).")
    if fp16:
        note += (f" The FP16 graph is what a strongly typed TensorRT network is built from; ONNX Runtime runs it "
                 f"on CPU without fusions (Q/DQ semantics in FP16) in {fp16['seconds']:.0f} s"
                 + ("" if fp16["windows"] == fp16["of_windows"] else
                    f", on the first {fp16['windows']} evaluation windows only (sq2trt.evaluation.FP16_MAX_WINDOWS)")
                 + ".")
    return [note, ""]


def write_report(r: dict[str, Any], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", r)
    atomic_write_text(out_dir / "report.md", render_markdown(r))
    atomic_write_text(out_dir / "report.html", render_html(r, out_dir))


def _eval_markdown(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return []
    p, ag = ev["perplexity"], ev["agreement"]
    lines = ["## Perplexity three ways", "",
             f"`{ev['eval']['data']}`: {ev['eval']['windows']} windows of {ev['eval']['window']} tokens.", "",
             "| model | perplexity |", "|---|---|",
             f"| PyTorch floating point | {_fmt(p['torch_fp'], '.4f')} |",
             f"| PyTorch fake-quantized | {_fmt(p['torch_fakequant'], '.4f')} |",
             f"| exported Q/DQ graph, exact (ORT, no fusions) | {_fmt(p['engine_exact'], '.4f')} |",
             f"| engine (ORT optimized) | {_fmt(p['engine'], '.4f')} |", "",
             f"Exact graph vs {ag['reference']}: relative gap {ag['engine_exact_vs_reference']:.2e}; optimized "
             f"engine: {ag['engine_vs_reference']:.2e} (on coarse levels one-step rounding flips are amplified "
             f"layer by layer, so these gaps are reported, not gated; the export itself is verified: "
             f"{'passed' if (ag.get('export_check') or {}).get('passed', True) else 'FAILED'}). "
             f"Perplexity increase of the engine over floating point: {ev['ppl_increase']:+.2%}.", "",
             "Evaluation timings (s): " + ", ".join(f"{k} {v}" for k, v in ev.get("seconds", {}).items()), ""]
    if ev.get("tasks"):
        lines += ["## Zero-shot tasks", "", "| task | n | acc (float) | acc (engine) | acc_norm (float) | "
                  "acc_norm (engine) | acc drop (paired 95% interval) | acc_norm drop |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in ev["tasks"].items():
            f, e = t["torch_fp"], t["engine"]
            pr = t.get("paired") or {}
            lines.append(f"| {name} | {t['n']} | {f['acc']:.4f} | {e['acc']:.4f} ± {e['acc_stderr']:.4f} | "
                         f"{f['acc_norm']:.4f} | {e['acc_norm']:.4f} | {t['acc_drop']:+.4f}{_drop_ci(pr.get('acc'))} | "
                         f"{t['acc_norm_drop']:+.4f}{_drop_ci(pr.get('acc_norm'))} |")
        lines += ["", "A drop's interval is paired on the items (Newcombe's score interval): only the items "
                  "the float model and the engine answer differently move it.", ""]
    return lines


def _diagnosis_markdown(d: dict[str, Any] | None) -> list[str]:
    if not d:
        return []
    from .diagnose import render_markdown as diag_md

    return ["## Per-layer diagnosis", "", diag_md(d), ""]


def make_plots(pipe, diagnosis: dict[str, Any] | None) -> dict[str, str]:
    """Write the PNGs the data on disk allows; ``{name: path relative to the level directory}``."""
    from .plots import plot_alpha_sweep, plot_layer_errors, plot_smoothing, scale_for

    out: dict[str, str] = {}
    plots = pipe.level_dir / "plots"
    stats_p = pipe.model_dir / "act_stats.safetensors"
    scales_p = pipe.path("smooth_scales.safetensors")
    if stats_p.exists():
        from safetensors.torch import load_file

        stats = load_file(str(stats_p))
        module = _plot_module(pipe, stats, diagnosis)
        scale = None
        if pipe.scheme.smooth and scales_p.exists():
            groups = [(g.producer, g.consumers) for g in pipe.arch.groups]
            scale = scale_for(module, load_file(str(scales_p)), groups, pipe.arch.layers)
        plot_smoothing(stats[module], scale, module, plots / "smoothing.png",
                       alpha=pipe.alpha if pipe.scheme.smooth else None)
        out["activation magnitude before/after smoothing"] = "plots/smoothing.png"
    if diagnosis:
        plot_layer_errors(diagnosis, plots / "layer_errors.png",
                          title=f"{pipe.name} @ {pipe.config.quant.level}: error vs reference")
        out["per-layer error"] = "plots/layer_errors.png"
    sweep = pipe.model_dir / "alpha_sweep.json"
    if sweep.exists():
        from .artifacts import read_json

        d = read_json(sweep)
        plot_alpha_sweep(d["points"], plots / "alpha_sweep.png", fp_ppl=d.get("fp_ppl"), naive_ppl=d.get("naive_ppl"))
        out["perplexity vs alpha"] = "plots/alpha_sweep.png"
    return out


def _plot_module(pipe, stats: dict[str, Any], diagnosis: dict[str, Any] | None) -> str:
    """The GEMM input to plot: the worst smoothed GEMM found by diagnosis, else the first q_proj-like
    GEMM of a middle layer that a smoothing group feeds."""
    consumers = {c for g in pipe.arch.groups for c in g.consumers}
    smoothable = [k for k in stats if any(k.endswith("." + c) for c in consumers)]
    for m in (diagnosis or {}).get("worst_gemms", []):
        if m in smoothable:
            return m
    if not smoothable:
        return next(iter(stats))
    return smoothable[len(smoothable) // 2]


def render_html(r: dict[str, Any], out_dir: str | Path) -> str:
    """One self-contained HTML page: the markdown tables as HTML, plots embedded as base64 PNG."""
    import base64
    import html

    body = []
    in_table = False
    for line in render_markdown(r).splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            if not in_table:
                body.append("<table>")
                in_table, tag = True, "th"
            else:
                tag = "td"
            body.append("<tr>" + "".join(f"<{tag}>{_inline(html.escape(c))}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name, rel = line[2:].split("](", 1)
            png = Path(out_dir) / rel.rstrip(")")
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(name)}</figcaption></figure>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{_inline(html.escape(line))}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
    title = html.escape(f"sq2trt report: {r['model']['name']} @ {r['level']}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """`code` spans of the markdown as <code> (text is already HTML-escaped)."""
    import re

    return re.sub(r"`([^`]*)`", r"<code>\1</code>", text)


def write_summary(reports: list[dict[str, Any]], model_dir: str | Path) -> Path:
    """``build/<model>/summary.md``: one row per level, so the report shows what smoothing buys."""
    rows = ["| level | alpha | ppl reference | ppl engine | ppl increase (95% interval) | top-1 agreement "
            "(95% interval) | logits rel L2 | FP16 TensorRT input ppl |",
            "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        c = r["compare"]
        pr = c.get("paired")
        inc = (f"{c['ppl_increase']:+.2%} ({pr['ppl_increase']['lo']:+.2%} to {pr['ppl_increase']['hi']:+.2%})"
               if pr else f"{c['ppl_increase']:+.2%}")
        top = (f"{pr['top1_agreement']['value']:.2%} ({pr['top1_agreement']['lo']:.2%} to "
               f"{pr['top1_agreement']['hi']:.2%})" if pr else f"{c['logits']['top1_agreement']:.2%}")
        f16 = r.get("fp16")
        f16s = (f"{f16['paired']['ppl_engine']:.3f} ({f16['paired']['ppl_increase']['value']:+.2%})"
                + ("" if f16["windows"] == f16["of_windows"] else f", {f16['windows']} windows")) if f16 else "n/a"
        rows.append(f"| {r['level']} | {_fmt(r['alpha'], '.2f')} | {c['ppl']['reference']:.3f} | "
                    f"{c['ppl']['engine']:.3f} | {inc} | {top} | {c['logits']['rel_l2']:.3g} | {f16s} |")
    name = reports[0]["model"]["name"] if reports else "model"
    text = f"# sq2trt summary: {name}\n\n" + "\n".join(rows) + "\n"
    path = Path(model_dir) / "summary.md"
    atomic_write_text(path, text)
    return path


RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_granularities(recipe_dir: str | Path = RECIPE_DIR) -> dict[str, str]:
    """``{family: quant.weight_granularity}`` of the shipped recipes (each resolved through Config, so
    a recipe that leaves it out gets the default)."""
    from .config import Config, load_recipe

    out = {}
    for f in sorted(Path(recipe_dir).glob("*.yaml")):
        if f.name == "thresholds.yaml":
            continue
        out[f.stem] = Config.from_dict(load_recipe(f)).quant.weight_granularity
    return out


def support_matrix_markdown(recipe_dir: str | Path = RECIPE_DIR) -> str:
    """Level x backend table, generated from the code's own tables (README embeds this output). The
    weights column is what sq2trt.plan.make_plan applies with the default config and, where a shipped
    recipe changes it, with that recipe (e.g. per-channel INT8 weights in recipes/llama.yaml)."""
    from .config import BACKENDS, LEVELS, QuantConfig, level_support

    default = QuantConfig().weight_granularity
    recipes = recipe_granularities(recipe_dir) if Path(recipe_dir).is_dir() else {}
    head = "| level | weights | activations | smoothing | " + " | ".join(BACKENDS) + " |"
    rows = [head, "|" + "---|" * (4 + len(BACKENDS))]
    for name, s in LEVELS.items():
        act = activations_text(s)
        why = "dynamic activations" if s.act is not None and not s.act_static else "asymmetric weights"
        cells = ["yes" if level_support(name, b) is None else f"no ({why})" for b in BACKENDS]
        weights = effective_weights(s, default)
        other: dict[str, list[str]] = {}
        for fam, g in recipes.items():
            w = effective_weights(s, g)
            if w != weights:
                other.setdefault(w, []).append(fam)
        for w, fams in other.items():
            weights += f"; {w.split(' ', 1)[1]} in the {', '.join(fams)} recipe{'s' if len(fams) > 1 else ''}"
        smooth = ("yes, searched alpha" if s.alpha_search else "yes") if s.smooth else "no"
        rows.append(f"| {name} | {weights} | {act} | {smooth} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
