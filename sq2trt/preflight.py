"""Preflight: check a whole request before any weight loads.

Why: every problem below used to surface only after the model had loaded (20-45 s on the default
model, minutes on a big one), or after a whole earlier level had run (an architecture without a
table row, asked for ``--levels fp,O3``, failed after the 11-minute fp level), or after ~30 s of
download retries (a Hugging Face id with no network). The checks here need no weights: the
model's config (``sq2trt.budget.model_config``: ``config.json``, GGUF metadata, ``random:``), the
file system, and at most one short request to the hub. Every problem found is reported at once,
each as the typed error the later step would have raised, with what to do.

The CLI runs :func:`check` for every command that loads a model, right after parsing, before the
resource check (``sq2trt.budget``) and before anything loads. The decisions reuse the tables and
readers the pipeline itself uses (``archs.get_arch`` and ``Arch.export_blocker``, ``config.get_level``
and ``config.level_support``, ``tasks.resolve_task``, ``gate.load_thresholds``); only two one-line
rules of the steps are repeated (diagnose needs a quantizing level, ``--quantize-bmm`` a static one).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import Config, get_level, level_support
from .errors import (CalibrationDataError, ConfigError, LevelNotSupportedError, ModelNotFoundError, OnnxInputError,
                     OutputDirError, Sq2trtError, UnsupportedArchitectureError)

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"

# What each command does with the model (see sq2trt.cli), which decides what it needs.
EXPORTS = frozenset({"export", "build", "compare", "evaluate", "diagnose", "report", "run"})  # through ONNX
READS_TABLE = frozenset({"calibrate", "smooth", "sweep"})  # hook every quantized Linear, at any level
NO_OUTPUT = frozenset({"plan-resources"})  # reads the config only, writes nothing


def check(args: argparse.Namespace, *, resolve: Callable[[argparse.Namespace], Config],
          flags_only: Callable[[argparse.Namespace], Config]) -> tuple[Config, list[str]]:
    """The resolved config and the levels the command will run, or one typed error listing every
    problem with the request (see the module docstring).

    ``resolve`` is the CLI's full resolution (it may read the model's config to pick a recipe);
    ``flags_only`` builds the config from flags and an explicit ``--recipe`` alone, so the data and
    output checks still run when the model itself is the problem."""
    problems: list[Sq2trtError] = []
    command = args.command
    raw_levels = list(getattr(args, "levels", None) or [])
    flag_level = getattr(args, "quant.level", None)
    unknown = _unknown_levels(raw_levels + ([flag_level] if flag_level else []), problems)
    # the rest is checked as if an unknown --level had not been given, so it is reported once
    args = argparse.Namespace(**{**vars(args), "quant.level": None}) if flag_level in unknown else args

    spec = args.model or ""
    source_problem, cached_dir = hub_source(spec)
    config: Config | None = None
    if source_problem is not None:
        problems.append(source_problem)
    else:
        config = _attempt(problems, resolve, args)
    if config is None:
        config = _attempt(problems, flags_only, args)
    levels = [lv for lv in dict.fromkeys(raw_levels or ([config.quant.level] if config else []))
              if lv not in unknown]

    direct_compare = command == "compare" and bool(args.reference and args.engine)
    if source_problem is None and not any(isinstance(p, ModelNotFoundError) for p in problems):
        model_cfg = _attempt(problems, _model_config, str(cached_dir) if cached_dir else spec,
                             bool(args.trust_remote_code))
        if model_cfg is not None and config is not None and not direct_compare:
            problems += level_problems(model_cfg, levels, command=command, quant=config.quant,
                                       backend=getattr(args, "backend", "ort"))
    if config is not None and command not in NO_OUTPUT:
        problems += data_problems(config)
    if command == "evaluate" and args.tasks:
        problems += task_problems(args.tasks, args.task_data)
    if command == "report" and args.check:
        from .gate import load_thresholds

        _attempt(problems, load_thresholds, args.check)
    if direct_compare:
        problems += [OnnxInputError(f"ONNX file not found: {p} (--{flag}); pass an existing .onnx, .ort.onnx or "
                                    ".plan file") for flag, p in (("reference", args.reference), ("engine", args.engine))
                     if not Path(p).is_file()]
    elif command not in NO_OUTPUT:
        problems += out_dir_problems(args.out, spec, levels)
    raise_problems(problems)  # a config that could not be built left its error there
    return config, levels  # type: ignore[return-value]


def _attempt(problems: list[Sq2trtError], fn: Callable[..., Any], *a: Any) -> Any:
    """``fn(*a)``, or None with its typed error appended to ``problems``."""
    try:
        return fn(*a)
    except Sq2trtError as exc:
        problems.append(exc)
        return None


def _model_config(spec: str, trust_remote_code: bool) -> Any:
    from .budget import model_config

    return model_config(spec, trust_remote_code)


def _unknown_levels(names: Sequence[str], problems: list[Sq2trtError]) -> set[str]:
    """The names that are not levels (config.LEVELS), each with get_level's error appended to ``problems``."""
    unknown = set()
    for name in dict.fromkeys(names):
        try:
            get_level(name)
        except ConfigError as exc:
            problems.append(exc)
            unknown.add(name)
    return unknown


# --------------------------------------------------------------------------- the model's source
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (huggingface_hub reads it once,
    at import): HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME or ~/.cache, /huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def probe(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers an HTTP HEAD within ``timeout`` seconds (any status: the server is
    there), else why not. urllib honours HTTPS_PROXY / NO_PROXY as huggingface_hub does."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def hub_source(spec: str) -> tuple[ModelNotFoundError | None, Path | None]:
    """For a model given as a Hugging Face id (not ``random:``, not a ``.gguf`` file, not an existing
    path): (a problem, or None; the cached snapshot directory holding its config.json, or None).

    A cached model needs no network. Otherwise HF_HUB_OFFLINE=1 fails at once, and the hub endpoint
    (HF_ENDPOINT, default huggingface.co) gets one HEAD request of at most HUB_PROBE_TIMEOUT_S: without
    it, transformers retries for ~30 s before failing. Local specs are left to the config read, which
    has its own messages (sq2trt.budget.model_config)."""
    if not _maybe_hub_id(spec):
        return None, None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return ModelNotFoundError(
            f"model {spec!r} not found: no such file or directory, and it is not a Hugging Face model id "
            "(org/name) either. Pass an existing model directory (with config.json), a .gguf file, or a hub "
            "id."), None
    cache = hf_cache_dir()
    hit = try_to_load_from_cache(spec, "config.json", cache_dir=cache)
    if isinstance(hit, str):
        log.debug("%s: config.json from the Hugging Face cache, %s", spec, hit)
        return None, Path(hit).parent
    how = (f"Provide it locally: on a machine with internet run `hf download {spec} --local-dir DIR` "
           "(huggingface-cli download in older huggingface_hub), copy DIR here and pass --model DIR "
           "(make engine MODEL=DIR); or point HF_HOME at a Hugging Face cache that holds it; or use a GGUF "
           "file (make fetch-model).")
    if hub_offline():
        return ModelNotFoundError(
            f"model {spec!r} is not a local path and not in the Hugging Face cache ({cache}), and "
            f"HF_HUB_OFFLINE=1 is set, so it cannot be downloaded. {how}"), None
    endpoint = hub_endpoint()
    why = probe(endpoint)
    if why is not None:
        return ModelNotFoundError(
            f"model {spec!r} is not a local path and not in the Hugging Face cache ({cache}), and the hub "
            f"at {endpoint} cannot be reached ({why}; {HUB_PROBE_TIMEOUT_S:.0f} s timeout). {how}"), None
    return None, None


def _maybe_hub_id(spec: str) -> bool:
    """Not empty, not ``random:``, not a ``.gguf`` file and not an existing path: a Hugging Face id, if anything."""
    return bool(spec) and not spec.startswith("random:") and not spec.endswith(".gguf") and not Path(spec).exists()


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@functools.lru_cache(maxsize=None)
def cache_only(spec: str) -> bool:
    """Whether ``spec`` (a Hugging Face id) must be loaded from the local cache alone: its config.json
    and weights (or their index) are cached and the hub is not reachable (HF_HUB_OFFLINE set, or one HEAD request of at most
    HUB_PROBE_TIMEOUT_S fails). Loaders then pass ``local_files_only=True``: without it,
    transformers asks the hub about every file of a cached model and waits out each request's
    timeout before it falls back to the cache. Probed once per process and id; False for local
    paths, GGUF files and ``random:`` models."""
    if not _maybe_hub_id(spec):
        return False
    from huggingface_hub import try_to_load_from_cache

    def hit(name: str) -> bool:
        return isinstance(try_to_load_from_cache(spec, name, cache_dir=hf_cache_dir()), str)

    try:  # the config and the weights (a cache that holds config.json alone is left to the normal load)
        if not (hit("config.json") and any(hit(w) for w in WEIGHT_FILES)):
            return False
    except ValueError:  # not a valid repo id: the loaders' own errors say so
        return False
    why = "HF_HUB_OFFLINE is set" if hub_offline() else probe(hub_endpoint())
    if why is None:
        return False
    log.info("%s: the hub is not reachable (%s); loading it from the cache (%s) only", spec, why, hf_cache_dir())
    return True


def local_only_kwargs(spec: str) -> dict[str, Any]:
    """``{"local_files_only": True}`` for :func:`cache_only` models, else ``{}`` (from_pretrained kwargs)."""
    return {"local_files_only": True} if cache_only(spec) else {}


# --------------------------------------------------------------------------- architecture x level x command
def level_problems(model_cfg: Any, levels: Sequence[str], *, command: str, quant: Any,
                   backend: str = "ort") -> list[Sq2trtError]:
    """What the pipeline would refuse for this architecture, levels and command, found from the
    config alone: an architecture without a row in ``archs.ARCHS`` (refused by every level that
    quantizes or smooths, and by the commands that hook every quantized Linear; floating point runs
    without one), an architecture that cannot be exported (``Arch.export_blocker``), a level the
    backend cannot run (``config.level_support``), and option/level combinations the steps reject."""
    from .archs import ARCHS, arch_name, get_arch

    out: list[Sq2trtError] = []
    schemes = {lv: get_level(lv) for lv in levels}
    need_row = [lv for lv, s in schemes.items() if command in READS_TABLE or s.quantizes or s.smooth]
    name = arch_name(model_cfg)
    try:
        get_arch(model_cfg)
    except UnsupportedArchitectureError as exc:
        if need_row:
            free = [lv for lv in schemes if lv not in need_row]
            out.append(UnsupportedArchitectureError(
                f"{exc} Level(s) {', '.join(need_row)} need that row"
                + (f"; {', '.join(free)} can run without it (drop the others from --levels)." if free else ".")))
    row = ARCHS.get(name)
    if command in EXPORTS and row is not None and row.export_blocker:
        out.append(UnsupportedArchitectureError(
            f"{name} cannot be exported to ONNX: {row.export_blocker}. `sq2trt calibrate`, `smooth` and `sweep` "
            "(PyTorch fake quantization) work for it; evaluate its levels in PyTorch, not through an engine."))
    for lv, scheme in schemes.items():
        if command == "build":
            why = level_support(lv, backend)
            if why:
                out.append(LevelNotSupportedError(why))
        if command == "diagnose" and not scheme.quantizes:
            out.append(ConfigError(f"level {lv} quantizes nothing; diagnose a quantized level (--level O3 or W8A8)"))
        if command in EXPORTS and quant.quantize_bmm and scheme.quantizes and not scheme.act_static:
            out.append(ConfigError(f"--quantize-bmm needs a level with static activations (O3, W8A8), not {lv}"))
    return out


# --------------------------------------------------------------------------- text, tasks and files
def text_problem(source: str, what: str, flag: str, make_var: str) -> CalibrationDataError | None:
    """A text source (``--calib-data`` / ``--eval-data``) that is given but missing, not a file,
    unreadable or empty. ``hf:`` datasets are left to their loader (network).

    A source that is not given at all is left to the step that reads it (sq2trt.data.load_text says
    what to pass): whether a command reads it depends on the level and on artifacts already made,
    and a request that does not fit this machine, or lacks TensorRT, should say that first."""
    if not source or source.startswith("hf:"):
        return None
    path = Path(source)
    if not path.exists():
        return CalibrationDataError(f"{what} text file not found: {source} ({flag}); pass an existing .txt or "
                                    f".jsonl file (make engine: {make_var}=FILE or DATA=DIR)")
    if not path.is_file():
        return CalibrationDataError(f"{what} text {source} ({flag}) is not a file; pass a .txt or .jsonl file")
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError as exc:
        return CalibrationDataError(f"{what} text file {source} ({flag}) cannot be read ({exc.strerror or exc}); "
                                    "fix its permissions or pass another file")
    if not first:
        return CalibrationDataError(f"{what} text file {source} ({flag}) is empty; pass a file with text in it")
    return None


def data_problems(config: Config) -> list[CalibrationDataError]:
    """The calibration and evaluation text files the request names."""
    out = [text_problem(config.calib.data, "calibration", "--calib-data", "CALIB"),
           text_problem(config.eval.data, "evaluation", "--eval-data", "EVAL")]
    return [p for p in out if p is not None]


def task_problems(tasks: Sequence[str], data_dir: str | None) -> list[Sq2trtError]:
    """Each ``--tasks`` entry resolved and read as the evaluation will (sq2trt.tasks.resolve_task):
    built-in names need their file under ``--task-data``/$SQ2TRT_DATA, others are .jsonl files."""
    from .tasks import resolve_task

    out: list[Sq2trtError] = []
    for t in dict.fromkeys(tasks):
        _attempt(out, resolve_task, t, data_dir)
    return out


# --------------------------------------------------------------------------- output directory
def out_dir_problems(out: str | os.PathLike, model: str, levels: Sequence[str]) -> list[OutputDirError]:
    """``--out`` can be created and written: create what is missing, write and remove a temporary
    file there and in this model's and these levels' folders where they already exist, then remove
    the folders created here (the steps create them again when they write)."""
    root = Path(out)
    created: list[Path] = []
    p = root.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    problems: list[OutputDirError] = []
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            hint = f"{p} is not a directory" if p.exists() and not p.is_dir() else (exc.strerror or str(exc))
            return [OutputDirError(f"output directory {out} is not writable: it cannot be created ({hint}); pass "
                                   "a writable --out (make engine OUT=...)")]
        dirs = [root]
        if model and any(root.iterdir()):
            from .models import model_name

            dirs += [d for d in [root / model_name(model)] + [root / model_name(model) / lv for lv in levels]
                     if d.is_dir()]
        for d in dirs:
            try:
                fd, tmp = tempfile.mkstemp(prefix=".sq2trt-preflight-", dir=d)
                os.close(fd)
                os.unlink(tmp)
            except OSError as exc:
                problems.append(OutputDirError(f"output directory {d} is not writable ({exc.strerror or exc}); "
                                               "pass a writable --out (make engine OUT=...) or fix its permissions"))
    finally:
        for d in created:  # deepest first; only what this check made, and only while still empty
            try:
                d.rmdir()
            except OSError:
                break
    return problems


# --------------------------------------------------------------------------- reporting
def raise_problems(problems: Sequence[Sq2trtError]) -> None:
    """Raise nothing for no problem, the error itself for one, else one error of the first problem's
    type (the most basic: the model, then levels, data, output) listing them all, each once;
    ``.problems`` holds them."""
    texts = [str(p) for p in problems]
    uniq = [p for i, p in enumerate(problems)
            if texts[i] not in texts[:i] and not any(texts[i] in t and texts[i] != t for t in texts)]
    if not uniq:
        return
    if len(uniq) == 1:
        raise uniq[0]
    first = uniq[0]
    err = type(first)(f"{len(uniq)} problems with this request, found before loading the model:\n  - "
                      + "\n  - ".join(str(p) for p in uniq))
    err.problems = list(uniq)  # type: ignore[attr-defined]
    raise err
