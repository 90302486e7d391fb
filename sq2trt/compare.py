"""Engine vs reference with Polygraphy's Comparator, on real token inputs.

Runners: ``OnnxrtRunner`` for ONNX / ORT-engine files; ``.plan`` files go through
``sq2trt.trt.trt_runner`` (Polygraphy's TrtRunner), which needs TensorRT.
"""
from __future__ import annotations

import logging
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
    ref_iters, eng_iters = results[0][1], results[1][1]
    diffs, refs, agree, count = [], [], 0, 0
    for r_it, e_it in zip(ref_iters, eng_iters):
        r, e = np.asarray(r_it[OUTPUT], dtype=np.float64), np.asarray(e_it[OUTPUT], dtype=np.float64)
        diffs.append((e - r).ravel())
        refs.append(r.ravel())
        agree += int((r.argmax(-1) == e.argmax(-1)).sum())
        count += int(np.prod(r.shape[:-1]))
    d, r = np.concatenate(diffs), np.concatenate(refs)
    return LogitDiff(max_abs=float(np.abs(d).max()), mean_abs=float(np.abs(d).mean()),
                     max_rel=float(np.abs(d).max() / max(np.abs(r).max(), 1e-12)),
                     rel_l2=float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-12)),
                     top1_agreement=agree / max(count, 1), tokens=count, polygraphy_passed=bool(accuracy),
                     atol=atol, rtol=rtol)
