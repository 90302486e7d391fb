"""The accuracy gate CI fails on: ``sq2trt report --check thresholds.yaml``.

Thresholds (YAML; every key optional, see recipes/thresholds.yaml)::

    max_ppl_increase: 0.05          # engine perplexity / floating-point perplexity - 1
    min_top1_agreement: 0.9         # argmax agreement of engine vs reference logits (Polygraphy compare)
    max_logits_rel_l2: 0.2          # ||engine - ref|| / ||ref|| over the comparison logits
    max_acc_drop: {copa: 0.03}      # float acc - engine acc, per task (absolute, 0.03 = 3 points)
    max_acc_norm_drop: {openbookqa: 0.03}

A threshold on a metric the report does not contain fails (naming what to run): a gate must not
pass because a measurement is missing. Pure functions over the report dict; the CLI raises
:class:`~sq2trt.errors.AccuracyGateError` (exit code 1) on failure.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import AccuracyGateError, ConfigError


@dataclass(frozen=True)
class Thresholds:
    max_ppl_increase: float | None = None
    min_top1_agreement: float | None = None
    max_logits_rel_l2: float | None = None
    max_acc_drop: Mapping[str, float] = field(default_factory=dict)
    max_acc_norm_drop: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "thresholds") -> "Thresholds":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping of thresholds")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown threshold(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k.startswith("max_acc"):
                if not isinstance(v, Mapping) or not all(_num(x) for x in v.values()):
                    raise ConfigError(f"{where}: {k} must map task names to numbers, e.g. {{copa: 0.03}}")
                kw[k] = {str(t): float(x) for t, x in v.items()}
            elif v is not None:
                if not _num(v):
                    raise ConfigError(f"{where}: {k} must be a number, got {v!r}")
                kw[k] = float(v)
        return cls(**kw)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def load_thresholds(path: str | os.PathLike) -> Thresholds:
    from .config import read_yaml_mapping

    return Thresholds.from_dict(read_yaml_mapping(path, "thresholds file", "see recipes/thresholds.yaml"),
                                str(path))


@dataclass(frozen=True)
class Check:
    metric: str
    value: float | None  # None: the report lacks it
    limit: float
    kind: str  # "max" or "min"
    hint: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    def __str__(self) -> str:
        op = "<=" if self.kind == "max" else ">="
        if self.value is None:
            return f"FAIL {self.metric}: missing from the report (needs {op} {self.limit:g}); {self.hint}"
        return f"{'ok  ' if self.passed else 'FAIL'} {self.metric} = {self.value:.4g} (needs {op} {self.limit:g})"


@dataclass(frozen=True)
class GateResult:
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def __bool__(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        head = "accuracy gate passed" if self else f"accuracy gate FAILED ({len(self.failures)} of {len(self.checks)})"
        return "\n".join([head] + [f"  {c}" for c in self.checks])


def report_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The gated numbers of a report: eval.json's when present (PyTorch float baseline), else
    compare.json's (ref.onnx baseline)."""
    ev = report.get("eval") or {}
    cmp = report.get("compare") or {}
    ppl_inc = ev.get("ppl_increase", cmp.get("ppl_increase"))
    logits = cmp.get("logits") or {}
    tasks = {name: {"acc_drop": t.get("acc_drop"), "acc_norm_drop": t.get("acc_norm_drop")}
             for name, t in (ev.get("tasks") or {}).items()}
    return {"ppl_increase": ppl_inc, "top1_agreement": logits.get("top1_agreement"),
            "logits_rel_l2": logits.get("rel_l2"), "tasks": tasks}


def check_report(report: Mapping[str, Any], th: Thresholds) -> GateResult:
    m = report_metrics(report)
    checks: list[Check] = []
    if th.max_ppl_increase is not None:
        checks.append(Check("ppl_increase", m["ppl_increase"], th.max_ppl_increase, "max",
                            "run `sq2trt evaluate` or `sq2trt compare`"))
    if th.min_top1_agreement is not None:
        checks.append(Check("top1_agreement", m["top1_agreement"], th.min_top1_agreement, "min",
                            "run `sq2trt compare`"))
    if th.max_logits_rel_l2 is not None:
        checks.append(Check("logits_rel_l2", m["logits_rel_l2"], th.max_logits_rel_l2, "max", "run `sq2trt compare`"))
    for key, table in (("acc_drop", th.max_acc_drop), ("acc_norm_drop", th.max_acc_norm_drop)):
        for task, limit in table.items():
            value = (m["tasks"].get(task) or {}).get(key)
            checks.append(Check(f"{task}.{key}", value, limit, "max", f"run `sq2trt evaluate --tasks {task}`"))
    return GateResult(tuple(checks))


def enforce(report: Mapping[str, Any], th: Thresholds) -> GateResult:
    """:func:`check_report`, raising :class:`AccuracyGateError` naming each failed metric."""
    res = check_report(report, th)
    if not res:
        raise AccuracyGateError(str(res))
    return res
