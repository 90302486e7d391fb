"""Perplexity with the paper's protocol: joined text, non-overlapping windows, mean token NLL."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

LogitsFn = Callable[[np.ndarray], np.ndarray]  # input_ids (B, T) int64 -> logits (B, T, V) float


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(ids[t+1] | ids[:t+1]) over a batch of windows, and the token count.

    logits: (B, T, V); ids: (B, T). Each window predicts its tokens 1..T-1.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return float(nll.double().sum()), int(nll.numel())


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor,
               progress: Callable[[int], None] | None = None) -> float:
    """exp(mean NLL) over ``windows`` (n, T), evaluated one window at a time."""
    return batched_perplexity(logits_fn, windows, batch=1, progress=progress)


def ort_logits_fn(sess) -> LogitsFn:
    name = sess.get_inputs()[0].name
    return lambda ids: sess.run(None, {name: ids})[0]


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    from .export import LogitsOnly

    wrapper = LogitsOnly(model).eval()

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(ids)).numpy()

    return fn


def relative_gap(a: float, b: float) -> float:
    """|a / b - 1|: how far perplexity ``a`` is from ``b``, relatively."""
    return abs(a / b - 1.0)


# Exact Q/DQ graph (ORT without fusions) vs PyTorch fake quantization: both compute the same
# float32 numbers up to summation order (logits agree to ~2e-7 relative, measured on SmolLM2-135M), which moves a
# perplexity by ~1e-6 relative; a 1e-3 gap is three orders above that and well below what a wrong
# scale or a missing Q/DQ pair does (>= 1e-2 on every model measured).
# Optimized ORT engine vs fake quantization: the fused INT8 CPU kernels deviate by ~1e-2 relative on
# some GEMMs; measured perplexity gaps are reported, and a gap past this is logged as a warning.
ENGINE_PPL_RTOL = 2e-2


def batched_perplexity(logits_fn: LogitsFn, windows: torch.Tensor, *, batch: int = 1,
                       progress: Callable[[int], None] | None = None) -> float:
    """exp(mean NLL) over ``windows`` (n, T), ``batch`` windows per call (same result for any batch)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i: i + batch]
        logits = torch.from_numpy(np.asarray(logits_fn(ids.numpy())))
        s, c = window_nll(logits, ids)
        total, count = total + s, count + c
        if progress is not None:
            progress(ids.shape[0])
    return math.exp(total / count)


# --------------------------------------------------------------------------- paired scoring
class TokenScores:
    """Per-token results of one model on evaluation windows (n, T): the NLL of each predicted token
    (n, T - 1) and the argmax of every position's logits (n, T). Two models scored on the same windows
    are compared pairwise by :func:`paired_summary`."""

    def __init__(self, nll: np.ndarray, argmax: np.ndarray):
        self.nll = np.asarray(nll, dtype=np.float64)
        self.argmax = np.asarray(argmax, dtype=np.int64)
        if self.nll.ndim != 2 or self.argmax.shape != (self.nll.shape[0], self.nll.shape[1] + 1):
            raise ValueError(f"nll (n, T-1) and argmax (n, T) expected, got {self.nll.shape} and {self.argmax.shape}")

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    def head(self, windows: int) -> "TokenScores":
        """The scores of the first ``windows`` windows."""
        return TokenScores(self.nll[:windows], self.argmax[:windows])

    def save(self, path) -> None:
        from .artifacts import producing

        with producing(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, nll=self.nll, argmax=self.argmax.astype(np.int32))

    @classmethod
    def load(cls, path) -> "TokenScores":
        with np.load(path) as z:
            return cls(z["nll"], z["argmax"])


def score_tokens(logits_fn: LogitsFn, windows: torch.Tensor,
                 progress: Callable[[int], None] | None = None) -> TokenScores:
    """Per-token NLL and argmax of ``logits_fn`` on ``windows`` (n, T), one window per call."""
    nll, top = [], []
    for i in range(windows.shape[0]):
        ids = windows[i: i + 1]
        logits = torch.from_numpy(np.asarray(logits_fn(ids.numpy())))
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll.append((-logp.gather(-1, ids[:, 1:, None]).squeeze(-1)).double().numpy())
        top.append(logits.argmax(-1).numpy())
        if progress is not None:
            progress(1)
    return TokenScores(np.concatenate(nll), np.concatenate(top))


def paired_summary(reference: TokenScores, engine: TokenScores) -> dict:
    """Both perplexities, the engine's perplexity increase and its top-1 agreement with the reference
    on the same tokens, each with a confidence interval (sq2trt.stats; blocks cut within windows)."""
    from .stats import agreement_ci, block_sums, paired_ppl_increase

    if reference.nll.shape != engine.nll.shape:
        raise ValueError(f"paired scores need the same windows: {reference.nll.shape} vs {engine.nll.shape}")
    r_sum, counts = block_sums(reference.nll)
    e_sum, _ = block_sums(engine.nll)
    agree = (reference.argmax == engine.argmax)[:, : reference.nll.shape[1]]  # positions that predict a token
    a_sum, a_n = block_sums(agree.astype(np.float64))
    inc = paired_ppl_increase(r_sum, e_sum, counts)
    return {"ppl_reference": inc.pop("ppl_reference"), "ppl_engine": inc.pop("ppl_engine"),
            "ppl_increase": inc, "top1_agreement": agreement_ci(a_sum, a_n),
            "windows": int(reference.nll.shape[0]), "tokens": int(counts.sum())}
