"""Typed errors. Each says what went wrong and what to do; the CLI maps them to exit codes.

Never ``assert`` on user input: raise one of these instead.
"""
from __future__ import annotations


class Sq2trtError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = 2


class ConfigError(Sq2trtError, ValueError):
    """An option or recipe value is out of range or unknown (alpha, level, granularity...)."""


class ModelNotFoundError(Sq2trtError, FileNotFoundError):
    """The model id, directory or file cannot be found or loaded."""


class UnsupportedArchitectureError(Sq2trtError, KeyError):
    """The model's architecture has no row in ``sq2trt.archs.ARCHS``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CalibrationDataError(Sq2trtError, ValueError):
    """Calibration or evaluation text is missing, empty or too short."""


class NonFiniteActivationError(Sq2trtError, FloatingPointError):
    """NaN or Inf seen at the input of a layer during calibration."""


class OnnxInputError(Sq2trtError, ValueError):
    """An ONNX file given to build/compare/lint is missing, corrupt or truncated."""


class ExportMismatchError(Sq2trtError, RuntimeError):
    """The exported Q/DQ graph does not compute what the quantization plan says (a bug)."""

    exit_code = 4


class OutputDirError(Sq2trtError, PermissionError):
    """The output directory cannot be created or written."""


class BackendUnavailableError(Sq2trtError, ImportError):
    """An optional backend (TensorRT, onnxruntime-gpu) is not installed or has no device."""

    exit_code = 3


class LevelNotSupportedError(Sq2trtError, ValueError):
    """The quantization level cannot run on the requested backend."""


class AccuracyGateError(Sq2trtError):
    """A report failed its thresholds (``sq2trt report --check``)."""

    exit_code = 1


class ResourceBudgetError(Sq2trtError):
    """The model and levels asked for need more RAM, GPU memory or disk than this machine has
    (estimated from the config before any weight loads; ``sq2trt.budget``). Its own exit code,
    not 2: the input is valid, the machine is too small, so CI can retry on a bigger one."""

    exit_code = 5


# Exit codes of the ``sq2trt`` command, one meaning each (the README's table is checked against
# this). 1 is shared by the two checks CI gates on; everything unexpected is 70 (sysexits'
# EX_SOFTWARE), never Python's default 1, which would read as "accuracy gate failed".
INTERNAL_ERROR_EXIT = 70
INTERRUPTED_EXIT = 130
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left
EXIT_CODES: dict[int, str] = {
    0: "success",
    AccuracyGateError.exit_code: "a check failed: the accuracy gate (`report --check`) or the Q/DQ linter "
                                 "(`sq2trt lint`)",
    Sq2trtError.exit_code: "bad input: unknown model or path, unsupported architecture, invalid option or recipe, "
                           "unusable data, corrupt ONNX, unwritable output (the message says what to do)",
    BackendUnavailableError.exit_code: "an optional backend is missing (TensorRT, onnxruntime-gpu, a GPU), or a "
                                       "`.plan` was built for another TensorRT version or GPU",
    ExportMismatchError.exit_code: "export mismatch: the Q/DQ graph does not compute its quantization plan "
                                   "(a bug in sq2trt; please report it)",
    ResourceBudgetError.exit_code: "does not fit this machine: the estimated RAM, GPU memory or disk exceeds "
                                   "what is available (`sq2trt plan-resources` prints the numbers)",
    INTERNAL_ERROR_EXIT: "unexpected internal error (a bug): the traceback is written to a crash log; "
                         "please report it",
    INTERRUPTED_EXIT: "interrupted (Ctrl-C); finished artifacts are kept",
    BROKEN_PIPE_EXIT: "the output's reader closed the pipe (`sq2trt ... | head`); finished artifacts are kept",
}
