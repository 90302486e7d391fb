"""TensorRT ``.plan`` engines through Polygraphy's loaders, and the checks around them.

Build (``sq2trt build --backend trt``)::

    NetworkFromOnnxPath(<level>.fp16.onnx, strongly_typed=True)   # TensorRT 10 (11: always)
      -> CreateConfig(profiles=[batch x sequence min/opt/max], load_timing_cache=...,
                      memory_pool_limits={WORKSPACE: ...}, builder_optimization_level=...)
      -> EngineFromNetwork(..., save_timing_cache=...) -> SaveEngine(<level>.plan)

plus ``<level>.plan.json`` beside it: TensorRT version, GPU name and compute capability,
profiles, level, alpha, calibration summary, sha256 of the ONNX it was built from. Loading a
plan (:func:`trt_runner`) checks that metadata against the running TensorRT and GPU first and
raises :class:`PlanMismatchError` instead of letting deserialization fail obscurely.

Everything that does not need TensorRT (the config, profiles, build-mode choice, metadata and
the compatibility check) is plain Python and tested on CPU machines. The code that calls
TensorRT is written against Polygraphy 0.53's and TensorRT 10/11's documented APIs and has not
been run here (no TensorRT or NVIDIA GPU on the development machines): see docs/tensorrt.md.
Nothing here imports ``tensorrt`` at module import.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ._lazy import trt
from .errors import BackendUnavailableError, ConfigError, Sq2trtError

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input_ids", "logits"  # same names as sq2trt.export (not imported: it pulls in torch)
STRONGLY_TYPED, WEAKLY_TYPED = "strongly-typed", "weakly-typed"
METADATA_VERSION = 1


class PlanMismatchError(Sq2trtError):
    """A ``.plan`` was built by another TensorRT version or for another GPU than the one here."""

    exit_code = 3


class EngineBuildError(Sq2trtError):
    """TensorRT (through Polygraphy) failed to parse the ONNX or to build the engine."""


class LintFailedError(Sq2trtError):
    """The ONNX breaks TensorRT's Q/DQ rules (``sq2trt lint``); building it would fail or run
    unquantized."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrtConfig:
    """TensorRT build options (recipe section ``trt``, CLI flags ``--trt-<field>``).

    One optimization profile for ``input_ids`` of shape (batch, sequence): TensorRT accepts any
    shape between min and max and tunes its kernels for opt.
    """

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_seq: int = 1
    opt_seq: int = 512
    max_seq: int = 2048
    workspace_mib: int = 0  # builder workspace limit; 0: TensorRT's default (the GPU's memory)
    builder_optimization_level: int = 3  # 0 (fast build) .. 5 (slowest build, most tactics); TensorRT's default 3
    timing_cache: str = ""  # reusable tactic timing cache; "": <out>/<model>/trt-<gpu>-<trt version>.cache

    def __post_init__(self) -> None:
        for what, lo, opt, hi in (("batch", self.min_batch, self.opt_batch, self.max_batch),
                                  ("seq", self.min_seq, self.opt_seq, self.max_seq)):
            if not (1 <= int(lo) <= int(opt) <= int(hi)):
                raise ConfigError(f"TensorRT profile needs 1 <= min_{what} <= opt_{what} <= max_{what}, got "
                                  f"{lo} / {opt} / {hi}")
        if not 0 <= int(self.builder_optimization_level) <= 5:
            raise ConfigError(f"builder_optimization_level must be in 0..5, got {self.builder_optimization_level}")
        if int(self.workspace_mib) < 0:
            raise ConfigError(f"workspace_mib must be >= 0 (0: TensorRT's default), got {self.workspace_mib}")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """``{input name: (min shape, opt shape, max shape)}`` of the one optimization profile."""
        return {INPUT: ((self.min_batch, self.min_seq), (self.opt_batch, self.opt_seq),
                        (self.max_batch, self.max_seq))}

    def uncovered(self, batch: int, seq: int) -> str | None:
        """Why a (batch, seq) input falls outside the profile, or None when it fits."""
        if self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq:
            return None
        return (f"input shape ({batch}, {seq}) is outside the TensorRT profile (batch {self.min_batch}..{self.max_batch}, "
                f"sequence {self.min_seq}..{self.max_seq}); rebuild with --trt-max-seq / --trt-max-batch covering it")


def build_mode(trt_version: str, has_strongly_typed_flag: bool) -> str:
    """How to build with this TensorRT: ``strongly-typed`` (the FP16 ONNX carries every type:
    TensorRT 11 always, TensorRT 10 through NetworkDefinitionCreationFlag.STRONGLY_TYPED) or
    ``weakly-typed`` (older: the FP32 Q/DQ ONNX with the FP16 and INT8 builder flags)."""
    try:
        major = int(str(trt_version).split(".")[0])
    except ValueError:
        raise ConfigError(f"cannot read a TensorRT version from {trt_version!r}") from None
    return STRONGLY_TYPED if major >= 11 or has_strongly_typed_flag else WEAKLY_TYPED


# --------------------------------------------------------------------------- metadata
def metadata_path(plan: str | os.PathLike) -> Path:
    p = Path(plan)
    return p.with_name(p.name + ".json")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of an ONNX file and, when it has one, of its external-data file."""
    p = Path(path)
    out = {"path": str(p), "sha256": file_sha256(p)}
    data = p.with_name(p.name + ".data")
    if data.exists():
        out["data_sha256"] = file_sha256(data)
    return out


def plan_metadata(*, env: Mapping[str, Any], config: TrtConfig, mode: str, onnx: Mapping[str, str],
                  level: str | None = None, alpha: float | None = None,
                  calibration: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``<name>.plan.json`` record (pure: the caller supplies the environment)."""
    return {"sq2trt_plan_metadata": METADATA_VERSION, "tensorrt": env.get("tensorrt"),
            "gpu": env.get("gpu"), "compute_capability": env.get("compute_capability"),
            "build_mode": mode, "profiles": [{k: [list(s) for s in v] for k, v in config.profile_shapes().items()}],
            "trt_config": asdict(config), "level": level, "alpha": alpha,
            "calibration": dict(calibration or {}), "onnx": dict(onnx), **extra}


def check_plan_compatible(meta: Mapping[str, Any], env: Mapping[str, Any]) -> list[str]:
    """Raise :class:`PlanMismatchError` when a plan described by ``meta`` cannot run in ``env``
    (``{"tensorrt": version, "gpu": name, "compute_capability": "8.9"}``; GPU keys may be None
    when unknown). Returns warnings for what could not be checked or differs harmlessly.

    TensorRT serializes engines for one TensorRT version and one GPU architecture: a plan from
    another version or compute capability fails to deserialize (or is refused), so it has to be
    rebuilt on this machine.
    """
    if not isinstance(meta, Mapping) or "tensorrt" not in meta:
        raise PlanMismatchError("plan metadata is not sq2trt's (no 'tensorrt' key); rebuild the plan with "
                                "sq2trt build --backend trt")
    rebuild = "rebuild it here: sq2trt build --backend trt (or make engine BACKEND=trt)"
    warnings: list[str] = []
    built, here = str(meta.get("tensorrt")), str(env.get("tensorrt"))
    if built != here:
        raise PlanMismatchError(f"the plan was built with TensorRT {built}, this machine has TensorRT {here}; "
                                f"TensorRT plans only load in the version that built them: {rebuild}")
    cc_built, cc_here = meta.get("compute_capability"), env.get("compute_capability")
    gpu_built, gpu_here = meta.get("gpu"), env.get("gpu")
    if cc_built is None or cc_here is None:
        warnings.append(f"could not compare GPUs (plan built for {gpu_built or 'unknown'}, compute capability "
                        f"{cc_built or 'unknown'}; here {gpu_here or 'unknown'}, {cc_here or 'unknown'})")
    elif str(cc_built) != str(cc_here):
        raise PlanMismatchError(f"the plan was built for {gpu_built} (compute capability {cc_built}), this GPU is "
                                f"{gpu_here} (compute capability {cc_here}); plans are specific to the GPU "
                                f"architecture: {rebuild}")
    elif gpu_built != gpu_here:
        warnings.append(f"plan built on {gpu_built}, running on {gpu_here} (same compute capability {cc_here}): "
                        "it loads, but its kernels were tuned for the other GPU; rebuild for best speed")
    return warnings


def read_plan_metadata(plan: str | os.PathLike) -> dict[str, Any] | None:
    p = metadata_path(plan)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanMismatchError(f"{p} is not readable JSON ({exc}); rebuild the plan") from None


# --------------------------------------------------------------------------- environment (needs a GPU)
def gpu_info() -> dict[str, str | None]:
    """Name and compute capability of CUDA device 0 (through PyTorch, else nvidia-smi); None when
    neither can tell."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup must not hide the nvidia-smi answer
        log.debug("torch.cuda could not describe the GPU: %s", exc)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.strip().splitlines()
            if out:
                name, cc = (x.strip() for x in out[0].rsplit(",", 1))
                return {"gpu": name, "compute_capability": cc}
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.debug("nvidia-smi could not describe the GPU: %s", exc)
    return {"gpu": None, "compute_capability": None}


def runtime_environment() -> dict[str, Any]:
    """TensorRT version and GPU here (raises BackendUnavailableError without TensorRT)."""
    return {"tensorrt": str(trt.__version__), **gpu_info()}


def _require_polygraphy_strongly_typed() -> None:
    import inspect

    from polygraphy.backend.trt import NetworkFromOnnxPath

    if "strongly_typed" not in inspect.signature(NetworkFromOnnxPath.__init__).parameters:
        import polygraphy

        raise BackendUnavailableError(f"Polygraphy {polygraphy.__version__} cannot build strongly typed networks "
                                      "(NetworkFromOnnxPath has no strongly_typed); pip install -U polygraphy")


# --------------------------------------------------------------------------- build
def default_timing_cache(directory: str | os.PathLike, env: Mapping[str, Any]) -> Path:
    """Timing caches are valid for one GPU and TensorRT version, so both go into the name."""
    gpu = str(env.get("gpu") or "gpu").replace(" ", "_").replace("/", "_")
    return Path(directory) / f"trt-{gpu}-{env.get('tensorrt')}.cache"


def build_plan(fp16_onnx: str | os.PathLike, fp32_onnx: str | os.PathLike, plan: str | os.PathLike,
               config: TrtConfig, *, timing_cache: str | os.PathLike, level: str | None = None,
               alpha: float | None = None, calibration: Mapping[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    """Build ``plan`` (atomically) and ``plan.json``; returns the metadata.

    Strongly typed (TensorRT >= 10): parses ``fp16_onnx``, which carries its own FP16/INT8 types.
    Weakly typed (older TensorRT): parses ``fp32_onnx`` with the FP16 and INT8 builder flags.
    """
    trt._load()  # BackendUnavailableError with what to install
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine
    from polygraphy.exception import PolygraphyException

    from .artifacts import atomic_path, write_json

    env = runtime_environment()
    has_flag = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    mode = build_mode(env["tensorrt"], has_flag)
    if mode == STRONGLY_TYPED:
        _require_polygraphy_strongly_typed()
        source = Path(fp16_onnx)
        # TensorRT 11 is strongly typed whatever the flag says; pass it only where it exists.
        network = NetworkFromOnnxPath(str(source), strongly_typed=has_flag)
        precision: dict[str, bool] = {}
    else:
        source = Path(fp32_onnx)
        network = NetworkFromOnnxPath(str(source))
        precision = {"fp16": True, "int8": True}
    profile = Profile()
    for name, (lo, opt, hi) in config.profile_shapes().items():
        profile.add(name, min=lo, opt=opt, max=hi)
    pools = {trt.MemoryPoolType.WORKSPACE: int(config.workspace_mib) << 20} if config.workspace_mib else None
    cache = Path(timing_cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    builder_config = CreateConfig(profiles=[profile], load_timing_cache=str(cache) if cache.exists() else None,
                                  memory_pool_limits=pools,
                                  builder_optimization_level=int(config.builder_optimization_level), **precision)
    log.info("building %s from %s (%s, TensorRT %s, %s)", Path(plan).name, source.name, mode, env["tensorrt"],
             env.get("gpu"))
    io: list[dict[str, Any]] = []
    try:
        with atomic_path(plan) as tmp:
            engine = SaveEngine(EngineFromNetwork(network, config=builder_config, save_timing_cache=str(cache)),
                                path=str(tmp))()
            io = _engine_io(engine)
    except PolygraphyException as exc:
        raise EngineBuildError(f"TensorRT could not build {source}: {exc}. Run `sq2trt lint {source}` and see "
                               "docs/tensorrt.md (polygraphy run ... --trt) to reproduce") from None
    meta = plan_metadata(env=env, config=config, mode=mode, onnx=onnx_digest(source), level=level, alpha=alpha,
                         calibration=calibration, source_qdq_onnx=onnx_digest(fp32_onnx), timing_cache=str(cache),
                         io=io, polygraphy=_polygraphy_version(), **extra)
    write_json(metadata_path(plan), meta)
    return meta


def _polygraphy_version() -> str:
    import polygraphy

    return polygraphy.__version__


def _engine_io(engine) -> list[dict[str, Any]]:
    """Names, types and shapes of the engine's I/O tensors (TensorRT >= 10 API; best effort)."""
    try:
        return [{"name": (n := engine.get_tensor_name(i)), "mode": str(engine.get_tensor_mode(n)),
                 "dtype": str(engine.get_tensor_dtype(n)), "shape": list(engine.get_tensor_shape(n))}
                for i in range(engine.num_io_tensors)]
    except AttributeError:
        return []


# --------------------------------------------------------------------------- run
def check_plan(path: str | os.PathLike) -> None:
    """The metadata check before loading ``path``: raises PlanMismatchError, logs warnings."""
    meta = read_plan_metadata(path)
    if meta is None:
        log.warning("%s has no %s; TensorRT itself will refuse it if it was built elsewhere", path,
                    metadata_path(path).name)
        return
    for w in check_plan_compatible(meta, runtime_environment()):
        log.warning("%s: %s", Path(path).name, w)


def trt_runner(path: str | os.PathLike, *, name: str | None = None):
    """A Polygraphy ``TrtRunner`` for a ``.plan``, after checking it was built for this TensorRT
    and GPU. Same interface as the ONNX Runtime runner (``compare.runner_for``)."""
    path = Path(path)
    trt._load()
    if not path.is_file():
        from .errors import OnnxInputError

        raise OnnxInputError(f"TensorRT plan not found: {path}; build it with sq2trt build --backend trt")
    check_plan(path)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=name or path.name)


class TrtLogits:
    """``input_ids (B, T) int64 -> logits (B, T, V)`` through a ``.plan``, for
    :func:`sq2trt.evaluate.perplexity`. Activates its runner on first use; ``close()`` frees it."""

    def __init__(self, path: str | os.PathLike):
        self.runner = trt_runner(path, name="trt-logits")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if not self.runner.is_active:
            self.runner.activate()
        return np.asarray(self.runner.infer({INPUT: np.ascontiguousarray(ids, dtype=np.int64)})[OUTPUT])

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()


def trt_logits_fn(path: str | os.PathLike) -> TrtLogits:
    return TrtLogits(path)
