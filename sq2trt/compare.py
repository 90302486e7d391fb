"""Engine vs reference with Polygraphy's Comparator, on real token inputs.

Runners: ``OnnxrtRunner`` for ONNX / ORT-engine files; ``.plan`` files go through
``sq2trt.trt.trt_runner`` (Polygraphy's TrtRunner), which needs TensorRT.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .export import INPUT, OUTPUT, load_onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitDiff:
    """Logit error of an engine against the reference over the comparison inputs. It judges
    nothing itself: thresholds live in the accuracy gate (sq2trt.gate)."""

    max_abs: float
    mean_abs: float
    max_rel: float  # max |a - b| / max |b|
    rel_l2: float  # ||a - b|| / ||b||
    top1_agreement: float  # fraction of positions where argmax agrees
    tokens: int
    polygraphy_passed: bool  # Polygraphy CompareFunc.simple at (atol, rtol)
    atol: float
    rtol: float
    rel_l2_interval: dict[str, Any] | None = None  # 95% interval of rel_l2 over blocks of positions (sq2trt.stats)

    def __str__(self) -> str:
        return (f"max|d|={self.max_abs:.4g} mean|d|={self.mean_abs:.4g} max_rel={self.max_rel:.3g} "
                f"rel_l2={self.rel_l2:.3g} top1={self.top1_agreement:.2%} over {self.tokens} tokens "
                f"(polygraphy atol={self.atol:g} rtol={self.rtol:g}: "
                f"{'passed' if self.polygraphy_passed else 'outside tolerance'})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def runner_for(path: str | os.PathLike, *, name: str | None = None, device: str = "auto"):
    """A Polygraphy runner for an ONNX model, an ORT engine, or a TensorRT ``.plan``."""
    path = Path(path)
    if path.suffix == ".plan":
        from .trt import trt_runner

        return trt_runner(path, name=name)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from .engine import providers

    load_onnx(path, load_external_data=False)  # clear error for a missing or corrupt file
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=providers(device)), name=name or path.name)


def compare_logits(reference: str | os.PathLike, engine: str | os.PathLike, inputs: np.ndarray, *,
                   atol: float = 1e-2, rtol: float = 1e-2, device: str = "auto") -> LogitDiff:
    """Run both models on ``inputs`` (n, T) token ids, one sequence per iteration."""
    from polygraphy.comparator import Comparator, CompareFunc

    runners = [runner_for(reference, name="reference", device=device),
               runner_for(engine, name="engine", device=device)]
    feeds = [{INPUT: inputs[i: i + 1].astype(np.int64)} for i in range(inputs.shape[0])]
    from polygraphy.logger import G_LOGGER

    quiet = not log.isEnabledFor(logging.DEBUG)
    old = G_LOGGER.module_severity
    if quiet:  # Polygraphy prints histograms and an [E] line for every iteration outside tolerance
        G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    finally:
        G_LOGGER.module_severity = old
    return logit_diff([np.asarray(it[OUTPUT]) for it in results[0][1]],
                      [np.asarray(it[OUTPUT]) for it in results[1][1]], atol=atol, rtol=rtol,
                      polygraphy_passed=bool(accuracy))


def logit_diff(references: list[np.ndarray], engines: list[np.ndarray], *, atol: float, rtol: float,
               polygraphy_passed: bool) -> LogitDiff:
    """The error summary of per-sequence logits (1, T, vocab) of the reference and the engine. The
    relative L2 error also gets its 95% interval: per-position squared norms summed over blocks of
    ``stats.REL_L2_BLOCK_TOKENS`` positions within each sequence (sq2trt.stats.rel_l2_ci)."""
    from .stats import REL_L2_BLOCK_TOKENS, block_sums, rel_l2_ci

    abs_sum = 0.0
    elements = agree = count = 0
    maxima, ref_maxima, err_blocks, ref_blocks = [], [], [], []
    for r_raw, e_raw in zip(references, engines):
        r, e = np.atleast_2d(np.asarray(r_raw, dtype=np.float64)), np.atleast_2d(np.asarray(e_raw, dtype=np.float64))
        d = e - r
        ad = np.abs(d)
        maxima.append(ad.max())  # np.max below keeps a NaN (Python's max would drop it)
        ref_maxima.append(np.abs(r).max())
        abs_sum += float(ad.sum())
        elements += d.size
        agree += int((r.argmax(-1) == e.argmax(-1)).sum())
        count += int(np.prod(r.shape[:-1]))
        err_sq, ref_sq = (d * d).sum(-1).reshape(-1, r.shape[-2]), (r * r).sum(-1).reshape(-1, r.shape[-2])
        err_blocks.append(block_sums(err_sq, REL_L2_BLOCK_TOKENS)[0])
        ref_blocks.append(block_sums(ref_sq, REL_L2_BLOCK_TOKENS)[0])
    err_b, ref_b = np.concatenate(err_blocks), np.concatenate(ref_blocks)
    max_abs, max_ref = float(np.max(maxima)), float(np.max(ref_maxima))
    interval = None
    if np.all(ref_b > 0) and np.all(np.isfinite(err_b)):
        interval = rel_l2_ci(err_b, ref_b)
    else:
        log.warning("logits: a block of all-zero or non-finite logits; the relative L2 error has no interval "
                    "(the gate judges its value alone)")
    return LogitDiff(max_abs=max_abs, mean_abs=abs_sum / max(elements, 1), max_rel=max_abs / max(max_ref, 1e-12),
                     rel_l2=math.sqrt(float(err_b.sum())) / max(math.sqrt(float(ref_b.sum())), 1e-12),
                     top1_agreement=agree / max(count, 1), tokens=count, polygraphy_passed=polygraphy_passed,
                     atol=atol, rtol=rtol, rel_l2_interval=interval)
