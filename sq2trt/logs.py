"""Logging for the command line: sq2trt's own lines, quiet libraries, progress that reads well in a file.

Why: ``make engine`` piped to a file printed ~1,100 lines of onnx_ir INFO, bars redrawn with
carriage returns by transformers, and no progress of sq2trt's own (its bars were tqdm, which draws
nothing off a terminal). Now:

- the console shows sq2trt's INFO lines and third-party WARNING and above; ``-v`` adds third-party
  INFO (and sq2trt's DEBUG), ``-vv`` third-party DEBUG; ``-q`` shows warnings only;
- ``--log-file PATH`` appends the same lines with timestamps, plus third-party INFO, whatever the
  console shows;
- off a terminal, progress is log lines (:class:`LogProgress`): one when a step starts, one per
  tenth of the work at most every ``PROGRESS_INTERVAL_S`` seconds, one when it ends with the time
  it took; on a terminal it is a tqdm bar.

Libraries are quieted only through their own switches: the standard ``logging`` level of a logger,
transformers' ``utils.logging`` (verbosity, propagation to the handlers here, progress bars, which
also turns off huggingface_hub's), and tqdm's documented ``TQDM_DISABLE`` default for bars that
libraries draw with plain tqdm (the GGUF conversion).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .errors import OutputDirError

OWN = "sq2trt"
PROGRESS_LOGGER = "sq2trt.progress"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_EVERY = 0.1  # of the total, between two progress lines
PROGRESS_INTERVAL_S = 30.0  # and at least this long since the last one: whichever is less chatty

# Loggers that warn about nothing a user can act on, quiet below ERROR unless -v. torch.onnx's
# registration logs four "torchvision is not installed. Skipping torchvision::nms" per export.
NOISY_WARNINGS = ("torch.onnx._internal.exporter._registration",)


def is_own(name: str) -> bool:
    return name == OWN or name.startswith(OWN + ".")


class _ConsoleFilter(logging.Filter):
    """sq2trt's records at the handler's level; other libraries' from ``third_party_level`` up. On a
    terminal the progress records are left to the bar (they still reach a log file)."""

    def __init__(self, third_party_level: int, drop_progress: bool):
        super().__init__()
        self.third_party_level = third_party_level
        self.drop_progress = drop_progress

    def filter(self, record: logging.LogRecord) -> bool:
        if self.drop_progress and record.name == PROGRESS_LOGGER:
            return False
        return is_own(record.name) or record.levelno >= self.third_party_level


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it between two runs)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_installed: list[logging.Handler] = []
_state: dict[str, Any] = {"verbose": 0, "file": False}


def setup(*, verbose: int = 0, quiet: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Install the console (and file) handlers on the root logger, replacing the ones a previous call
    installed (main() can run more than once in a process), and unless -v default plain-tqdm bars to
    off. Cheap: imports tqdm only; :func:`quiet_libraries` sets the switches of heavier libraries."""
    root = logging.getLogger()
    for h in _installed:
        root.removeHandler(h)
        h.close()
    _installed.clear()
    console = _Stderr()
    console.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    console.addFilter(_ConsoleFilter(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                                     drop_progress=_stderr_is_terminal()))
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handlers: list[logging.Handler] = [console]
    if log_file:
        path = Path(log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as exc:
            raise OutputDirError(f"--log-file {log_file} cannot be written ({exc}); choose a writable path") from None
        fh.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        fh.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(fh)
    for h in handlers:
        root.addHandler(h)
        _installed.append(h)
    # never raise the root level: a host that captures records (pytest's caplog, an embedding
    # application) may want more than the console shows; the handlers filter what is printed
    root.setLevel(min([h.level for h in handlers] + ([root.level] if root.level else [])))
    for name in NOISY_WARNINGS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        _default_tqdm_off()  # now: reading a model's config imports tqdm (through huggingface_hub)
    _state.update(verbose=verbose, file=bool(log_file))


def quiet_libraries() -> None:
    """Route transformers' logs through the handlers above at WARNING (INFO with -v or a log file) and
    turn off its and huggingface_hub's progress bars unless -v. Called once the request passed its
    preflight, before any model loads (importing transformers takes seconds, which a request refused
    for, say, an unreachable hub should not spend)."""
    verbose, to_file = _state["verbose"], _state["file"]
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_default_handler()  # its own stderr handler would bypass the filter (and print twice in CI)
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.DEBUG if verbose > 1 else logging.INFO if verbose or to_file else logging.WARNING)
    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def _default_tqdm_off() -> None:
    """tqdm reads ``TQDM_<param>`` defaults once, when it is imported (``tqdm.utils.envwrap``). Import
    it with TQDM_DISABLE=1 and restore the environment: bars that libraries draw with plain tqdm are
    off in this process and nowhere else; sq2trt's own bar passes ``disable`` explicitly, which wins.
    Nothing to do where tqdm is already imported or the user set TQDM_DISABLE."""
    if "tqdm" in sys.modules or "TQDM_DISABLE" in os.environ:
        return
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import tqdm  # noqa: F401
    finally:
        del os.environ["TQDM_DISABLE"]


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- progress
def duration(seconds: float) -> str:
    """``4.2 s``, ``41 s``, ``2 min 05 s``, ``1 h 03 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LogProgress:
    """The progress interface the pipeline uses (``update(n)``, ``close()``), as log lines on the
    ``sq2trt.progress`` logger: ``<desc>: started, <total> <unit>``; then, at most every
    ``every`` of the total and ``min_interval`` seconds (whichever gives fewer lines),
    ``<desc>: 32/64 seq (50%), 41 s elapsed, ~41 s left``; and ``<desc>: done, 64 seq in 82 s``
    (``stopped at 3/64 seq after ...`` when closed early, e.g. on an error)."""

    def __init__(self, desc: str, total: int, *, unit: str = "seq", every: float = PROGRESS_EVERY,
                 min_interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None):
        self.desc, self.total, self.unit = desc, max(int(total), 0), unit
        self.every, self.min_interval, self.clock = every, min_interval, clock
        self.log = logger or logging.getLogger(PROGRESS_LOGGER)
        self.n = 0
        self.t0 = self._last_t = clock()
        self._last_n = 0
        self._closed = False
        self.log.info("%s: started, %d %s", desc, self.total, unit)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if (self.n < self.total and self.n - self._last_n >= self.every * self.total
                and now - self._last_t >= self.min_interval):
            elapsed = now - self.t0
            left = elapsed / self.n * (self.total - self.n)
            self.log.info("%s: %d/%d %s (%d%%), %s elapsed, ~%s left", self.desc, self.n, self.total, self.unit,
                          100 * self.n // self.total, duration(elapsed), duration(left))
            self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = duration(self.clock() - self.t0)
        if self.n >= self.total:
            self.log.info("%s: done, %d %s in %s", self.desc, self.n, self.unit, elapsed)
        else:
            self.log.info("%s: stopped at %d/%d %s after %s", self.desc, self.n, self.total, self.unit, elapsed)


class _Both:
    """A terminal bar and the log lines (for --log-file) of the same step."""

    def __init__(self, *parts: Any):
        self.parts = parts

    def update(self, n: int = 1) -> None:
        for p in self.parts:
            p.update(n)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def progress_factory(quiet: bool) -> Callable[[str, int], Any] | None:
    """What ``Pipeline(progress=...)`` takes: None with -q; log lines when stderr is not a terminal
    (a log file, CI); a tqdm bar on a terminal, with the log lines too when ``--log-file`` is set (the
    console leaves those records to the bar)."""
    if quiet:
        return None
    if not _stderr_is_terminal():
        return lambda desc, total: LogProgress(desc, total)
    from tqdm import tqdm

    def bar(desc: str, total: int) -> Any:
        b = tqdm(total=total, desc=desc, unit="seq", leave=False, file=sys.stderr, disable=False)
        return _Both(b, LogProgress(desc, total)) if _state["file"] else b

    return bar
