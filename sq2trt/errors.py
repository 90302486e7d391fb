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

