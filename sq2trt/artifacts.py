"""Artifacts: written to a temporary name then renamed, each stamped with its config hash.

``build/<model>/<level>/<file>`` plus its stamp ``<file>.meta.json``. A rerun reuses an artifact only
when its stamp exists and records the same hash. The protocol, the one way a step makes an artifact::

    with producing(path) as tmp:   # 1. the stamp is removed first, then tmp is written
        write(tmp)                 # 2. tmp is renamed to path only if the block succeeds
    stamp(path, config_hash)       # 3. the stamp is written last

so whatever the moment a run dies, a stamp never vouches for a file it was not written for: an
interrupted step leaves the old artifact unstamped (rebuilt on rerun) or stray ``.tmp-*`` files,
never a half-written artifact under its real name. Writers of several files (``export.save_onnx``:
``.onnx`` + ``.data``) follow the same order themselves. Named :func:`crash_point` s let tests kill a
run at each moment ("artifact:replaced:<file name>" sits between steps 2 and 3).

Config hashes are built from content, never from paths or times: :func:`file_digest` (model
weights, calibration and evaluation text), :func:`source_fingerprint` (sq2trt's own code) and
:func:`tool_versions` (the libraries whose behaviour the artifact depends on).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputDirError

log = logging.getLogger(__name__)


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".tmp-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputDirError(f"output directory {p} is not writable ({exc.strerror or exc}); pass a "
                             "writable --out (make engine OUT=...)") from None
    return p


@contextmanager
def producing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Remove ``path``'s stamp, then yield a temporary path beside ``path`` and rename it to ``path``
    only if the block succeeds; the caller :func:`stamp` s it afterwards (see the module docstring)."""
    path = Path(path)
    ensure_dir(path.parent)
    meta_path(path).unlink(missing_ok=True)  # no stamp may vouch for a file being replaced
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_p, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_p
        os.replace(tmp_p, path)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


atomic_path = producing  # the former name, still used by engine.py, trt.py, plots.py


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with producing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def meta_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def stamp(path: str | os.PathLike, config_hash: str, **info: Any) -> None:
    """Record that ``path`` was made from ``config_hash``: the last thing a step does, once the
    artifact is in place (see the module docstring)."""
    from . import __version__

    path = Path(path)
    crash_point(f"artifact:replaced:{path.name}")
    if not path.exists():
        raise FileNotFoundError(f"cannot stamp {path}: the step did not write it")
    write_json(meta_path(path), {"config_hash": config_hash, "sq2trt": __version__,
                                 "source": source_fingerprint(),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})


def fresh(path: str | os.PathLike, config_hash: str) -> bool:
    p, m = Path(path), meta_path(path)
    if not (p.exists() and m.exists()):
        return False
    try:
        return read_json(m).get("config_hash") == config_hash
    except (OSError, ValueError):
        return False


def share(src: str | os.PathLike, dst: str | os.PathLike, config_hash: str) -> bool:
    """Put the artifact ``src`` (an ``.onnx`` with its ``.data``, or any single file) at ``dst`` as a
    hard link, when ``src`` is fresh for ``config_hash``: an identical artifact another level made
    (the same reference ONNX for every level without smoothing) costs no time and no disk. Files are
    linked to temporary names and renamed into place the ``.data`` first, then stamped, the protocol of
    :func:`producing`; a writer replaces a file by renaming a new one over it, which breaks the link,
    so no later write to one level's copy changes another's. Where the filesystem has no hard links,
    the files are copied. False (nothing changed) when ``src`` is not fresh."""
    import shutil

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve() or not fresh(src, config_hash):
        return False
    ensure_dir(dst.parent)
    meta_path(dst).unlink(missing_ok=True)
    info = {k: v for k, v in read_meta(src).items() if k not in ("config_hash", "sq2trt", "source", "created")}

    def link(a: Path, b: Path) -> None:
        tmp = b.with_name(f".tmp-{b.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(a, tmp)
        except OSError:
            shutil.copy2(a, tmp)
        os.replace(tmp, b)

    data_src, data_dst = src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data")
    if data_src.exists():
        link(data_src, data_dst)
    else:
        data_dst.unlink(missing_ok=True)  # dst's old .data, which the new .onnx does not use
    link(src, dst)
    if not fresh(src, config_hash):  # src replaced meanwhile: what was linked may be a mix; not vouched for
        return False
    stamp(dst, config_hash, **{**info, "shared_from": str(src.parent.name)})
    log.info("%s: the same artifact as %s (config hash %s), linked", dst, src, config_hash)
    return True


def crash_point(name: str) -> None:
    """Named point where a test can make the process die (``SQ2TRT_CRASH_AT=<name>``): ``raise``
    unless ``SQ2TRT_CRASH_MODE=kill``, which SIGKILLs the process (no cleanup runs, as in a real kill)."""
    if os.environ.get("SQ2TRT_CRASH_AT") != name:
        return
    if os.environ.get("SQ2TRT_CRASH_MODE") == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedCrash(name)


class InjectedCrash(RuntimeError):
    """Raised at a :func:`crash_point` named by ``SQ2TRT_CRASH_AT`` (tests only)."""


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return read_json(meta_path(path))


# --------------------------------------------------------------------------- content identities
_DIGESTS: dict[tuple, str] = {}
_CACHE_MIN = 64 << 20  # smaller files are re-hashed every time (1 MB of text: about a millisecond)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex).

    Model weights are hashed in full rather than sampled (header + size + a few blocks): a sampled
    hash misses edits that keep the header and the size, e.g. a fine-tuned or partly merged
    checkpoint saved over the same file, which is exactly when a stale artifact would be wrong. A
    full hash of a 13 GB checkpoint costs one read at disk speed, once: digests of files of 64 MiB
    or more are kept (in this process and under ``$SQ2TRT_CACHE/digests``, default
    ``~/.cache/sq2trt``) keyed by (path, device, inode, size, mtime_ns), so later runs pay one
    ``stat``; any ordinary write changes the key. Smaller files (calibration and evaluation text,
    configs, tokenizers) are hashed afresh on every call, so even an edit that keeps size and mtime
    is seen."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cache = None
    if st.st_size >= _CACHE_MIN:
        if key in _DIGESTS:
            return _DIGESTS[key]
        root = Path(os.environ.get("SQ2TRT_CACHE", Path.home() / ".cache" / "sq2trt")) / "digests"
        cache = root / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        try:
            _DIGESTS[key] = cache.read_text().strip()
            return _DIGESTS[key]
        except OSError:
            pass
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        _DIGESTS[key] = digest
        try:
            atomic_write_text(cache, digest)
        except Exception as exc:  # noqa: BLE001 - a cache we cannot write only costs time
            log.debug("digest cache %s not written: %s", cache, exc)
    return digest


def source_id(spec: str) -> str:
    """Identity of a text source (calibration / evaluation data) by content: a file by the sha256
    of its bytes (the same text at another path is the same source; an edited file is not), an
    ``hf:`` dataset by its spec string (it is named, not downloaded, when hashing)."""
    p = Path(spec) if spec and not spec.startswith("hf:") else None
    return f"sha256:{file_digest(p)}" if p is not None and p.is_file() else spec


@functools.lru_cache(maxsize=None)
def source_fingerprint() -> str:
    """Hash of sq2trt's own ``.py`` files: a code change invalidates every artifact made before it
    (the version number alone does not change with each edit)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def tool_versions() -> dict[str, str]:
    """Versions of the libraries artifacts depend on: torch and transformers (calibration,
    smoothing, export), onnx (export, Q/DQ), onnxruntime (the engine and all measured through it)."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
