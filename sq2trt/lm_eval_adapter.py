"""lm-evaluation-harness model ``sq2trt``: an ONNX Runtime engine + tokenizer as an ``lm_eval`` LM.

Needs the optional extra (``pip install 'sq2trt[eval]'``, lm-eval >= 0.4.5); importing this module
imports lm_eval and registers the model name, nothing else in sq2trt needs lm-eval. Because the
``lm_eval`` command only knows models that were imported, run it through this module::

    python -m sq2trt.lm_eval_adapter --model sq2trt \\
        --model_args engine=build/<model>/O3/O3.ort.onnx,tokenizer=<HF id | dir | file.gguf> \\
        --tasks copa,openbookqa

(lm-eval downloads its task data from the Hugging Face hub, so this needs the internet; offline,
``sq2trt evaluate --tasks copa,openbookqa`` scores the same prompts from local files.)

Implemented: ``loglikelihood`` and ``loglikelihood_rolling`` (lm-eval's rolling windows, so
perplexity tasks work). ``generate_until`` raises NotImplementedError: the exported engine returns
logits for a whole sequence without a KV cache, so generation would cost one full forward pass per
token; generative tasks are not supported.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ._lazy import lazy_import
from .tasks import encode_pair, loglikelihoods, prefix_token_id

log = logging.getLogger(__name__)

lm_eval = lazy_import("lm_eval", hint="the lm-eval adapter needs lm-evaluation-harness: "
                      "pip install 'sq2trt[eval]' (lm-eval>=0.4.5)")
_api_model = lazy_import("lm_eval.api.model", hint="pip install 'sq2trt[eval]'")
_registry = lazy_import("lm_eval.api.registry", hint="pip install 'sq2trt[eval]'")
_utils = lazy_import("lm_eval.utils", hint="pip install 'sq2trt[eval]'")


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from an HF id or directory, a ``.gguf`` file, or ``random:<arch>`` (byte tokenizer
    of sq2trt's tiny test models)."""
    from .errors import ModelNotFoundError

    if spec.startswith("random:"):
        from .models import TINY_CONFIGS, ByteTokenizer

        arch = spec[len("random:"):]
        if arch not in TINY_CONFIGS:
            raise ModelNotFoundError(f"unknown random model {arch!r}; choose one of {', '.join(TINY_CONFIGS)}")
        return ByteTokenizer(int(TINY_CONFIGS[arch]["vocab_size"]))
    from transformers import AutoTokenizer

    p = Path(spec)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        from .preflight import local_only_kwargs

        return AutoTokenizer.from_pretrained(spec, **local_only_kwargs(spec))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"tokenizer {spec!r} could not be loaded ({exc}); pass an HF id, a model "
                                 "directory or the .gguf file the engine was exported from") from None


def _make_class():
    LM = _api_model.LM

    class Sq2trtLM(LM):
        """``engine``: an ONNX / ORT engine file (input_ids -> logits) or any logits function;
        ``tokenizer``: a spec for :func:`load_tokenizer` or a tokenizer object."""

        def __init__(self, engine: Any, tokenizer: Any, device: str = "cpu", max_length: int = 2048,
                     batch_tokens: int = 4096, optimize: bool = True, **_ignored: Any):
            super().__init__()
            if isinstance(engine, (str, Path)):
                from .engine import session
                from .evaluate import ort_logits_fn

                self._logits = ort_logits_fn(session(engine, device=device if device in ("cpu", "cuda") else "auto",
                                                     optimize=str(optimize).lower() not in ("false", "0")))
            else:
                self._logits = engine
            self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
            self.max_length = int(max_length)
            self.batch_tokens = int(batch_tokens)
            self.prefix_id = prefix_token_id(self.tokenizer)
            if _ignored:
                log.debug("ignoring lm-eval arguments %s", sorted(_ignored))

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                context, continuation = req.args
                if context == "":
                    ctx, cont = [self.prefix_id], self._encode(continuation)
                else:
                    ctx, cont = encode_pair(self.tokenizer, context, continuation)
                pairs.append((ctx, cont))
            return loglikelihoods(self._logits, pairs, max_len=self.max_length, batch_tokens=self.batch_tokens,
                                  prefix_id=self.prefix_id)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                (text,) = req.args
                windows = [_utils.make_disjoint_window(w) for w in _utils.get_rolling_token_windows(
                    token_list=self._encode(text), prefix_token=self.prefix_id, max_seq_len=self.max_length,
                    context_len=1)]
                lls = loglikelihoods(self._logits, windows, max_len=self.max_length,
                                     batch_tokens=self.batch_tokens, prefix_id=self.prefix_id)
                out.append(float(sum(ll for ll, _ in lls)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                "the sq2trt lm-eval model scores log-likelihoods only (loglikelihood, loglikelihood_rolling): "
                "the exported engine has no KV cache, so generative tasks (generate_until) are not supported; "
                "choose multiple-choice or perplexity tasks")

        def _encode(self, text: str) -> list[int]:
            from .tasks import _encode

            return _encode(self.tokenizer, text)

    Sq2trtLM.__name__ = Sq2trtLM.__qualname__ = "Sq2trtLM"
    return Sq2trtLM


_CLASS = None


def model_class():
    """The ``lm_eval`` LM subclass, registered as ``sq2trt`` (imports lm_eval on first call)."""
    global _CLASS
    if _CLASS is None:
        cls = _make_class()
        try:
            _CLASS = _registry.register_model("sq2trt")(cls)
        except (ValueError, AssertionError):  # already registered (module reloaded)
            _CLASS = cls
    return _CLASS


def main() -> None:
    """``python -m sq2trt.lm_eval_adapter <lm_eval arguments>``: lm_eval's CLI with ``sq2trt`` registered."""
    model_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
