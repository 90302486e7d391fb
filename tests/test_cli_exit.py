"""Every exit code of `sq2trt` means one thing, the README lists them all, and an unexpected failure
is reported as a bug (its own code, a crash log) rather than passing for a failed accuracy gate."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sq2trt import cli, errors
from sq2trt.trt import LintFailedError, PlanMismatchError

ROOT = Path(__file__).resolve().parents[1]


def failing(exc: BaseException):
    def cmd(args):
        raise exc

    return cmd


@pytest.mark.parametrize("exc, code", [
    (errors.AccuracyGateError("ppl +9%"), 1),
    (errors.ConfigError("alpha 2"), 2),
    (errors.ModelNotFoundError("no such model"), 2),
    (LintFailedError("Q/DQ rules broken"), 2),
    (errors.BackendUnavailableError("no TensorRT"), 3),
    (PlanMismatchError("other GPU"), 3),
    (errors.ExportMismatchError("graph != plan"), 4),
    (errors.ResourceBudgetError("too big"), 5),
    (KeyboardInterrupt(), 130),
])
def test_typed_errors_exit_with_their_code(monkeypatch, capsys, exc, code):
    monkeypatch.setattr(cli, "cmd_levels", failing(exc))
    assert cli.main(["levels"]) == code
    assert code in errors.EXIT_CODES
    if isinstance(exc, errors.Sq2trtError):
        assert f"sq2trt levels: error: {exc}" in capsys.readouterr().err


def _encode_error():
    from google.protobuf.message import EncodeError

    return EncodeError("Failed to serialize proto")


@pytest.mark.parametrize("make", [lambda: RuntimeError("boom"), _encode_error, lambda: MemoryError(),
                                  lambda: ValueError("raw"), lambda: KeyError("k")])
def test_unexpected_failures_exit_70_with_a_crash_log(monkeypatch, capsys, tmp_path, make):
    exc = make()
    monkeypatch.setattr(cli, "cmd_calibrate", failing(exc))
    out = tmp_path / "build"
    rc = cli.main(["calibrate", "--model", "random:llama", "--out", str(out), "-q", "--no-resource-check"])
    assert rc == errors.INTERNAL_ERROR_EXIT == 70
    assert rc not in (1, 2, 3, 4, 5)
    err = capsys.readouterr().err
    logs = list((out / "logs").glob("sq2trt-crash-*.log"))
    assert len(logs) == 1
    assert f"internal error: {type(exc).__name__}" in err and str(logs[0]) in err and "please report it" in err
    assert "Traceback" not in err and "Rerun with -v" in err
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and f"{type(exc).__name__}" in text
    assert "command: sq2trt calibrate --model random:llama" in text and "versions:" in text


def test_verbose_prints_the_traceback_and_commands_without_out_log_to_tmp(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "cmd_levels", failing(RuntimeError("boom")))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.main(["levels", "-v"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert "Rerun with -v" not in err
    assert len(list(tmp_path.glob("sq2trt-crash-*.log"))) == 1 and str(tmp_path) in err


def test_lint_failure_exits_1(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("MatMul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / "m.onnx")
    assert cli.main(["lint", str(tmp_path / "m.onnx"), "-q"]) == 1  # scale 0: not > 0


def test_bad_input_and_success_codes(tmp_path, capsys):
    assert cli.main(["levels"]) == 0
    assert cli.main(["calibrate", "--model", "random:nosuch", "--out", str(tmp_path), "-q"]) == 2
    assert "random:<one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a usage error is bad input too
        cli.main(["calibrate", "--level"])
    assert e.value.code == 2


def test_readme_lists_every_exit_code():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"\| exit code \| meaning \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)", readme)
    assert table, "README lost its exit-code table (| exit code | meaning |)"
    codes = [int(re.match(r"\| *(\d+) *\|", row).group(1)) for row in table.group(1).splitlines()]
    assert codes == sorted(errors.EXIT_CODES), "README exit-code table differs from sq2trt.errors.EXIT_CODES"


def test_closed_pipe_is_not_reported_as_a_bug(monkeypatch, capfd, tmp_path):
    monkeypatch.setattr(cli, "cmd_levels", failing(BrokenPipeError(32, "Broken pipe")))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.main(["levels"]) == errors.BROKEN_PIPE_EXIT == 141
    assert "internal error" not in capfd.readouterr().err and not list(tmp_path.iterdir())
