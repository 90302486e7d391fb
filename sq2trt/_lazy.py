"""Optional heavy dependencies, imported on first use (Polygraphy's ``mod.lazy_import`` idea).

A missing TensorRT breaks only the TensorRT path; ``sq2trt --help`` works everywhere.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

from .errors import BackendUnavailableError


class LazyModule(types.ModuleType):
    def __init__(self, name: str, hint: str):
        super().__init__(name)
        self._lazy_name = name
        self._lazy_hint = hint
        self._lazy_mod: types.ModuleType | None = None

    def _load(self) -> types.ModuleType:
        if self._lazy_mod is None:
            try:
                self._lazy_mod = importlib.import_module(self._lazy_name)
            except ImportError as exc:  # also OSError-wrapping stubs raise ImportError
                raise BackendUnavailableError(
                    f"Python module '{self._lazy_name}' could not be imported ({exc}). {self._lazy_hint}"
                ) from exc
        return self._lazy_mod

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_lazy"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)


def lazy_import(name: str, hint: str) -> LazyModule:
    return LazyModule(name, hint)


trt = lazy_import(
    "tensorrt",
    hint="TensorRT is needed for .plan builds: pip install 'sq2trt[trt]' on a Linux machine with an "
    "NVIDIA GPU and driver (TensorRT cannot run on CPU-only machines). The ONNX Runtime backend "
    "(--backend ort) works everywhere.",
)
