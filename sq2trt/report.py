"""Reports: ``report.json`` (versioned schema), ``report.md`` and a self-contained ``report.html``
for one model and level.

Schema history: 1 = model, level, alpha, quant, calibration, compare, timings, environment.
2 adds optional ``eval`` (eval.json: perplexity three ways, zero-shot tasks), ``diagnosis``
(layers.json: per-layer / per-GEMM error, proposed fp_fallback) and ``plots`` ({name: PNG path
relative to the report}); every version-1 key keeps its meaning."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_text, write_json

SCHEMA_VERSION = 2


def build_report(pipe, compare: dict[str, Any], *, evaluation: dict[str, Any] | None = None,
                 diagnosis: dict[str, Any] | None = None, plots: dict[str, str] | None = None) -> dict[str, Any]:
    c = pipe.config
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"source": c.model, "name": pipe.name, "architecture": type(pipe.loaded.model).__name__},
        "level": c.quant.level,
        "level_description": pipe.scheme.description,
        "alpha": pipe.alpha if pipe.scheme.smooth else None,
        "quant": c.to_dict()["quant"],
        "calibration": {"data": c.calib.data, "num_samples": c.calib.num_samples, "seq_len": c.calib.seq_len,
                        "seed": c.calib.seed},
        "compare": compare,
        "timings_s": pipe.timings,
        "environment": pipe.environment(),
        "config_hash": pipe.h("compare"),
        "eval": evaluation,
        "diagnosis": diagnosis,
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
    if q.get("weight_granularity"):
        parts.append(f"weights {q['weight_granularity']}")
    if q.get("act_clip"):
        parts.append(f"activation clip {q['act_clip']}")
    fb = q.get("fp_fallback") or []
    parts.append(f"{len(fb)} GEMM pattern(s) kept in floating point" if fb else "no floating-point fallback")
    if q.get("max_ppl_increase"):
        parts.append(f"automatic fallback target +{q['max_ppl_increase']:.2%}")
    return ", ".join(parts)


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
        f"| perplexity increase | {cmp['ppl_increase']:+.2%} |",
        f"| logits max abs error | {_fmt(lg['max_abs'])} |",
        f"| logits mean abs error | {_fmt(lg['mean_abs'])} |",
        f"| logits max relative error (max abs / max ref) | {_fmt(lg['max_rel'])} |",
        f"| logits relative L2 error | {_fmt(lg['rel_l2'])} |",
        f"| top-1 agreement with reference | {lg['top1_agreement']:.2%} ({lg['tokens']} tokens) |",
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
                  "acc_norm (engine) | acc drop |", "|---|---|---|---|---|---|---|"]
        for name, t in ev["tasks"].items():
            f, e = t["torch_fp"], t["engine"]
            lines.append(f"| {name} | {t['n']} | {f['acc']:.4f} | {e['acc']:.4f} ± {e['acc_stderr']:.4f} | "
                         f"{f['acc_norm']:.4f} | {e['acc_norm']:.4f} | {t['acc_drop']:+.4f} |")
        lines.append("")
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
    rows = ["| level | alpha | ppl reference | ppl engine | ppl increase | top-1 agreement | logits rel L2 |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        c = r["compare"]
        rows.append(f"| {r['level']} | {_fmt(r['alpha'], '.2f')} | {c['ppl']['reference']:.3f} | "
                    f"{c['ppl']['engine']:.3f} | {c['ppl_increase']:+.2%} | "
                    f"{c['logits']['top1_agreement']:.2%} | {c['logits']['rel_l2']:.3g} |")
    name = reports[0]["model"]["name"] if reports else "model"
    text = f"# sq2trt summary: {name}\n\n" + "\n".join(rows) + "\n"
    path = Path(model_dir) / "summary.md"
    atomic_write_text(path, text)
    return path


def support_matrix_markdown() -> str:
    """Level x backend table, generated from the code's own tables (README embeds this output)."""
    from .config import BACKENDS, LEVELS, level_support

    head = "| level | weights | activations | smoothing | " + " | ".join(BACKENDS) + " |"
    rows = [head, "|" + "---|" * (4 + len(BACKENDS))]
    for name, s in LEVELS.items():
        act = "float" if s.act is None else f"{s.act} {'static' if s.act_static else 'dynamic'}"
        why = "dynamic activations" if s.act is not None and not s.act_static else "asymmetric weights"
        cells = ["yes" if level_support(name, b) is None else f"no ({why})" for b in BACKENDS]
        weights = "float" if s.weight is None else (
            f"INT{s.weight_bits} {s.weight}" + ("" if s.weight_symmetric else " asymmetric"))
        smooth = ("yes, searched alpha" if s.alpha_search else "yes") if s.smooth else "no"
        rows.append(f"| {name} | {weights} | {act} | {smooth} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
