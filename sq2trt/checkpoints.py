"""Random-weight checkpoints with the shapes of public models, so the real-size path runs offline.

The model hubs are unreachable from our machines, yet memory, disk, export and engine behaviour at
1B-13B parameters depend only on the shapes. This writes a Hugging Face model directory (config,
safetensors shards, a tokenizer) that ``sq2trt run --model DIR`` and ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(DIR)`` load offline:

    python -m sq2trt.checkpoints --shape opt-1.3b --out build/models/opt-1.3b-random [--outliers 4]
    make checkpoint SHAPE=opt-1.3b                      # the same, into build/models/<shape>-random/

- :data:`SHAPES` holds each public ``config.json``'s architecture hyperparameters (sizes, heads, norms,
  vocabulary, special token ids), copied from the public configs since the hubs cannot be read.
- Weights are transformers' own random initialisation (``from_config``), generated directly in the
  checkpoint dtype (FP16 by default), so a 7B shape needs ~13.5 GB of RAM, not 27 GB of FP32.
- The tokenizer is byte-level (``tokenizers`` BPE without merges, saved through
  ``PreTrainedTokenizerFast``): token id = UTF-8 byte value (0-255), plus ``<|endoftext|>`` = 256.
  Its ids are not the public model's vocabulary, which random weights make moot; every id is below
  ``vocab_size``.
- ``--outliers N`` plants the SmoothQuant paper's phenomenon: N hidden channels (the same ones in
  every layer, chosen with the seed) of every norm that feeds quantized Linears (the producers of
  ``sq2trt.archs.ARCHS``'s norm groups: OPT's self_attn_layer_norm and final_layer_norm, Llama's
  input_layernorm and post_attention_layernorm, ...) get their weight multiplied by a factor drawn
  from [50, 100]. The norm's output, the input of q/k/v and of the MLP, then has N channels whose
  magnitude is 50-100x the others' on every token: persistent outlier input channels. The channels
  and factors are recorded in ``random_checkpoint.json``.
- ``--layers N`` keeps only the first N decoder layers (every other shape stays public): for tests.
- Written to a temporary directory beside ``--out`` and renamed at the end: never half-written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, OutputDirError, Sq2trtError

log = logging.getLogger(__name__)

_OPT = dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=50272, max_position_embeddings=2048,
            do_layer_norm_before=True, activation_function="relu", enable_bias=True,
            layer_norm_elementwise_affine=True, dropout=0.1, attention_dropout=0.0, layerdrop=0.0, init_std=0.02,
            pad_token_id=1, bos_token_id=2, eos_token_id=2)
_LLAMA2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, max_position_embeddings=4096,
               hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)

# Public config.json values (facebook/opt-*, meta-llama/Llama-2-*-hf, mistralai/Mistral-7B-v0.1, Qwen/Qwen2-0.5B).
SHAPES: dict[str, dict[str, Any]] = {
    "opt-125m": dict(_OPT, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     word_embed_proj_dim=768),
    # post-LN, with 512-wide embeddings projected in and out: sq2trt refuses it (no norm to fold s into)
    "opt-350m": dict(_OPT, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(_OPT, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                     word_embed_proj_dim=2048),
    "opt-2.7b": dict(_OPT, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                     word_embed_proj_dim=2560),
    "opt-6.7b": dict(_OPT, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     word_embed_proj_dim=4096),
    "opt-13b": dict(_OPT, hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                    word_embed_proj_dim=5120),
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000,
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096,
                       rope_theta=10000.0, hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                       hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=131072, max_window_layers=24,
                       sliding_window=131072, use_sliding_window=False, rope_theta=1000000.0, hidden_act="silu",
                       rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643),
}
DTYPES = ("float16", "bfloat16")
EOS = "<|endoftext|>"
OUTLIER_RANGE = (50.0, 100.0)
META_FILE = "random_checkpoint.json"


def shape_config(shape: str, layers: int | None = None) -> Any:
    """The transformers config of a public shape; ``layers`` keeps only that many decoder layers."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    d = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= d["num_hidden_layers"]:
            raise ConfigError(f"--layers must be in [1, {d['num_hidden_layers']}] for {shape}, got {layers}")
        d["num_hidden_layers"] = layers
        if "max_window_layers" in d:
            d["max_window_layers"] = layers
    return AutoConfig.for_model(**d)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ``tokenizers``' ByteLevel pre-tokenizer
    applies; used so that a byte's token id is the byte's value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Any:
    """Byte-level tokenizer: id = UTF-8 byte (0-255), ``<|endoftext|>`` = 256 (bos, eos and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def plant_outliers(model: Any, n: int, seed: int) -> dict[str, Any]:
    """Multiply ``n`` (1 to the hidden size) channels of every input norm's weight by factors in :data:`OUTLIER_RANGE`
    (the same channels and factors in every layer); returns what was planted."""
    import torch

    from .archs import ARCHS, GROUP_KINDS, arch_name, decoder_layers

    arch = ARCHS[arch_name(model)]  # the row's names, also for OPT-350m, whose post-LN the table refuses
    norms = [g.producer for g in arch.groups if GROUP_KINDS[g.kind].producer == "norm"]
    gen = torch.Generator().manual_seed(seed + 1)
    channels = torch.randperm(model.config.hidden_size, generator=gen)[:n].sort().values
    lo, hi = OUTLIER_RANGE
    factors = lo + (hi - lo) * torch.rand(n, generator=gen)
    with torch.no_grad():
        for layer in decoder_layers(model, arch):
            for name in norms:
                w = layer.get_submodule(name).weight
                w[channels] = (w[channels].float() * factors).to(w.dtype)
    return {"channels": channels.tolist(), "factors": [round(f, 4) for f in factors.tolist()], "norms": norms}


def write_checkpoint(shape: str, out: str | os.PathLike, *, dtype: str = "float16", seed: int = 0,
                     outliers: int = 0, layers: int | None = None, max_shard_size: str = "2GB",
                     force: bool = False) -> Path:
    """Write a random-weight checkpoint of ``shape`` to ``out`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    config = shape_config(shape, layers)
    tokenizer = byte_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"{shape}: vocab_size {config.vocab_size} < {len(tokenizer)} byte-tokenizer ids")
    if not 0 <= outliers <= config.hidden_size:
        raise ConfigError(f"--outliers must be in [0, {config.hidden_size}] (the hidden size), got {outliers}")
    out = Path(out)
    if out.exists() and not force:
        raise OutputDirError(f"{out} already exists; pass --force to replace it, or another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the model directory's mode
    except OSError as exc:
        raise OutputDirError(f"cannot write beside {out}: {exc}; pass another --out") from None
    try:
        torch.manual_seed(seed)
        log.info("initialising %s (%d layers) in %s", shape, config.num_hidden_layers, dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        planted = plant_outliers(model, outliers, seed) if outliers else None
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        meta = {"shape": shape, "layers": config.num_hidden_layers, "public_layers": SHAPES[shape]["num_hidden_layers"],
                "dtype": dtype, "seed": seed, "parameters": model.num_parameters(), "outliers": planted,
                "tokenizer": f"byte-level: id = UTF-8 byte, {EOS} = 256", "written_by": "sq2trt.checkpoints"}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():  # safetensors shards come out 0600: readable by their writer only
            f.chmod(0o666 & ~umask)
        if out.exists():  # --force: the old directory goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        raise OutputDirError(f"writing {out} failed: {exc}; {out} was left as it was. Free space or pass another "
                             "--out (a 7B shape needs ~14 GB in float16)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sq2trt.checkpoints",
                                description="Write a random-weight checkpoint of a public model shape (offline).")
    p.add_argument("--shape", required=True, choices=list(SHAPES))
    p.add_argument("--out", required=True, help="model directory to write (replaced only with --force)")
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outliers", type=int, default=0, metavar="N",
                   help="plant N persistent outlier channels (norm weights x50-100) in every layer")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers (tests)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_checkpoint(args.shape, args.out, dtype=args.dtype, seed=args.seed, outliers=args.outliers,
                                layers=args.layers, max_shard_size=args.max_shard_size, force=args.force)
    except Sq2trtError as exc:
        print(f"random checkpoint: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
