"""The preflight (sq2trt.preflight) refuses a bad request before any model loads: each case runs the real
CLI, whose model loader and resource check are replaced by guards that fail the test if reached, and
checks the exit code, the message and that it took seconds, not a model load."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sq2trt import cli, errors, preflight
from sq2trt.models import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
QUICK_S = 30  # generous for a loaded 2-core machine; a model load plus calibration takes longer

BIGCODE = {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": 32, "n_layer": 1,
           "n_head": 2, "vocab_size": 64, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture
def guarded(monkeypatch):
    """Fail loudly (exit 70, recorded) if a model load or the resource check is reached."""
    reached: list[str] = []

    def guard(what: str):
        def fn(*a, **k):
            reached.append(what)
            raise RuntimeError(f"{what} reached: the preflight let a bad request through")
        return fn

    monkeypatch.setattr("sq2trt.models.load_model", guard("load_model"))
    monkeypatch.setattr(cli, "check_resources", guard("check_resources"))
    return reached


@pytest.fixture
def texts(tmp_path) -> tuple[Path, Path]:
    calib, evalp = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text("calibration text. " * 200)
    evalp.write_text("held-out text. " * 200)
    return calib, evalp


def run(capsys, *argv) -> tuple[int, str, float]:
    t = time.perf_counter()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err, time.perf_counter() - t


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def data(texts) -> list[str]:
    return ["--calib-data", str(texts[0]), "--eval-data", str(texts[1])]


def test_unknown_level_in_levels_and_level(guarded, capsys, texts, tmp_path):
    out = tmp_path / "out"
    rc, err, secs = run(capsys, "run", "--model", "random:llama", "--levels", "fp,O9", "--out", out, *data(texts))
    assert rc == 2 and "unknown level 'O9'" in err and "W8A8" in err
    rc, err, _ = run(capsys, "calibrate", "--model", "random:llama", "--level", "O7", "--out", out, *data(texts))
    assert rc == 2 and "unknown level 'O7'" in err
    assert not guarded and secs < QUICK_S and not out.exists()


def test_unknown_architecture_is_refused_before_the_fp_level_runs(guarded, capsys, texts, tmp_path):
    cfg = tmp_path / "bigcode.json"
    cfg.write_text(json.dumps(BIGCODE))
    out = tmp_path / "out"
    rc, err, secs = run(capsys, "run", "--model", f"random:{cfg}", "--levels", "fp,O3", "--out", out, *data(texts))
    assert rc == 2 and not guarded and secs < QUICK_S
    assert "GPTBigCodeForCausalLM" in err and "sq2trt/archs.py" in err and "Level(s) O3 need that row" in err
    assert "fp can run without it" in err and not out.exists()  # no fp artifact was made


def test_level_the_backend_or_the_architecture_cannot_run(guarded, capsys, texts, tmp_path):
    out = tmp_path / "out"
    rc, err, _ = run(capsys, "build", "--backend", "trt", "--model", "random:llama", "--level", "O1", "--out", out,
                     *data(texts))
    assert rc == errors.LevelNotSupportedError.exit_code == 2 and "TensorRT has no INT8 dynamic" in err
    rc, err, _ = run(capsys, "export", "--model", "random:mixtral", "--level", "O3", "--out", out, *data(texts))
    assert rc == 2 and "MixtralForCausalLM cannot be exported to ONNX" in err
    rc, err, _ = run(capsys, "diagnose", "--model", "random:llama", "--level", "fp", "--out", out, *data(texts))
    assert rc == 2 and "level fp quantizes nothing" in err
    assert not guarded and not out.exists()


def test_missing_or_empty_text(guarded, capsys, texts, tmp_path):
    out = tmp_path / "out"
    rc, err, _ = run(capsys, "calibrate", "--model", "random:llama", "--calib-data", tmp_path / "nope.txt",
                     "--out", out)
    assert rc == 2 and "calibration text file not found" in err and "--calib-data" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, err, _ = run(capsys, "run", "--model", "random:llama", "--calib-data", texts[0], "--eval-data", empty,
                     "--out", out)
    assert rc == 2 and f"evaluation text file {empty} (--eval-data) is empty" in err
    rc, err, _ = run(capsys, "calibrate", "--model", "random:llama", "--calib-data", tmp_path, "--out", out)
    assert rc == 2 and "is not a file" in err
    assert not guarded and not out.exists()


def test_a_valid_request_passes(texts, tmp_path):
    """The preflight must not refuse what the pipeline would run."""
    args = cli.build_parser().parse_args(["export", "--model", "random:llama", "--level", "fp",
                                          "--out", str(tmp_path / "new" / "out")])
    config, levels = preflight.check(args, resolve=cli.resolved_config, flags_only=cli.config_from_args)
    assert levels == ["fp"] and config.quant.level == "fp"
    assert not (tmp_path / "new").exists()  # the write probe leaves nothing behind


def test_tasks_thresholds_and_onnx_files(guarded, capsys, texts, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "nodata").mkdir()
    rc, err, _ = run(capsys, "evaluate", "--model", "random:llama", "--tasks", "copa", "--task-data",
                     tmp_path / "nodata", "--out", out, *data(texts))
    assert rc == 2 and "task 'copa' reads" in err and "--task-data" in err
    rc, err, _ = run(capsys, "evaluate", "--model", "random:llama", "--tasks", tmp_path / "mine.jsonl",
                     "--out", out, *data(texts))
    assert rc == 2 and "unknown task" in err
    rc, err, _ = run(capsys, "report", "--model", "random:llama", "--check", tmp_path / "thresholds.yaml",
                     "--out", out, *data(texts))
    assert rc == 2 and "thresholds file not found" in err
    rc, err, _ = run(capsys, "compare", "--model", "random:llama", "--reference", tmp_path / "ref.onnx",
                     "--engine", tmp_path / "e.onnx", *data(texts))
    assert rc == 2 and "ONNX file not found" in err and "--reference" in err and "--engine" in err
    assert not guarded and not out.exists()


def test_unwritable_out(guarded, capsys, texts, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err, _ = run(capsys, "run", "--model", "random:llama", "--out", blocker / "build", *data(texts))
    assert rc == errors.OutputDirError.exit_code == 2
    assert f"output directory {blocker / 'build'} is not writable: it cannot be created ({blocker} is not a " \
           "directory)" in err
    assert not guarded


def test_existing_out_that_cannot_be_written(guarded, capsys, texts):
    """As root, permission bits do not stop a write; a read-only file system does (/sys in a container)."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir="/sys").close()
        pytest.skip("/sys is writable here: no read-only directory to test against")
    except OSError:
        pass
    rc, err, _ = run(capsys, "calibrate", "--model", "random:llama", "--out", "/sys", *data(texts))
    assert rc == 2 and "output directory /sys is not writable (" in err and not guarded


def test_every_problem_is_reported_at_once(guarded, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err, _ = run(capsys, "run", "--model", "random:llama", "--levels", "fp,O9", "--calib-data",
                     tmp_path / "nope.txt", "--out", blocker / "build")
    assert rc == 2 and not guarded
    assert "3 problems with this request, found before loading the model" in err
    for part in ("unknown level 'O9'", "calibration text file not found", "is not writable"):
        assert err.count(part) == 1, part
    with pytest.raises(errors.ConfigError) as exc:  # the first problem's type, all of them attached
        preflight.raise_problems([errors.ConfigError("a"), errors.OutputDirError("b"), errors.ConfigError("a")])
    assert [str(p) for p in exc.value.problems] == ["a", "b"]


def test_unreachable_hub_fails_at_once(guarded, capsys, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    rc, err, secs = run(capsys, "run", "--model", "sq2trt-test/not-here", "--out", tmp_path / "out", *data(texts))
    assert rc == 2 and not guarded and secs < preflight.HUB_PROBE_TIMEOUT_S + 5
    assert f"the hub at http://127.0.0.1:{port} cannot be reached" in err
    assert "hf download sq2trt-test/not-here --local-dir DIR" in err and "--model DIR" in err


def test_offline_hub_fails_at_once_without_probing(guarded, capsys, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a probe would hang for its whole timeout on this address (TEST-NET-1, never routed)
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")
    rc, err, secs = run(capsys, "calibrate", "--model", "sq2trt-test/not-here", "--out", tmp_path / "out",
                        *data(texts))
    assert rc == 2 and not guarded and secs < preflight.HUB_PROBE_TIMEOUT_S
    assert "HF_HUB_OFFLINE=1 is set" in err and "not in the Hugging Face cache" in err


def test_not_a_path_nor_a_hub_id(guarded, capsys, texts, tmp_path):
    rc, err, _ = run(capsys, "calibrate", "--model", tmp_path / "no" / "such" / "model", "--out",
                     tmp_path / "out", *data(texts))
    assert rc == 2 and "no such file or directory" in err and not guarded


def _fake_hub_cache(home: Path, repo: str, config: dict) -> None:
    """The layout huggingface_hub keeps: refs/main names a snapshot holding the files."""
    d = home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_cached_hub_model_is_read_from_the_cache_offline(texts, tmp_path):
    """A fresh process (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import): the
    architecture comes from the cached config.json, with no network and no weights."""
    home = tmp_path / "hf-home"
    _fake_hub_cache(home, "sq2trt-test/bigcode", BIGCODE)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://192.0.2.1:9"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sq2trt", "run", "--model", "sq2trt-test/bigcode", "--levels", "fp,O3",
                        "--out", str(out), *data(texts)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "GPTBigCodeForCausalLM" in p.stderr and "Level(s) O3 need that row" in p.stderr
    assert "not in the Hugging Face cache" not in p.stderr and not out.exists()


def test_cached_snapshot_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _fake_hub_cache(tmp_path, "sq2trt-test/llama", TINY_CONFIGS["llama"])
    problem, snap = preflight.hub_source("sq2trt-test/llama")
    assert problem is None and (snap / "config.json").is_file()


def test_cached_hub_model_loads_from_the_cache_when_the_hub_does_not_answer(tmp_path):
    """A complete cached model, HF_HUB_OFFLINE unset, and a hub that accepts connections but never answers
    (a black-holed network): the one preflight probe sees that, and the model, its config and tokenizer load
    from the cache with no further request (transformers would otherwise ask about every file and wait out
    each request's timeout). The hub here is a real local socket that counts connections."""
    import threading

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sq2trt.checkpoints import byte_tokenizer
    from sq2trt.models import TINY_CONFIGS

    home = tmp_path / "hf-home"
    _fake_hub_cache(home, "sq2trt-test/tiny", TINY_CONFIGS["llama"])
    snap = next((home / "hub").glob("models--*/snapshots/*"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_CONFIGS["llama"])).save_pretrained(snap)
    byte_tokenizer().save_pretrained(snap)
    # huggingface_hub (2.5) fetches a registry of its own once per process (3 s timeout, kept a day in HF_HOME);
    # a fresh copy there keeps this count to the requests the loaders make
    (home / ".agent_harnesses.json").write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)  # never answered

    threading.Thread(target=accept, daemon=True).start()
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(k, None)
    code = ("from sq2trt.budget import model_config; from sq2trt.models import load_model; "
            "c = model_config('sq2trt-test/tiny'); l = load_model('sq2trt-test/tiny'); "
            "print(type(l.model).__name__, c.model_type, l.tokenizer('hi')['input_ids'])")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
    finally:
        server.close()
        for c in held:
            c.close()
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LlamaForCausalLM llama [104, 105]" in p.stdout, p.stdout
    assert len(held) == 1, f"{len(held)} connections to the unanswering hub (the probe alone should make one)"
