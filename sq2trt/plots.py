"""PNG plots for the report (matplotlib, Agg backend: no display needed).

- :func:`plot_smoothing`   per-channel max|x| of one GEMM input before and after smoothing (the
                           paper's Figure 4 view): after = before / s.
- :func:`plot_layer_errors` per-layer / per-GEMM relative error from ``layers.json``.
- :func:`plot_alpha_sweep` perplexity against alpha (the paper's Figure 10 view).

Also :func:`alpha_sweep`, which runs the pipeline's cheap path (calibrate, smooth, static scales,
PyTorch fake-quant perplexity; no export) for several alphas.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from .artifacts import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def scale_for(module: str, scales: dict[str, torch.Tensor], groups: Sequence[tuple[str, Sequence[str]]],
              layers: str) -> torch.Tensor | None:
    """The smoothing scale applied to ``module``'s input: the scale of the group (producer ->
    consumers) it consumes from, or None when no group smooths it."""
    for key, s in scales.items():
        for producer, consumers in groups:
            if key.endswith("." + producer) and key.startswith(layers + "."):
                prefix = key[: -len(producer)]
                if any(module == prefix + c for c in consumers):
                    return s
    return None


def plot_smoothing(before: torch.Tensor, scale: torch.Tensor | None, module: str, path: str | os.PathLike,
                   *, alpha: float | None = None) -> Path:
    """Per-channel max|x| of ``module``'s input: ``before`` (in_features,), after = before / scale."""
    plt = _plt()
    before = before.detach().float().cpu()
    n = 2 if scale is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 3.2), sharey=True, squeeze=False)
    ch = torch.arange(before.numel())
    axes[0][0].bar(ch.numpy(), before.numpy(), width=1.0, color="tab:red")
    axes[0][0].set_title(f"before smoothing (max {before.max():.3g}, median {before.median():.3g})", fontsize=9)
    axes[0][0].set_xlabel("input channel")
    axes[0][0].set_ylabel("max |x| over calibration tokens")
    if scale is not None:
        after = before / scale.detach().float().cpu()
        axes[0][1].bar(ch.numpy(), after.numpy(), width=1.0, color="tab:blue")
        a = "" if alpha is None else f", alpha={alpha:.2f}"
        axes[0][1].set_title(f"after smoothing (max {after.max():.3g}, median {after.median():.3g}{a})", fontsize=9)
        axes[0][1].set_xlabel("input channel")
    fig.suptitle(f"activation magnitude at the input of {module}", fontsize=10)
    return _save(fig, path)


def plot_layer_errors(layers: dict[str, Any], path: str | os.PathLike, *, title: str = "") -> Path:
    """Bars of each decoder layer's output error, and of every GEMM's added error (from layers.json)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.4))
    ls = layers["layers"]
    a1.bar([x["layer"] for x in ls], [x["rel_l2"] for x in ls], color="tab:purple")
    from matplotlib.ticker import MaxNLocator

    a1.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("decoder layer")
    a1.set_ylabel("output rel. L2 error")
    a1.set_title(title or "per-layer error of the Q/DQ model vs reference", fontsize=10)
    gs = layers["gemms"]
    worst = set(layers.get("proposed_fp_fallback", []))
    a2.bar(range(len(gs)), [g["added"] for g in gs],
           color=["tab:red" if g["module"] in worst else "tab:gray" for g in gs])
    a2.set_xlabel("quantized GEMM (graph order); red: proposed fp_fallback")
    a2.set_ylabel("added rel. L2 error")
    for i, g in enumerate(gs):
        if g["module"] in worst:
            a2.annotate(g["module"].split("layers.")[-1], (i, g["added"]), fontsize=7, rotation=30)
    fig.tight_layout()
    return _save(fig, path)


def plot_alpha_sweep(points: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                     fp_ppl: float | None = None, naive_ppl: float | None = None, title: str = "") -> Path:
    """Perplexity against alpha; ``points`` are ``{"alpha": a, "ppl": p}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    pts = sorted(points, key=lambda p: p["alpha"])
    ax.plot([p["alpha"] for p in pts], [p["ppl"] for p in pts], "o-", color="tab:blue", label="SmoothQuant-O3")
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="tab:green", ls="--", label=f"floating point ({fp_ppl:.3g})")
    if naive_ppl is not None:
        ax.axhline(naive_ppl, color="tab:red", ls=":", label=f"W8A8, no smoothing ({naive_ppl:.3g})")
    ax.set_xlabel("migration strength alpha")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title or "perplexity vs alpha (PyTorch fake quantization)", fontsize=10)
    return _save(fig, path)


def alpha_sweep(config, alphas: Sequence[float], out: str | os.PathLike = "build", *,
                progress=None) -> list[dict[str, Any]]:
    """For each alpha: smooth, calibrate static scales, PyTorch fake-quant perplexity on the eval
    windows (equal to the exact Q/DQ graph's, see ``sq2trt evaluate``). The model is loaded once,
    the unsmoothed statistics are computed once (in ``out``), and each alpha's scales live under
    ``out/<model>/alpha_sweep/<alpha>/`` so the level's own artifacts are untouched. The
    calibration/eval budget comes from ``config``."""
    import shutil

    from .artifacts import ensure_dir, meta_path
    from .evaluate import perplexity, torch_logits_fn
    from .fakequant import fake_quantized
    from .pipeline import Pipeline
    from .smooth import apply_scales

    main = Pipeline(config, out, progress=progress)
    stats = main.calibrate()
    points, shared = [], main
    for a in alphas:
        root = main.model_dir / "alpha_sweep" / f"{float(a):.2f}"
        pipe = Pipeline(config.replace(quant={"alpha": float(a)}), root, progress=progress)
        ensure_dir(pipe.model_dir)
        for f in (stats, meta_path(stats)):  # reuse the statistics: their hash does not depend on alpha
            shutil.copyfile(f, pipe.model_dir / f.name)
        pipe.adopt(shared)
        plan = pipe.plan()
        model = pipe.prepared_model()
        with fake_quantized(model, plan):
            p = perplexity(torch_logits_fn(model), pipe._windows("eval"))
        points.append({"alpha": float(a), "ppl": p})
        log.info("alpha %.2f: fake-quant perplexity %.4f", a, p)
        scales = pipe.smooth()
        if scales is not None:  # undo the smoothing in memory (exact up to rounding) instead of reloading
            from safetensors.torch import load_file

            apply_scales(model, pipe.arch, {k: 1.0 / v for k, v in load_file(str(scales)).items()})
            pipe._smoothed_with = None
        shared = pipe
    return points
