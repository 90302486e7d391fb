"""Every bad input gets a typed error that says what to do, a non-zero exit, and leaves nothing
half-written behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sq2trt import errors
from sq2trt.archs import get_arch
from sq2trt.artifacts import atomic_path, fresh
from sq2trt.cli import main
from sq2trt.config import Config, QuantConfig
from sq2trt.data import calibration_windows, load_text
from sq2trt.models import load_model
from sq2trt.pipeline import Pipeline

from conftest import tiny_args


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_unknown_model_and_paths(tmp_path, capsys):
    with pytest.raises(errors.ModelNotFoundError, match="random:<one of"):
        load_model("random:nosuch")
    with pytest.raises(errors.ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "notamodel"))
    # an id that is neither local nor downloadable (offline): says how to provide it
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(errors.ModelNotFoundError, match="Provide it locally"):
            load_model("sq2trt-test/definitely-not-a-model")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert run_cli("calibrate", "--model", "random:nosuch", "--out", tmp_path, "-q") == 2
    assert "random:<one of" in capsys.readouterr().err


def test_architecture_not_in_table(tmp_path):
    cfg = tmp_path / "gptbigcode.json"
    cfg.write_text('{"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": 32,'
                   ' "n_layer": 1, "n_head": 2, "vocab_size": 64, "n_positions": 64}')
    loaded = load_model(f"random:{cfg}")
    with pytest.raises(errors.UnsupportedArchitectureError, match=r"sq2trt/archs.py, ARCHS.*add an Arch row"):
        get_arch(loaded.model)


def test_post_ln_opt_is_refused():
    loaded = load_model("random:opt")
    loaded.model.config.do_layer_norm_before = False
    with pytest.raises(errors.UnsupportedArchitectureError, match="do_layer_norm_before"):
        get_arch(loaded.model)


def test_calibration_text_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(errors.CalibrationDataError, match="empty"):
        load_text(str(empty))
    with pytest.raises(errors.CalibrationDataError, match="not found"):
        load_text(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(errors.CalibrationDataError, match="bad.jsonl:2"):
        load_text(str(bad))
    with pytest.raises(errors.CalibrationDataError, match="fewer than one window"):
        calibration_windows(torch.arange(10), num=4, seq_len=64, seed=0)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert load_text(str(good)) == "first\n\nsecond"


def test_config_errors(tmp_path, capsys):
    with pytest.raises(errors.ConfigError, match=r"alpha must be in \[0, 1\]"):
        QuantConfig(alpha=1.5)
    with pytest.raises(errors.ConfigError, match="unknown level 'O9'"):
        QuantConfig(level="O9")
    with pytest.raises(errors.ConfigError, match="unknown key"):
        Config.from_dict({"quant": {"alhpa": 0.5}})
    assert run_cli("smooth", "--model", "random:llama", "--alpha", "-0.1", "--out", tmp_path, "-q") == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    assert run_cli("export", "--model", "random:llama", "--level", "O9", "--out", tmp_path, "-q") == 2
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("quant: {level: O3, alpha: 2}\n")
    assert run_cli("calibrate", "--model", "random:llama", "--recipe", bad_recipe, "--out", tmp_path, "-q") == 2


def test_nan_activation_names_the_layer(tmp_path, calib_text):
    loaded = load_model("random:llama")
    with torch.no_grad():
        loaded.model.model.layers[1].post_attention_layernorm.weight[5] = float("nan")
    pipe = Pipeline(Config(model="random:llama").replace(calib={"data": str(calib_text), "num_samples": 2,
                                                                 "seq_len": 32}), tmp_path)
    pipe._loaded = loaded
    with pytest.raises(errors.NonFiniteActivationError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        pipe.calibrate()
    assert not (pipe.model_dir / "act_stats.safetensors").exists()


def test_channels_that_never_fire_get_unit_scale(tmp_path, calib_text):
    loaded = load_model("random:llama")
    with torch.no_grad():
        loaded.model.model.layers[0].input_layernorm.weight[[1, 2]] = 0.0  # these channels are always 0
    pipe = Pipeline(Config(model="random:llama").replace(calib={"data": str(calib_text), "num_samples": 2,
                                                                 "seq_len": 32}), tmp_path)
    pipe._loaded = loaded
    from safetensors.torch import load_file

    s = load_file(str(pipe.smooth()))["model.layers.0.input_layernorm"]
    assert torch.isfinite(s).all() and s[1] == 1.0 and s[2] == 1.0


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage-not-protobuf" * 10])
def test_corrupt_onnx_inputs(tmp_path, content, capsys):
    from sq2trt.engine import build_ort_engine
    from sq2trt.compare import compare_logits

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(errors.OnnxInputError, match="rerun the export step"):
        build_ort_engine(bad, tmp_path / "engine.onnx")
    assert not (tmp_path / "engine.onnx").exists()
    import numpy as np

    with pytest.raises(errors.OnnxInputError):
        compare_logits(bad, bad, np.zeros((1, 4), dtype=np.int64))


def test_truncated_onnx(tmp_path):
    from sq2trt.export import export_reference, load_onnx

    loaded = load_model("random:llama")
    export_reference(loaded.model, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.OnnxInputError, match="truncated or corrupt"):
        load_onnx(tmp_path / "t.onnx")


def test_unwritable_output_dir(tmp_path, calib_text, eval_text, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    out = blocker / "build"
    code = run_cli("calibrate", "--model", "random:llama", *tiny_args(calib_text, eval_text, out))
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "artifact.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_calibration_leaves_no_artifact(tmp_path, calib_text, monkeypatch):
    import sq2trt.calibrate as cal

    calls = {"n": 0}

    def interrupting(x):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return cal.per_channel_absmax(x)

    monkeypatch.setattr(cal, "per_channel_absmax", interrupting)
    pipe = Pipeline(Config(model="random:llama").replace(calib={"data": str(calib_text), "num_samples": 8,
                                                                 "seq_len": 32}), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pipe.calibrate()
    leftovers = [p.name for p in pipe.model_dir.iterdir()] if pipe.model_dir.exists() else []
    assert leftovers == [], leftovers


def test_interrupted_export_leaves_no_artifact(tmp_path, monkeypatch):
    import onnx_ir

    from sq2trt.export import export_reference

    real_save = onnx_ir.save

    def dying_save(model, path, *a, **kw):
        real_save(model, path, *a, **kw)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partial file ...
        raise KeyboardInterrupt  # ... and the process is interrupted

    monkeypatch.setattr(onnx_ir, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        export_reference(load_model("random:llama").model, tmp_path / "ref.onnx")
    assert list(tmp_path.iterdir()) == []
    assert not fresh(tmp_path / "ref.onnx", "anything")


def test_trt_backend_without_tensorrt_says_what_to_install(tmp_path, calib_text, eval_text, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code = run_cli("build", "--backend", "trt", "--model", "random:llama",
                   *tiny_args(calib_text, eval_text, tmp_path))
    assert code == errors.BackendUnavailableError.exit_code
    err = capsys.readouterr().err
    assert "NVIDIA GPU" in err and "pip install" in err
