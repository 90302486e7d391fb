"""Confidence intervals for the accuracy numbers the gate judges (pure functions, no torch).

Perplexity is compared *paired*: the reference and the engine score the same tokens, so the noise of
the text itself (an easy or a hard paragraph moves both perplexities together) cancels in their
ratio. The evaluation tokens are cut into blocks of :data:`BLOCK_TOKENS` predicted tokens (within
each window: windows are independent forward passes), and for every block ``b`` we keep the NLL sum
of both models and the token count ``n_b``. With ``d_b = nll_engine_b - nll_reference_b``:

    log(ppl_engine / ppl_reference) = sum_b d_b / sum_b n_b          (exactly the perplexity ratio)

and its standard error is that of a ratio estimator over the blocks, which are treated as the
independent units (cluster sampling; :func:`ratio_ci`). The 95% interval is a Student-t interval
with ``blocks - 1`` degrees of freedom on the log scale, mapped through ``exp(.) - 1``. Treating
blocks, not tokens, as independent keeps the interval honest about the correlation of neighbouring
tokens' errors.

Top-1 agreement is a proportion over tokens: :func:`wilson` gives the Wilson score interval, with
the token count replaced by an effective count ``n / deff`` when blocks show that agreement is
correlated within a block (``deff`` >= 1, the design effect, :func:`design_effect`).

The logits' relative L2 error ``||e - r|| / ||r||`` is the square root of a ratio of sums over tokens,
``sum_t ||e_t - r_t||^2 / sum_t ||r_t||^2``: the same ratio estimator over blocks of
:data:`REL_L2_BLOCK_TOKENS` positions of the comparison windows gives its interval, mapped through the
square root (:func:`rel_l2_ci`).

A task accuracy drop is a difference of two proportions measured on the *same* items (the float model
and the engine answer every item): :func:`paired_drop_ci` is Newcombe's score interval for paired
proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial
proportions based on paired data", Statistics in Medicine 17:2635, method 10). Only the items the two
answer differently move the drop, and the interval knows it: 100 items of which 3 differ give a far
tighter interval than 100 items judged as two independent accuracies.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95
BLOCK_TOKENS = 128  # predicted tokens per block (the last block of a window may be shorter)
REL_L2_BLOCK_TOKENS = 32  # positions per block of the (shorter) comparison windows


# --------------------------------------------------------------------------- distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- intervals
def ratio_ci(num: Sequence[float], den: Sequence[float], conf: float = CONFIDENCE) -> tuple[float, float, float]:
    """``r = sum(num) / sum(den)`` over independent units (blocks) and its t-interval.

    Linearized (delta-method) variance of a ratio estimator: with residuals ``e_b = num_b - r den_b``
    and ``k`` units, ``se = sqrt(sum e_b^2 / (k (k - 1))) / mean(den)``; ``t`` has ``k - 1`` degrees
    of freedom. For equal ``den`` this is the ordinary t-interval of the per-unit means. Fewer than two
    units give an infinite interval (nothing to estimate the spread from)."""
    x, n = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if x.shape != n.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("num and den must be 1-D arrays of the same, non-zero length")
    if np.any(n <= 0):
        raise ValueError("den must be positive")
    r = float(x.sum() / n.sum())
    k = x.size
    if k < 2:
        return r, -math.inf, math.inf
    e = x - r * n
    se = math.sqrt(float((e * e).sum()) / (k * (k - 1))) / float(n.mean())
    half = t_quantile(0.5 + conf / 2.0, k - 1) * se
    return r, r - half, r + half


def paired_ppl_increase(nll_reference: Sequence[float], nll_engine: Sequence[float], tokens: Sequence[int],
                        conf: float = CONFIDENCE) -> dict[str, Any]:
    """Perplexity increase of the engine over the reference from per-block NLL sums on the same
    tokens: ``value = ppl_engine / ppl_reference - 1`` and its ``conf`` interval (see the module
    docstring)."""
    r_nll, e_nll = np.asarray(nll_reference, np.float64), np.asarray(nll_engine, np.float64)
    n = np.asarray(tokens, np.float64)
    lr, lo, hi = ratio_ci(e_nll - r_nll, n, conf)
    return {"value": math.expm1(lr), "lo": math.expm1(lo) if math.isfinite(lo) else -1.0,
            "hi": math.expm1(hi) if math.isfinite(hi) else math.inf, "confidence": conf,
            "blocks": int(n.size), "tokens": int(n.sum()),
            "ppl_reference": math.exp(float(r_nll.sum() / n.sum())),
            "ppl_engine": math.exp(float(e_nll.sum() / n.sum())),
            "method": f"paired t-interval ({int(n.size) - 1} df) of the log perplexity ratio over "
                      f"blocks of <= {BLOCK_TOKENS} tokens (ratio estimator)"}


def design_effect(successes: Sequence[float], tokens: Sequence[float]) -> float:
    """Variance of a proportion estimated over blocks (cluster sampling) divided by its variance if
    all tokens were independent; at least 1 (never narrows the Wilson interval)."""
    k_b, n_b = np.asarray(successes, np.float64), np.asarray(tokens, np.float64)
    n, k = float(n_b.sum()), float(k_b.sum())
    if k_b.size < 2 or n <= 0:
        return 1.0
    p = k / n
    binom = p * (1.0 - p) / n
    if binom <= 0:
        return 1.0
    e = k_b - p * n_b
    cluster = float((e * e).sum()) / (k_b.size * (k_b.size - 1)) / float(n_b.mean()) ** 2
    return max(1.0, cluster / binom)


def wilson(successes: float, n: float, conf: float = CONFIDENCE) -> tuple[float, float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (n may be an effective,
    non-integer count)."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + conf / 2.0)
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def agreement_ci(agree: Sequence[int], tokens: Sequence[int], conf: float = CONFIDENCE) -> dict[str, Any]:
    """Top-1 agreement from per-block counts: the proportion over all tokens, and its Wilson interval
    at the effective token count ``tokens / deff``."""
    a, n = np.asarray(agree, np.float64), np.asarray(tokens, np.float64)
    total = float(n.sum())
    deff = design_effect(a, n)
    p, lo, hi = wilson(float(a.sum()) / deff, total / deff, conf)
    return {"value": float(a.sum()) / total, "lo": lo, "hi": hi, "confidence": conf, "tokens": int(total),
            "blocks": int(n.size), "design_effect": deff,
            "method": f"Wilson score interval at the effective token count (tokens / design effect {deff:.2f}, "
                      f"blocks of <= {BLOCK_TOKENS} tokens)"}


def rel_l2_ci(err_sq: Sequence[float], ref_sq: Sequence[float], conf: float = CONFIDENCE) -> dict[str, Any]:
    """Relative L2 error ``sqrt(sum err_sq / sum ref_sq)`` from per-block sums of ``||e - r||^2`` and
    ``||r||^2``, with the ratio estimator's t-interval (:func:`ratio_ci`) mapped through the square
    root (a negative lower end of the squared ratio becomes 0)."""
    e, r = np.asarray(err_sq, np.float64), np.asarray(ref_sq, np.float64)
    sq, lo, hi = ratio_ci(e, r, conf)
    return {"value": math.sqrt(max(sq, 0.0)), "lo": math.sqrt(max(lo, 0.0)), "hi": math.sqrt(max(hi, 0.0)),
            "confidence": conf, "blocks": int(e.size),
            "method": f"t-interval ({int(e.size) - 1} df) of the squared ratio over blocks of <= "
                      f"{REL_L2_BLOCK_TOKENS} positions (ratio estimator), square root"}


def paired_drop_ci(first: Sequence[bool], second: Sequence[bool], conf: float = CONFIDENCE) -> dict[str, Any]:
    """``mean(first) - mean(second)`` for two 0/1 outcomes on the same items (e.g. float model correct,
    engine correct) and Newcombe's paired score interval (method 10, see the module docstring).

    With the 2x2 table a (both 1), b (first only), c (second only), d (neither) over n items, the Wilson
    intervals (l1, u1) of p1 = (a + b) / n and (l2, u2) of p2 = (a + c) / n are combined with the
    correlation phi of the two outcomes (phi = (ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d)), reduced by n/2
    towards 0 when positive, and 0 when that product is 0):

        lo = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        hi = (p1 - p2) + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    """
    x, y = np.asarray(first, bool), np.asarray(second, bool)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("both outcomes must be 1-D of the same, non-zero length")
    n = int(x.size)
    a, b = int((x & y).sum()), int((x & ~y).sum())
    c, d = int((~x & y).sum()), int((~x & ~y).sum())
    p1, l1, u1 = wilson(a + b, n, conf)
    p2, l2, u2 = wilson(a + c, n, conf)
    den = float(a + b) * (c + d) * (a + c) * (b + d)
    if den == 0:
        phi = 0.0
    else:
        num = a * d - b * c
        phi = (max(num - n / 2.0, 0.0) if num > 0 else num) / math.sqrt(den)
    diff = p1 - p2
    lo = diff - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = diff + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return {"value": diff, "lo": max(lo, -1.0), "hi": min(hi, 1.0), "confidence": conf, "items": n,
            "discordant": b + c, "first_only": b, "second_only": c,
            "method": "Newcombe's score interval for paired proportions (1998, method 10)"}


# --------------------------------------------------------------------------- per-block scoring
def block_bounds(predicted: int, block: int = BLOCK_TOKENS) -> list[tuple[int, int]]:
    """[start, end) of the blocks that cut ``predicted`` tokens of one window."""
    if predicted <= 0:
        return []
    return [(s, min(s + block, predicted)) for s in range(0, predicted, block)]


def block_sums(values: np.ndarray, block: int = BLOCK_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Per-block sums of ``values`` (windows, positions), blocks cut within each window: (sums, counts)."""
    values = np.asarray(values)
    sums, counts = [], []
    for row in values.reshape(values.shape[0], -1):
        for s, e in block_bounds(row.shape[0], block):
            sums.append(float(row[s:e].astype(np.float64).sum()))
            counts.append(e - s)
    return np.asarray(sums, np.float64), np.asarray(counts, np.int64)
