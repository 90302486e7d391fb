"""Reports: ``report.json`` (versioned schema) and ``report.md`` for one model and level."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_text, write_json

SCHEMA_VERSION = 1


def build_report(pipe, compare: dict[str, Any]) -> dict[str, Any]:
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
    }


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(r: dict[str, Any]) -> str:
    cmp, lg, ppl = r["compare"], r["compare"]["logits"], r["compare"]["ppl"]
    lines = [
        f"# sq2trt report: {r['model']['name']} @ {r['level']}",
        "",
        f"{r['level_description']}. Model `{r['model']['source']}` ({r['model']['architecture']}), "
        f"alpha = {_fmt(r['alpha'], '.2f')}, weights {r['quant']['weight_granularity']}, "
        f"activation clip {r['quant']['act_clip']}.",
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
        f"| Q/DQ graph vs PyTorch fake-quant (max rel) | {_fmt(cmp.get('graph_vs_fakequant_max_rel'))} |",
        "",
        f"Perplexity: `{cmp['eval']['data']}`, {cmp['eval']['windows']} non-overlapping windows of "
        f"{cmp['eval']['window']} tokens ({cmp['eval']['tokens']} tokens). Calibration: "
        f"`{r['calibration']['data']}`, {r['calibration']['num_samples']} x {r['calibration']['seq_len']} tokens, "
        f"seed {r['calibration']['seed']}.",
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
