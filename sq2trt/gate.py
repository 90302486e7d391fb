"""The accuracy gate CI fails on: ``sq2trt report --check thresholds.yaml``.

Thresholds (YAML; every key optional, see recipes/thresholds.yaml)::

    max_ppl_increase: 0.05          # engine perplexity / reference perplexity - 1 (paired, with interval)
    min_top1_agreement: 0.875       # argmax agreement with the reference on every evaluation token (interval)
    max_logits_rel_l2: 0.175        # ||engine - ref|| / ||ref|| over the comparison logits (Polygraphy; interval)
    max_acc_drop: {copa: 0.06}      # float acc - engine acc, per task (absolute; paired interval: 100 items need >= ~0.06)
    max_acc_norm_drop: {copa: 0.05}

A threshold on a metric the report does not contain fails (naming what to run): a gate must not
pass because a measurement is missing. Pure functions over the report dict; the CLI raises
:class:`~sq2trt.errors.AccuracyGateError` (exit code 1) on failure.

Measured values with a confidence interval (``ppl_increase``: paired t-interval; ``top1_agreement``:
Wilson; see sq2trt.stats) are judged three ways:

- ``pass``: the value *and its whole 95% interval* are within the limit;
- ``FAIL``: the value is beyond the limit (a regression);
- ``TOO SMALL``: the value is within the limit but the interval reaches past it, i.e. the evaluation
  cannot tell this engine from one that fails. This fails too (:class:`EvaluationTooSmallError`, exit
  code 1): a gate that passes on noise is not a gate. Evaluate more tokens (``--eval-max-tokens``) or
  set the limit from a measurement at this budget (recipes/thresholds.yaml says how).

The logits' relative L2 error has an interval over blocks of comparison positions
(``stats.rel_l2_ci``) and each task accuracy drop one paired on the items (``stats.paired_drop_ci``,
Newcombe's score interval: only items the two models answer differently move it). Reports written
before these intervals existed are judged on the value alone.
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


class EvaluationTooSmallError(AccuracyGateError):
    """Every failed threshold failed only because its confidence interval crosses the limit: the
    evaluation is too small to judge (exit code 1, like any gate failure)."""


PASS, FAIL, TOO_SMALL, MISSING = "pass", "fail", "too small", "missing"


@dataclass(frozen=True)
class Check:
    metric: str
    value: float | None  # None: the report lacks it
    limit: float
    kind: str  # "max" or "min"
    hint: str = ""
    lo: float | None = None  # confidence interval of the value, when the report has one
    hi: float | None = None
    n: int | None = None  # tokens (or items) the value was measured on
    unit: str = "tokens"

    @property
    def status(self) -> str:
        if self.value is None or not math.isfinite(self.value):
            return MISSING
        if not (self.value <= self.limit if self.kind == "max" else self.value >= self.limit):
            return FAIL
        bound = self.hi if self.kind == "max" else self.lo
        if bound is not None and not (bound <= self.limit if self.kind == "max" else bound >= self.limit):
            return TOO_SMALL
        return PASS

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def more(self) -> str:
        """What makes this value's interval narrower."""
        if self.unit == "items":
            return "evaluate a task with more items"
        if self.metric == "logits_rel_l2":
            return "compare on more sequences (--eval-compare-samples)"
        return "evaluate more tokens (--eval-max-tokens)"

    def __str__(self) -> str:
        op = "<=" if self.kind == "max" else ">="
        if self.value is None:
            return f"FAIL {self.metric}: missing from the report (needs {op} {self.limit:g}); {self.hint}"
        ci = "" if self.lo is None else f", 95% interval [{self.lo:.4g}, {self.hi:.4g}]"
        on = "" if self.n is None else f" on {self.n} {self.unit}"
        text = f"{self.metric} = {self.value:.4g}{ci}{on} (needs {op} {self.limit:g})"
        st = self.status
        if st == TOO_SMALL:
            return (f"TOO SMALL {text}: the value passes but its interval crosses the limit, so this evaluation "
                    f"cannot tell the engine from one that fails; {self.more} or re-derive the limit at this budget")
        return f"{'ok  ' if st == PASS else 'FAIL'} {text}"


@dataclass(frozen=True)
class GateResult:
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def too_small(self) -> bool:
        """Failed, and only because intervals cross limits (no value is out of bounds or missing)."""
        return bool(self.failures) and all(c.status == TOO_SMALL for c in self.failures)

    def __bool__(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        if self:
            head = "accuracy gate passed"
        elif self.too_small:
            head = (f"accuracy gate FAILED: evaluation too small to judge ({len(self.failures)} of "
                    f"{len(self.checks)} intervals cross their limit)")
        else:
            head = f"accuracy gate FAILED ({len(self.failures)} of {len(self.checks)})"
        return "\n".join([head] + [f"  {c}" for c in self.checks])


def _interval(d: Mapping[str, Any] | None, n: int | None = None) -> dict[str, Any]:
    d = d or {}
    return {"lo": d.get("lo"), "hi": d.get("hi"), "n": d.get("tokens", d.get("items", n))}


def report_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The gated numbers of a report: eval.json's perplexity increase when present (PyTorch float
    baseline), else compare.json's (ref.onnx baseline), each with its paired 95% interval where the
    report has one; top-1 agreement from compare.json's paired comparison on the evaluation windows
    (every evaluation token, Wilson interval), else Polygraphy's on the comparison windows (no interval);
    the comparison windows' relative L2 error and each task drop with their intervals where present."""
    ev = report.get("eval") or {}
    cmp = report.get("compare") or {}
    src = ev if "ppl_increase" in ev else cmp
    ppl_inc = src.get("ppl_increase")
    ppl_ci = _interval((src.get("paired") or {}).get("ppl_increase"))
    logits = cmp.get("logits") or {}
    top1 = (cmp.get("paired") or {}).get("top1_agreement")
    top1_value = top1["value"] if top1 else logits.get("top1_agreement")
    top1_ci = _interval(top1) if top1 else {"lo": None, "hi": None, "n": logits.get("tokens")}
    tasks = {}
    for name, t in (ev.get("tasks") or {}).items():
        paired = t.get("paired") or {}
        tasks[name] = {"acc_drop": t.get("acc_drop"), "acc_norm_drop": t.get("acc_norm_drop"), "n": t.get("n"),
                       "acc_drop_ci": _interval(paired.get("acc"), t.get("n")),
                       "acc_norm_drop_ci": _interval(paired.get("acc_norm"), t.get("n"))}
    return {"ppl_increase": ppl_inc, "ppl_increase_ci": ppl_ci, "top1_agreement": top1_value,
            "top1_agreement_ci": top1_ci, "logits_rel_l2": logits.get("rel_l2"),
            "logits_rel_l2_ci": _interval(logits.get("rel_l2_interval"), logits.get("tokens")), "tasks": tasks}


def check_report(report: Mapping[str, Any], th: Thresholds) -> GateResult:
    m = report_metrics(report)
    checks: list[Check] = []
    if th.max_ppl_increase is not None:
        checks.append(Check("ppl_increase", m["ppl_increase"], th.max_ppl_increase, "max",
                            "run `sq2trt evaluate` or `sq2trt compare`", **m["ppl_increase_ci"]))
    if th.min_top1_agreement is not None:
        checks.append(Check("top1_agreement", m["top1_agreement"], th.min_top1_agreement, "min",
                            "run `sq2trt compare`", **m["top1_agreement_ci"]))
    if th.max_logits_rel_l2 is not None:
        checks.append(Check("logits_rel_l2", m["logits_rel_l2"], th.max_logits_rel_l2, "max", "run `sq2trt compare`",
                            **m["logits_rel_l2_ci"]))
    for key, table in (("acc_drop", th.max_acc_drop), ("acc_norm_drop", th.max_acc_norm_drop)):
        for task, limit in table.items():
            t = m["tasks"].get(task) or {}
            ci = t.get(f"{key}_ci") or {"lo": None, "hi": None, "n": None}
            checks.append(Check(f"{task}.{key}", t.get(key), limit, "max", f"run `sq2trt evaluate --tasks {task}`",
                                unit="items", **ci))
    return GateResult(tuple(checks))


def enforce(report: Mapping[str, Any], th: Thresholds) -> GateResult:
    """:func:`check_report`, raising :class:`AccuracyGateError` naming each failed metric."""
    res = check_report(report, th)
    if not res:
        raise (EvaluationTooSmallError if res.too_small else AccuracyGateError)(str(res))
    return res
