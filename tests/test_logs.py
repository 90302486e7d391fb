"""Logs read well in a file: sq2trt's own lines and progress, third-party INFO only with -v (or in
--log-file). The runs are real `sq2trt` processes on a tiny model with stderr redirected to a file,
as `make engine > log 2>&1` does."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from sq2trt import cli
from sq2trt.logs import LogProgress, duration

from conftest import tiny_args

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY_INFO = re.compile(r"^INFO (onnx_ir|onnxscript)[.:]", re.M)


def sq2trt(tmp_path: Path, name: str, *argv: str) -> tuple[int, str]:
    err = tmp_path / f"{name}.stderr"
    with open(err, "w") as fh:  # a file, not a terminal
        p = subprocess.run([sys.executable, "-m", "sq2trt", *argv], stdout=subprocess.DEVNULL, stderr=fh,
                           cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    return p.returncode, err.read_text()


def test_a_run_logged_to_a_file(calib_text, eval_text, tmp_path):
    args = [a for a in tiny_args(calib_text, eval_text, tmp_path / "out") if a != "-q"]
    log_file = tmp_path / "run.log"
    rc, err = sq2trt(tmp_path, "run", "run", "--model", "random:llama", "--levels", "fp,O3", *args,
                     "--log-file", str(log_file))
    assert rc == 0, err[-3000:]
    assert not THIRD_PARTY_INFO.search(err), "third-party INFO on the console without -v"
    assert "\r" not in err and "torchvision is not installed" not in err  # no bars, no noise warnings
    # every step that ran says when it ended and how long it took
    done = set(re.findall(r"^INFO sq2trt\.pipeline: (\w+) done in \d+\.\d s$", err, re.M))
    assert {"calibrate", "calibrate_static", "export_base", "export", "build", "compare", "perplexity"} <= done, done
    # progress: a line when each step starts and one when it ends, with the time it took
    started = re.findall(r"^INFO sq2trt\.progress: (.+): started, (\d+) seq$", err, re.M)
    ended = re.findall(r"^INFO sq2trt\.progress: (.+): done, (\d+) seq in \d+\.\d s$", err, re.M)
    assert started and sorted(started) == sorted(ended), (started, ended)
    assert any(d.startswith("calibrate (per-channel") for d, _ in started)
    # the log file has the same lines with times, plus the third-party INFO the console left out
    text = log_file.read_text()
    assert THIRD_PARTY_INFO.search(re.sub(r"^\S+ \S+ ", "", text, flags=re.M))
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO sq2trt\.pipeline: export_base done in", text, re.M)


def test_verbose_brings_third_party_info_back(tmp_path):
    rc, err = sq2trt(tmp_path, "export", "export", "--model", "random:llama", "--level", "fp",
                     "--out", str(tmp_path / "out"), "-v")
    assert rc == 0, err[-3000:]
    assert THIRD_PARTY_INFO.search(err)
    assert re.search(r"^INFO sq2trt\.pipeline: export_base done in", err, re.M)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_every_tenth_at_most_every_interval(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="sq2trt.progress"):
        p = LogProgress("calibration", 64, clock=clock, min_interval=30)
        for _ in range(64):  # 64 sequences, 1.28 s each: 82 s in all
            clock.t += 1.28
            p.update(1)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "calibration: started, 64 seq"
    assert lines[-1] == "calibration: done, 64 seq in 1 min 22 s"
    middle = lines[1:-1]
    # 10% is 6.4 seq (8.2 s) but 30 s must pass between lines: 24/64 (30.7 s) and 48/64 (61.4 s)
    assert middle == ["calibration: 24/64 seq (37%), 31 s elapsed, ~51 s left",
                      "calibration: 48/64 seq (75%), 1 min 01 s elapsed, ~20 s left"]


def test_progress_on_a_fast_long_step_is_one_line_per_tenth(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="sq2trt.progress"):
        p = LogProgress("perplexity (engine)", 1000, clock=clock, min_interval=30)
        for _ in range(1000):
            clock.t += 10.0
            p.update(1)
        p.close()
    periodic = [r.getMessage() for r in caplog.records][1:-1]
    assert len(periodic) == 9 and periodic[0].startswith("perplexity (engine): 100/1000 seq (10%), 16 min 40 s")


def test_progress_closed_early_says_where_it_stopped(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="sq2trt.progress"):
        p = LogProgress("calibration", 8, clock=clock)
        clock.t = 2.5
        p.update(3)
        p.close()
        p.close()  # once only
    assert [r.getMessage() for r in caplog.records][1:] == ["calibration: stopped at 3/8 seq after 2.5 s"]


def test_off_a_terminal_the_factory_makes_log_lines_and_quiet_none(capsys):
    assert cli._tqdm_progress(True) is None
    assert isinstance(cli._tqdm_progress(False)("x", 1), LogProgress)  # capsys: stderr is not a terminal
    assert [duration(s) for s in (4.24, 41.2, 125, 3780)] == ["4.2 s", "41 s", "2 min 05 s", "1 h 03 min"]


def test_log_file_that_cannot_be_written_is_bad_input(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["levels", "--log-file", str(blocker / "sq2trt.log")]) == 2
    assert f"--log-file {blocker / 'sq2trt.log'} cannot be written" in capsys.readouterr().err
