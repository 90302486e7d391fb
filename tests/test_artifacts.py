"""Results you can trust: the stamp protocol, content-addressed hashes, and crash recovery.

The crash tests run the tiny ``random:llama`` O3 pipeline under two configurations, A and B (another
calibration seed): A is built completely, then B is interrupted at each named crash point. A rerun
must rebuild what the crash left unstamped and give exactly the artifacts of an uninterrupted run
(of B, and of A again: a file replaced by B must never pass for A's because A's old stamp is still
there), and must not redo work that finished before the crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sq2trt import artifacts
from sq2trt.artifacts import InjectedCrash, fresh, meta_path, producing, read_meta, stamp, write_json

from conftest import data_file, tiny_args

ROOT = Path(__file__).resolve().parents[1]
SEED_B = ["--calib-seed", "1"]
FLAGS = ["--calib-num-samples", "8", "--level", "O3", "--recipe", "none"]  # two calibration batches; defaults
# (file under build/random-llama, config-hash step); every artifact of an O3 `compare`, in order
CHAIN = [("act_stats.safetensors", "stats"), ("base.onnx", "base"), ("O3/smooth_scales.safetensors", "smooth"),
         ("O3/act_scales.json", "scales"), ("O3/ref.onnx", "ref"), ("O3/O3.onnx", "quant"),
         ("O3/O3.ort.onnx", "engine"), ("O3/compare.json", "compare")]


# --------------------------------------------------------------------------- the protocol itself
def test_producing_removes_the_stamp_first_and_keeps_the_old_file_on_failure(tmp_path):
    art = tmp_path / "a.json"
    write_json(art, {"v": 1})
    stamp(art, "h1")
    assert fresh(art, "h1")
    with pytest.raises(RuntimeError):
        with producing(art) as tmp:
            assert not meta_path(art).exists(), "the stamp must be gone before the artifact is replaced"
            tmp.write_text("half")
            raise RuntimeError("step died")
    assert json.loads(art.read_text()) == {"v": 1} and not fresh(art, "h1")
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_crash_between_replace_and_stamp_leaves_the_artifact_unstamped(tmp_path, monkeypatch):
    art = tmp_path / "a.json"
    write_json(art, {"v": 1})
    stamp(art, "h1")
    monkeypatch.setenv("SQ2TRT_CRASH_AT", "artifact:replaced:a.json")
    write_json(art, {"v": 2})
    with pytest.raises(InjectedCrash):
        stamp(art, "h2")
    assert json.loads(art.read_text()) == {"v": 2}
    assert not fresh(art, "h1") and not fresh(art, "h2")


def test_stamping_a_missing_artifact_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        stamp(tmp_path / "never-written.onnx", "h")
    assert not meta_path(tmp_path / "never-written.onnx").exists()


def test_sources_are_identified_by_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same text")
    b.write_text("same text")
    assert artifacts.source_id(str(a)) == artifacts.source_id(str(b)) != str(a)
    assert artifacts.source_id("hf:wikitext:wikitext-2-raw-v1") == "hf:wikitext:wikitext-2-raw-v1"
    st = a.stat()
    before = artifacts.source_id(str(a))
    a.write_text("SAME TEXT")  # same size; and the old mtime put back
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert artifacts.source_id(str(a)) != before


def test_large_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("SQ2TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifacts, "_CACHE_MIN", 4)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0123456789")
    assert artifacts.file_digest(f) == hashlib.sha256(b"0123456789").hexdigest()
    [cached] = (tmp_path / "cache" / "digests").iterdir()
    cached.write_text("from-the-cache")
    artifacts._DIGESTS.clear()  # a later process: the file is not read again
    assert artifacts.file_digest(f) == "from-the-cache"
    f.write_bytes(b"98765")  # any write changes the key (size here; mtime_ns too)
    assert artifacts.file_digest(f) == hashlib.sha256(b"98765").hexdigest()


# --------------------------------------------------------------------------- pipeline helpers
def _config(out: Path, calib: Path, evalp: Path, *extra: str):
    from sq2trt.cli import build_parser, config_from_args

    args = build_parser().parse_args(["compare", "--model", "random:llama", *tiny_args(calib, evalp, out), *FLAGS,
                                      *extra])
    return config_from_args(args)


def _pipe(out: Path, calib: Path, evalp: Path, *extra: str):
    from sq2trt.pipeline import Pipeline

    return Pipeline(_config(out, calib, evalp, *extra), out)


def _run_all(pipe) -> None:
    """Every step, each deciding for itself whether its artifact can be reused."""
    pipe.calibrate()
    pipe.base_onnx()
    pipe.smooth()
    pipe.act_scales()
    pipe.export()
    pipe.build()
    pipe.compare()


def _content(path: Path) -> str:
    """Digest of what an artifact holds (tensors, values), not how it is laid out on disk."""
    h = hashlib.sha256()
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(path))
        for t in sorted(m.graph.initializer, key=lambda t: t.name):
            h.update(t.name.encode() + numpy_helper.to_array(t).tobytes())
        for n in m.graph.node:
            h.update(f"{n.op_type}{list(n.input)}{list(n.output)}".encode())
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        for k, v in sorted(load_file(str(path)).items()):
            h.update(k.encode() + v.numpy().tobytes())
    else:
        d = json.loads(path.read_text())
        h.update(json.dumps({k: d[k] for k in ("logits", "ppl")} if "ppl" in d else d, sort_keys=True).encode())
    return h.hexdigest()


def _contents(out: Path) -> dict[str, str]:
    return {name: _content(out / "random-llama" / name) for name, _ in CHAIN}


def _mtimes(out: Path) -> dict[str, int]:
    return {name: (out / "random-llama" / name).stat().st_mtime_ns for name, _ in CHAIN
            if (out / "random-llama" / name).exists()}


def _fresh(pipe) -> set[str]:
    """The chain's artifacts whose stamps vouch for them under ``pipe``'s configuration."""
    return {name for name, step in CHAIN if fresh(pipe.model_dir / name, pipe.h(step))}


@pytest.fixture(scope="module")
def data():
    return data_file("wikitext2_tokenized/valid.txt"), data_file("wikitext2_raw_test/wiki.test.raw")


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    """Uninterrupted builds: A in one folder, A then B in another (its contents are B's)."""
    a = tmp_path_factory.mktemp("a")
    _run_all(_pipe(a, *data))
    ab = tmp_path_factory.mktemp("ab")
    shutil.copytree(a, ab, dirs_exist_ok=True)
    _run_all(_pipe(ab, *data, *SEED_B))
    return a, _contents(a), _contents(ab)


def _check_rerun(out: Path, data, extra: tuple[str, ...], want: dict[str, str], rebuilt: set[str] = frozenset(),
                 kept: set[str] = frozenset()) -> None:
    """Rerun every step; finished work (stamped for this config) is untouched, the rest rebuilt, and
    the result is exactly an uninterrupted run's. ``rebuilt`` must not have been trusted, ``kept`` must."""
    pipe = _pipe(out, *data, *extra)
    trusted, before = _fresh(pipe), _mtimes(out)
    assert not trusted & rebuilt, f"a crashed artifact is still vouched for: {trusted & rebuilt}"
    assert kept <= trusted, f"finished work lost its stamp: {kept - trusted}"
    _run_all(pipe)
    after = _mtimes(out)
    assert {n for n in trusted if after[n] != before[n]} == set(), "trusted work was redone"
    assert {n for n in rebuilt if after[n] == before.get(n)} == set(), "an interrupted artifact was reused"
    assert _contents(out) == want
    assert _fresh(_pipe(out, *data, *extra)) == {n for n, _ in CHAIN}


# crash point -> (artifacts the crash leaves unstamped, artifacts B finished before it)
_STATS, _SMOOTH, _SCALES = "act_stats.safetensors", "O3/smooth_scales.safetensors", "O3/act_scales.json"
CRASHES = {
    "calibrate:first-batch": (set(), set()),
    "artifact:replaced:act_stats.safetensors": ({_STATS}, set()),
    "artifact:replaced:smooth_scales.safetensors": ({_SMOOTH}, {_STATS}),
    "artifact:replaced:act_scales.json": ({_SCALES}, {_STATS, _SMOOTH}),
    "export:mid": (set(), {_STATS, _SMOOTH, _SCALES}),
    "save_onnx:data-replaced": ({"O3/ref.onnx"}, {_STATS, _SMOOTH, _SCALES}),
    "artifact:replaced:ref.onnx": ({"O3/ref.onnx"}, {_STATS, _SMOOTH, _SCALES}),
    "artifact:replaced:O3.onnx": ({"O3/O3.onnx"}, {_STATS, _SMOOTH, _SCALES, "O3/ref.onnx"}),
    "artifact:replaced:O3.ort.onnx": ({"O3/O3.ort.onnx"}, {_STATS, _SMOOTH, _SCALES, "O3/ref.onnx", "O3/O3.onnx"}),
    "artifact:replaced:compare.json": ({"O3/compare.json"},
                                        {_STATS, _SMOOTH, _SCALES, "O3/ref.onnx", "O3/O3.onnx", "O3/O3.ort.onnx"}),
}


@pytest.mark.parametrize("point", list(CRASHES))
def test_a_crash_at_each_point_is_recovered_exactly(point, built, data, tmp_path, monkeypatch):
    a, want_a, want_b = built
    if point == "save_onnx:data-replaced":  # only files with external data have a .data to replace
        from sq2trt import export

        monkeypatch.setattr(export, "TWO_GB", 64 * 1024**2)
    crashed = tmp_path / "crashed"
    shutil.copytree(a, crashed)
    monkeypatch.setenv("SQ2TRT_CRASH_AT", point)
    with pytest.raises(InjectedCrash):
        _pipe(crashed, *data, *SEED_B).compare()
    monkeypatch.delenv("SQ2TRT_CRASH_AT")
    unstamped, finished_b = CRASHES[point]
    again_a = tmp_path / "again-a"
    shutil.copytree(crashed, again_a)
    # rerunning B: B's finished work is kept, the interrupted artifact rebuilt, the result is B's
    _check_rerun(crashed, data, tuple(SEED_B), want_b, rebuilt=unstamped, kept=finished_b)
    # going back to A: no file B replaced may pass for A's (A's old stamp must be gone)
    _check_rerun(again_a, data, (), want_a, rebuilt=unstamped)


def test_a_sigkilled_run_is_recovered_exactly(built, data, tmp_path):
    a, want_a, want_b = built
    out = tmp_path / "killed"
    shutil.copytree(a, out)
    env = {**os.environ, "SQ2TRT_CRASH_AT": "artifact:replaced:O3.onnx", "SQ2TRT_CRASH_MODE": "kill"}
    cmd = [sys.executable, "-m", "sq2trt", "run", "--levels", "O3", "--model", "random:llama",
           *tiny_args(*data, out), *FLAGS, *SEED_B]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    again_a = tmp_path / "again-a"
    shutil.copytree(out, again_a)
    finished = {_STATS, _SMOOTH, _SCALES, "O3/ref.onnx"}
    _check_rerun(out, data, tuple(SEED_B), want_b, rebuilt={"O3/O3.onnx"}, kept=finished)
    _check_rerun(again_a, data, (), want_a, rebuilt={"O3/O3.onnx"})


# --------------------------------------------------------------------------- what invalidates
def test_editing_the_calibration_file_in_place_recalibrates(built, data, tmp_path):
    calib = tmp_path / "calib.txt"
    text = data[0].read_text(encoding="utf-8")[:20000]
    calib.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    shutil.copytree(built[0], out)  # base.onnx is reused: it does not depend on the text
    _run_all(_pipe(out, calib, data[1]))
    before, quant = _mtimes(out), _contents(out)["O3/O3.onnx"]
    st = calib.stat()
    calib.write_text(text[::-1], encoding="utf-8")  # same path, same size, same mtime: other text
    os.utime(calib, ns=(st.st_atime_ns, st.st_mtime_ns))
    pipe = _pipe(out, calib, data[1])
    assert _fresh(pipe) == {"base.onnx"}  # only the graph without weights does not depend on the text
    _run_all(pipe)
    after = _mtimes(out)
    assert after["act_stats.safetensors"] != before["act_stats.safetensors"]
    assert after["base.onnx"] == before["base.onnx"]
    assert _contents(out)["O3/O3.onnx"] != quant


@pytest.mark.parametrize("change, redone", [
    ("source", {n for n, _ in CHAIN}),
    ("torch", {n for n, _ in CHAIN}),
    ("onnx", {"base.onnx", "O3/ref.onnx", "O3/O3.onnx", "O3/O3.ort.onnx", "O3/compare.json"}),
    ("onnxruntime", {"O3/O3.ort.onnx", "O3/compare.json"}),
])
def test_a_new_source_or_library_version_invalidates_what_it_affects(change, redone, built, data, tmp_path,
                                                                     monkeypatch):
    a, want_a, _ = built
    out = tmp_path / "out"
    shutil.copytree(a, out)
    assert _fresh(_pipe(out, *data)) == {n for n, _ in CHAIN}
    if change == "source":
        monkeypatch.setattr(artifacts, "source_fingerprint", lambda: "edited-source")
    else:
        versions = {**artifacts.tool_versions(), change: "0.0.0-test"}
        monkeypatch.setattr(artifacts, "tool_versions", lambda: versions)
    pipe = _pipe(out, *data)
    assert _fresh(pipe) == {n for n, _ in CHAIN} - redone
    before = _mtimes(out)
    _run_all(pipe)
    after = _mtimes(out)
    assert {n for n in after if after[n] != before[n]} == redone
    assert _contents(out) == want_a  # same code and libraries really: the same results
    assert read_meta(out / "random-llama" / "O3" / "compare.json")["config_hash"] == pipe.h("compare")
