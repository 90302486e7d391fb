"""Artifacts: written to a temporary name then renamed, each stamped with its config hash.

``build/<model>/<level>/<file>`` plus ``<file>.meta.json``. A rerun reuses an artifact only when
its meta file exists and records the same hash; an interrupted step leaves at most a stray
temporary file (``.tmp-*``), never a half-written artifact under its real name.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputDirError


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
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    ensure_dir(path.parent)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def meta_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def stamp(path: str | os.PathLike, config_hash: str, **info: Any) -> None:
    """Record that ``path`` was made from ``config_hash`` (written after the artifact itself)."""
    from . import __version__

    write_json(meta_path(path), {"config_hash": config_hash, "sq2trt": __version__,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})


def fresh(path: str | os.PathLike, config_hash: str) -> bool:
    p, m = Path(path), meta_path(path)
    if not (p.exists() and m.exists()):
        return False
    try:
        return read_json(m).get("config_hash") == config_hash
    except (OSError, ValueError):
        return False


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
