"""Zero-shot multiple choice by log-likelihood, scored exactly as lm-eval-harness scores it.

Task format (one JSON object per line; point ``sq2trt evaluate --tasks`` at your own file)::

    {"context": "The man turned on the faucet therefore", "choices": [" the toilet filled with water.",
     " water flowed from the spout."], "label": 1}

with an optional ``"delimiter"`` (default ``""``): the model scores the continuation
``delimiter + choice`` after ``context`` (lm-eval's ``target_delimiter``; put the separating space in
the choice or in the delimiter). For every example ``ll_i = sum log p(continuation_i | context)``, and

- ``acc``      = 1 if argmax_i ll_i == label
- ``acc_norm`` = 1 if argmax_i ll_i / len(choice_i in characters) == label

which is lm-eval's ``acc`` / ``acc_norm`` (``completion_len = len(choice)``, the delimiter not counted). Tokenization follows
lm-eval's ``HFLM._encode_pair``: trailing spaces of the context move to the continuation, the pair
is encoded whole and the context's tokens are cut off the front.

Built-in converters (pure functions) turn the shared COPA (SuperGLUE jsonl) and OpenBookQA (TSV)
files into this format with lm-eval 0.4's prompts, exactly: lm-eval joins context and choice with
its default ``target_delimiter`` " ", and its COPA choices already start with a space, so lm-eval
scores COPA continuations with two leading spaces. We reproduce that (delimiter " ") so numbers are
comparable with published lm-eval COPA results.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import CalibrationDataError

log = logging.getLogger(__name__)

LogitsFn = Callable[[np.ndarray], np.ndarray]  # input_ids (B, T) int64 -> logits (B, T, V)


class TaskDataError(CalibrationDataError):
    """A task file is missing or malformed (see sq2trt.tasks for the format)."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = ""  # scored continuation = delimiter + choice; acc_norm counts len(choice) only


# --------------------------------------------------------------------------- converters (pure)
def _copa_choice(text: str) -> str:
    return " " + text[0].lower() + text[1:]


def example_from_copa(rec: dict[str, Any]) -> Example:
    """lm-eval ``copa``: premise without its final period + " because" / " therefore";
    choices " " + choice with a lower-cased first letter; lm-eval's default delimiter " "."""
    connector = {"cause": "because", "effect": "therefore"}[rec["question"]]
    return Example(rec["premise"].strip()[:-1] + f" {connector}",
                   (_copa_choice(rec["choice1"]), _copa_choice(rec["choice2"])), int(rec["label"]), " ")


_OBQA_CHOICE = re.compile(r"\(([A-Z])\)\s*")


def example_from_openbookqa(row: dict[str, str]) -> Example:
    """lm-eval ``openbookqa``: context = question stem; continuations " " + choice text (delimiter
    " ", so acc_norm divides by the text's length as lm-eval does); label from the answer key. ``row`` is a TSV row with columns Question Stem, Choices, Answer Key."""
    parts = _OBQA_CHOICE.split(row["Choices"].strip())
    # ["", "A", "text ", "B", "text ", ...]
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if not letters or len(letters) != len(texts):
        raise TaskDataError(f"cannot parse OpenBookQA choices {row['Choices']!r}")
    key = row["Answer Key"].strip()
    if key not in letters:
        raise TaskDataError(f"OpenBookQA answer key {key!r} not among choices {letters}")
    return Example(row["Question Stem"].strip(), tuple(texts), letters.index(key), " ")


def load_copa(path: str | os.PathLike) -> list[Example]:
    return [example_from_copa(json.loads(line)) for line in _read(path).splitlines() if line.strip()]


def load_openbookqa(path: str | os.PathLike) -> list[Example]:
    rows = csv.DictReader(_read(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [example_from_openbookqa(r) for r in rows]


def load_task_jsonl(path: str | os.PathLike) -> list[Example]:
    out = []
    from .data import jsonl_records

    for n, rec in jsonl_records(_read(path), str(path), TaskDataError):
        ok = (isinstance(rec, dict) and isinstance(rec.get("context"), str)
              and isinstance(rec.get("choices"), list) and len(rec["choices"]) >= 2
              and all(isinstance(c, str) and c for c in rec["choices"])
              and isinstance(rec.get("label"), int) and 0 <= rec["label"] < len(rec["choices"])
              and isinstance(rec.get("delimiter", ""), str))
        if not ok:
            raise TaskDataError(f"{path}:{n}: each line needs {{\"context\": str, \"choices\": [str, str, ...] "
                                "(non-empty), \"label\": int index into choices, optional \"delimiter\": str}")
        out.append(Example(rec["context"], tuple(rec["choices"]), rec["label"], rec.get("delimiter", "")))
    if not out:
        raise TaskDataError(f"{path} holds no examples")
    return out


def _read(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"task file not found: {p}")
    return p.read_text(encoding="utf-8")


# Built-in tasks: name -> (loader, file relative to the data folder)
BUILTIN_TASKS: dict[str, tuple[Callable[[str | os.PathLike], list[Example]], str]] = {
    "copa": (load_copa, "copa/test.jsonl"),  # the SuperGLUE validation split (see SOURCE.md)
    "openbookqa": (load_openbookqa, "openbookqa/test.tsv"),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("SQ2TRT_DATA", Path.cwd().parent / "shared" / "data"))


def resolve_task(spec: str, data_dir: str | os.PathLike | None = None) -> tuple[str, Path, list[Example]]:
    """``copa`` / ``openbookqa`` (read from ``data_dir``, default $SQ2TRT_DATA) or a task .jsonl path:
    (name, file, examples)."""
    if spec in BUILTIN_TASKS:
        loader, rel = BUILTIN_TASKS[spec]
        path = Path(data_dir or default_data_dir()) / rel
        if not path.is_file():
            raise TaskDataError(f"task {spec!r} reads {path}, which does not exist; pass --task-data DIR "
                                "(or set SQ2TRT_DATA) to the folder holding copa/ and openbookqa/")
        return spec, path, loader(path)
    path = Path(spec)
    if path.suffix == ".jsonl" and path.is_file():
        return path.stem, path, load_task_jsonl(path)
    raise TaskDataError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN_TASKS)} or a .jsonl file "
                        "of {\"context\", \"choices\", \"label\"} lines")


def examples_to_jsonl(examples: Iterable[Example]) -> str:
    return "".join(json.dumps({"context": e.context, "choices": list(e.choices), "label": e.label,
                               **({"delimiter": e.delimiter} if e.delimiter else {})}) + "\n"
                   for e in examples)


# --------------------------------------------------------------------------- metrics (pure)
def acc(lls: Sequence[float], label: int) -> float:
    return float(int(np.argmax(lls)) == label)


def acc_norm(lls: Sequence[float], choices: Sequence[str], label: int) -> float:
    """lm-eval's acc_norm: log-likelihood divided by the choice's length in characters."""
    lens = np.array([float(len(c)) for c in choices])
    return float(int(np.argmax(np.asarray(lls, dtype=np.float64) / lens)) == label)


def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample std / sqrt(n)), as lm-eval reports it."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


# --------------------------------------------------------------------------- log-likelihoods
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval ``HFLM._encode_pair``: move trailing spaces to the continuation, encode the whole
    string, and cut the context's tokens off the front."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer(text)["input_ids"])


def prefix_token_id(tokenizer: Any) -> int:
    """The token that stands in for an empty context (lm-eval: BOS, else EOS)."""
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def loglikelihoods(logits_fn: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], *,
                   max_len: int = 2048, batch_tokens: int = 4096, prefix_id: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """``[(sum log p(cont | ctx), cont is the greedy continuation)]`` for token-id pairs.

    Requests are sorted by length and packed into right-padded batches of at most
    ``batch_tokens`` tokens (a causal model's logits before the padding do not depend on it, so
    the engine needs no attention mask). Inputs longer than ``max_len`` lose context from the left.
    """
    items = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise TaskDataError("a continuation encodes to no tokens; choices must be non-empty text")
        ctx = list(ctx) or [prefix_id]
        full = (ctx + list(cont))[-(max_len + 1):][:-1]  # model input: all but the last token
        items.append((i, full, list(cont)))
    order = sorted(range(len(items)), key=lambda k: -len(items[k][1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    k = 0
    while k < len(order):
        width = len(items[order[k]][1])
        n = max(1, batch_tokens // width)
        chunk = [items[j] for j in order[k: k + n]]
        ids = np.zeros((len(chunk), width), dtype=np.int64)
        for r, (_, inp, _) in enumerate(chunk):
            ids[r, : len(inp)] = inp
        logits = torch.from_numpy(np.asarray(logits_fn(ids), dtype=np.float32))
        logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        for r, (i, inp, cont) in enumerate(chunk):
            L = len(cont)
            lp = logp[r, len(inp) - L: len(inp)]  # (L, V): predictions of the continuation tokens
            tgt = torch.tensor(cont, dtype=torch.int64)
            ll = float(lp.gather(-1, tgt[:, None]).double().sum())
            out[i] = (ll, bool((lp.argmax(-1) == tgt).all()))
        k += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return out


@dataclass(frozen=True)
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (f"{self.task}: acc {self.acc:.4f} ± {self.acc_stderr:.4f}, acc_norm {self.acc_norm:.4f} "
                f"± {self.acc_norm_stderr:.4f} (n={self.n})")


def item_correct(examples: Sequence[Example], lls: Sequence[Sequence[float]]) -> dict[str, list[bool]]:
    """Per item, whether the choice of highest log-likelihood (``acc``) and of highest length-normalized
    log-likelihood (``acc_norm``) is the right one: the paired outcomes task-drop intervals are made from."""
    return {"acc": [bool(acc(ll, ex.label)) for ll, ex in zip(lls, examples)],
            "acc_norm": [bool(acc_norm(ll, ex.choices, ex.label)) for ll, ex in zip(lls, examples)]}


def score_examples(task: str, examples: Sequence[Example], logits_fn: LogitsFn, tokenizer: Any, *,
                   batch_tokens: int = 4096, max_len: int = 2048,
                   progress: Callable[[int], None] | None = None) -> tuple[TaskResult, list[list[float]]]:
    """Score every choice of every example in one batched pass; (result, per-example lls)."""
    requests, owner = [], []
    for e_i, ex in enumerate(examples):
        for c in ex.choices:
            requests.append(encode_pair(tokenizer, ex.context, ex.delimiter + c))
            owner.append(e_i)
    lls_flat = loglikelihoods(logits_fn, requests, max_len=max_len, batch_tokens=batch_tokens,
                              prefix_id=prefix_token_id(tokenizer), progress=progress)
    lls: list[list[float]] = [[] for _ in examples]
    for e_i, (ll, _) in zip(owner, lls_flat):
        lls[e_i].append(ll)
    per_item = item_correct(examples, lls)
    accs, norms = [float(x) for x in per_item["acc"]], [float(x) for x in per_item["acc_norm"]]
    n = len(examples)
    return TaskResult(task, sum(accs) / n, sum(norms) / n, mean_stderr(accs), mean_stderr(norms), n), lls
