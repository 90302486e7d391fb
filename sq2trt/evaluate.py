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
    total, count = 0.0, 0
    for w in windows:
        ids = w[None]
        logits = torch.from_numpy(np.asarray(logits_fn(ids.numpy())))
        s, c = window_nll(logits, ids)
        total, count = total + s, count + c
        if progress is not None:
            progress(1)
    return math.exp(total / count)


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
