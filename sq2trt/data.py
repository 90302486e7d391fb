"""Text sources and token windows for calibration and evaluation.

Sources: a plain-text file, a JSONL file (a ``text`` field per line), or ``hf:<dataset>[:<config>
[:<split>]]`` when online (needs the ``datasets`` package).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CalibrationDataError

log = logging.getLogger(__name__)


def load_text(source: str) -> str:
    if not source:
        raise CalibrationDataError("no text source given: pass a .txt or .jsonl file (or hf:<dataset>) "
                                   "with --calib-data / --eval-data")
    if source.startswith("hf:"):
        return _load_hf(source)
    path = Path(source)
    if not path.is_file():
        raise CalibrationDataError(f"text file not found: {source}")
    if path.suffix == ".jsonl":
        texts = []
        for n, rec in jsonl_records(path.read_text(encoding="utf-8"), source, CalibrationDataError):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CalibrationDataError(f"{source}:{n}: each JSONL line needs a string 'text' field")
            texts.append(rec["text"])
        text = "\n\n".join(texts)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationDataError(f"{source} is empty")
    return text


def jsonl_records(text: str, source: str, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every non-blank line; ``error`` names the bad line."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{source}:{n}: not JSON ({exc})") from None


def _load_hf(source: str) -> str:
    parts = source[3:].split(":")
    name, cfg, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError("hf: sources need the 'datasets' package (pip install datasets) and "
                                   "internet; offline, pass a .txt or .jsonl file") from None
    try:
        ds = datasets.load_dataset(name, cfg, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "not available"
        raise CalibrationDataError(f"could not load dataset {name!r} ({exc}); offline, pass a .txt or "
                                   ".jsonl file") from None
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(x for x in ds[col] if isinstance(x, str))


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D int64 tensor (no special tokens added)."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except TypeError:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def bos_prefix(tokenizer: Any) -> int | None:
    """The token the tokenizer puts in front of every text it encodes with its defaults (Llama-2's and
    OPT's BOS), or None when it adds none (GPT-2, SmolLM2, Qwen2): models trained that way see it at
    position 0 of every sequence, and its activations there (an attention sink) differ from any text
    token's."""
    probe = "The quick brown fox"
    try:
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        default = list(tokenizer(probe)["input_ids"])
    except TypeError:  # a tokenizer without special tokens
        return None
    if len(default) == len(plain) + 1 and default[1:] == plain:
        return int(default[0])
    return None


def calibration_windows(ids: torch.Tensor, num: int, seq_len: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens at random offsets (fixed seed): (num, seq_len).

    With ``bos`` (:func:`bos_prefix`), each window is ``bos`` followed by ``seq_len - 1`` text tokens,
    as the model sees every sequence (the reference SmoothQuant calibration tokenizes each sample with
    the tokenizer's defaults); each window still lies within ``[start, start + seq_len)`` of the text.
    Raises when the text has fewer than ``seq_len`` tokens. Windows may overlap when the text is
    shorter than ``num * seq_len`` (a warning is logged).
    """
    n = ids.numel()
    if n < seq_len:
        raise CalibrationDataError(f"calibration text has {n} tokens, fewer than one window of "
                                   f"{seq_len}; give more text or a smaller --calib-seq-len")
    if n < num * seq_len:
        log.warning("calibration text has %d tokens < %d x %d: windows will overlap", n, num, seq_len)
    starts = calibration_starts(n, num, seq_len, seed)
    if bos is None:
        return torch.stack([ids[s: s + seq_len] for s in starts])
    head = torch.tensor([bos], dtype=ids.dtype)
    return torch.stack([torch.cat([head, ids[s: s + seq_len - 1]]) for s in starts])


def calibration_starts(n_tokens: int, num: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of :func:`calibration_windows` (so held-out text can avoid them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len + 1, (num,), generator=g).tolist()


def eval_windows(ids: torch.Tensor, window: int, max_tokens: int = 0) -> torch.Tensor:
    """Non-overlapping windows over the joined text (the paper's perplexity protocol):
    (n_windows, window). ``max_tokens`` > 0 keeps only the first tokens."""
    if max_tokens:
        ids = ids[:max_tokens]
    n = ids.numel() // window
    if n < 1:
        raise CalibrationDataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of "
                                   f"{window}")
    return ids[: n * window].view(n, window)
