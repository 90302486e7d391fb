"""Before any weight loads: the recipe comes from the config's architecture, and a run that cannot
fit this machine stops with the numbers (sq2trt.budget)."""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from sq2trt import budget, errors
from sq2trt.archs import ARCHS, RECIPES, recipe_for
from sq2trt.checkpoints import SHAPES
from sq2trt.cli import RECIPE_DIR, build_parser, main, resolve_recipe, resolved_config
from sq2trt.config import Config, load_recipe
from sq2trt.models import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def shape_json(tmp_path: Path, shape: str) -> str:
    p = tmp_path / f"{shape}.json"
    p.write_text(json.dumps(SHAPES[shape]))
    return f"random:{p}"


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything loads a model's weights."""
    import sq2trt.models

    def refuse(*a, **k):
        raise errors.ModelNotFoundError("test refusal: weights were loaded")

    monkeypatch.setattr(sq2trt.models, "load_model", refuse)


# --------------------------------------------------------------------------- recipes
def test_every_row_has_a_shipped_recipe_of_its_family():
    assert set(RECIPES) == set(ARCHS)
    for arch, family in RECIPES.items():
        path = RECIPE_DIR / f"{family}.yaml"
        assert path.is_file(), path
        assert (ROOT / "recipes" / f"{family}.yaml") == path
        import yaml

        assert yaml.safe_load(path.read_text())["family"] == family


def _config_dir(tmp_path: Path, tiny: str) -> Path:
    """A model directory holding only the config.json of a tiny config (no weights: nothing loads them)."""
    d = tmp_path / f"checkpoint-{tiny}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIGS[tiny]))
    return d


@pytest.mark.parametrize("tiny", sorted(TINY_CONFIGS))
def test_each_architecture_gets_its_family_recipe(tiny, tmp_path, caplog, no_weights):
    caplog.set_level(logging.INFO, logger="sq2trt")
    args = build_parser().parse_args(["calibrate", "--model", str(_config_dir(tmp_path, tiny))])
    got = resolve_recipe(args)
    arch = TINY_CONFIGS[tiny]["architectures"][0]
    if tiny == "falcon-new":  # the falcon recipe is for the 7B layout: the table's own alpha applies
        assert got is None and "new decoder architecture" in caplog.text
        assert resolved_config(args).quant.alpha is None
        return
    assert got == str(RECIPE_DIR / f"{RECIPES[arch]}.yaml")
    assert f"because the model's config declares {arch}" in caplog.text


def test_random_test_models_keep_the_defaults(no_weights):
    parse = build_parser().parse_args
    assert resolve_recipe(parse(["run", "--model", "random:llama"])) is None
    assert resolved_config(parse(["run", "--model", "random:llama"])) == Config(model="random:llama")
    named = resolved_config(parse(["run", "--model", "random:llama", "--recipe", str(RECIPE_DIR / "opt.yaml")]))
    assert named.quant.alpha == 0.5


def test_auto_explicit_and_none(tmp_path, no_weights):
    parse = build_parser().parse_args
    model = str(_config_dir(tmp_path, "llama"))
    auto = resolved_config(parse(["run", "--model", model]))
    llama = load_recipe(RECIPE_DIR / "llama.yaml")
    assert auto.quant.weight_granularity == llama["quant"]["weight_granularity"] == "per-channel"
    assert auto.quant.smooth_folds == tuple(llama["quant"]["smooth_folds"])
    none = resolved_config(parse(["run", "--model", model, "--recipe", "none"]))
    assert none == Config(model=model)
    explicit = resolved_config(parse(["run", "--model", model, "--recipe", str(RECIPE_DIR / "opt.yaml")]))
    assert explicit.quant.alpha == 0.5
    flags = resolved_config(parse(["run", "--model", model, "--weight-granularity", "per-tensor"]))
    assert flags.quant.weight_granularity == "per-tensor" and flags.quant.alpha == 0.85  # flags beat the recipe


def test_directory_checkpoint_recipe_from_config_json(tmp_path, no_weights):
    d = tmp_path / "some-name-that-says-nothing"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SHAPES["mistral-7b"]))  # a 7B config: nothing is allocated
    assert resolve_recipe(build_parser().parse_args(["smooth", "--model", str(d)])) == str(RECIPE_DIR / "mistral.yaml")


def test_gguf_recipe_from_its_metadata(smollm2, no_weights):
    args = build_parser().parse_args(["calibrate", "--model", str(smollm2)])
    assert resolve_recipe(args) == str(RECIPE_DIR / "llama.yaml")


def test_unsupported_architecture_refused_before_weights(tmp_path, no_weights, capsys):
    cfg = tmp_path / "bigcode.json"
    cfg.write_text('{"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": 32,'
                   ' "n_layer": 1, "n_head": 2, "vocab_size": 64, "n_positions": 64}')
    assert main(["calibrate", "--model", f"random:{cfg}", "--out", str(tmp_path), "-q"]) == 2
    assert "sq2trt/archs.py" in capsys.readouterr().err
    with pytest.raises(errors.UnsupportedArchitectureError, match="do_layer_norm_before"):
        recipe_for(budget.model_config(shape_json(tmp_path, "opt-350m")))


def test_makefile_recipe_is_auto_unless_given():
    def engine(*var):
        out = subprocess.run(["make", "-n", "engine", "MODEL=/models/x", *var], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "--recipe" not in engine()
    assert "--recipe recipes/opt.yaml" in engine("RECIPE=recipes/opt.yaml")
    ck = subprocess.run(["make", "-n", "checkpoint", "SHAPE=opt-1.3b"], cwd=ROOT, capture_output=True, text=True)
    assert "-m sq2trt.checkpoints --shape opt-1.3b --out build/models/opt-1.3b-random" in ck.stdout


# --------------------------------------------------------------------------- estimate
def test_opt_1_3b_estimate_in_range(tmp_path, no_weights):
    config = Config(model=shape_json(tmp_path, "opt-1.3b"))
    est = budget.estimate(config, ["fp", "O3"])
    assert abs(est.params.total - 1.3e9) / 1.3e9 < 0.03  # the public OPT-1.3B: 1,315,758,080
    assert 0.85 < est.params.gemm / est.params.total < 0.95  # the embedding (tied to lm_head) is the rest
    # peak RSS ~18.6 GiB measured on OPT-1.3B (budget.RAM_PER_FP32_WEIGHT_BYTE)
    assert 17 * budget.GIB < est.ram_bytes < 20 * budget.GIB
    assert set(est.disk) == {"base.onnx", "fp/ref.onnx", "fp/fp.ort.onnx", "O3/ref.onnx", "O3/O3.onnx",
                             "O3/O3.ort.onnx"}
    assert est.params.tied == 50272 * 2048  # OPT ties lm_head to the embedding: once in RAM and every graph
    fp32 = 4 * est.params.total
    other = est.params.total - est.params.gemm
    assert est.disk["base.onnx"] == fp32 and est.disk["O3/ref.onnx"] == fp32
    assert est.disk["O3/O3.onnx"] == est.params.gemm + 4 * other
    # ONNX Runtime's engine: lm_head's transpose of the tied embedding folded into a second constant
    assert est.disk["fp/fp.ort.onnx"] == fp32 + 4 * est.params.tied
    assert est.disk["O3/O3.ort.onnx"] == est.disk["O3/O3.onnx"] + 4 * est.params.tied
    # an FP16 checkpoint keeps its weights as stored in base.onnx, every ref.onnx and the Q/DQ graph (half the
    # bytes), and so does ONNX Runtime's engine (saved without constant folding)
    half = budget.estimate(config.replace(dtype="float16"), ["fp", "O3"])
    assert half.disk["base.onnx"] == half.disk["O3/ref.onnx"] == half.disk["fp/fp.ort.onnx"] == fp32 // 2
    assert half.disk["O3/O3.onnx"] == half.disk["O3/O3.ort.onnx"] == est.params.gemm + 2 * other
    declared = tmp_path / "opt-1.3b-fp16.json"
    declared.write_text(json.dumps({**SHAPES["opt-1.3b"], "torch_dtype": "float16"}))  # as checkpoints writes
    assert budget.estimate(Config(model=f"random:{declared}"), ["O3"]).disk["base.onnx"] == 2 * est.params.total
    trt = budget.estimate(config, ["O3"], ("onnx", "fp16", "plan"))
    assert trt.disk["O3/O3.fp16.onnx"] == trt.disk["O3/O3.plan"] < est.disk["O3/O3.onnx"]
    w4 = budget.estimate(config, ["W4A16"], ("onnx",))
    assert w4.disk["W4A16/W4A16.onnx"] < 0.8 * est.disk["O3/O3.onnx"]
    # fp and the levels without smoothing share one ref.onnx (hard links): counted once; smoothed ones each
    shared = budget.estimate(config, ["fp", "W8A8", "W8A8-dyn", "O3", "O1"], ("onnx",))
    assert [k for k in shared.disk if k.endswith("ref.onnx")] == ["fp/ref.onnx", "O3/ref.onnx", "O1/ref.onnx"]
    assert all(f"{lv}/{lv}.onnx" in shared.disk for lv in ("W8A8", "W8A8-dyn", "O3", "O1"))  # their own Q/DQ graphs
    fallback = budget.estimate(config.replace(quant={"fp_fallback": ["fc2"]}), ["O3"], ("onnx",))
    assert fallback.params.gemm < est.params.gemm and fallback.disk["O3/O3.onnx"] > est.disk["O3/O3.onnx"]


def test_every_public_shape_counts_its_published_size(no_weights):
    published = {"opt-125m": 125e6, "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9, "opt-6.7b": 6.7e9, "opt-13b": 13e9,
                 "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "mistral-7b": 7.24e9, "qwen2-0.5b": 0.494e9}
    from sq2trt.checkpoints import shape_config

    for shape, n in published.items():
        got = budget.count_params(shape_config(shape)).total
        assert abs(got - n) / n < 0.02, (shape, got)


# --------------------------------------------------------------------------- the check
def test_too_big_stops_before_any_weight_loads(tmp_path, monkeypatch, capsys, no_weights):
    model = shape_json(tmp_path, "opt-6.7b")
    monkeypatch.setattr(budget, "available_ram", lambda: 8 * budget.GIB)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 100)
    for cmd in (["calibrate"], ["run", "--levels", "fp,O3"], ["export"]):
        rc = main([*cmd, "--model", model, "--calib-data", str(calib), "--out", str(tmp_path / "b"), "-q"])
        assert rc == errors.ResourceBudgetError.exit_code == 5, cmd
        err = capsys.readouterr().err
        assert "host RAM: needs about 9" in err and "8.0 GiB available" in err and "6.658 B parameters" in err
        assert "--no-resource-check" in err
    # the escape hatches: the run goes on to load the model (here: the test's refusal)
    for extra, env in ((["--no-resource-check"], {}), ([], {budget.SKIP_ENV: "1"})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        rc = main(["calibrate", "--model", model, "--calib-data", str(calib), "--out", str(tmp_path / "b"), "-q", *extra])
        assert rc == 2 and "weights were loaded" in capsys.readouterr().err
        monkeypatch.delenv(budget.SKIP_ENV, raising=False)


def test_disk_and_gpu_shortfalls_say_what_to_pass(tmp_path, monkeypatch, capsys, no_weights):
    model = "random:llama"
    monkeypatch.setattr(budget, "available_disk", lambda out: (10_000, Path("/the/disk")))
    assert main(["export", "--model", model, "--out", str(tmp_path), "-q"]) == 5
    err = capsys.readouterr().err
    assert "disk: needs about" in err and "on /the/disk" in err and "--out on a disk" in err and "host RAM" not in err
    assert main(["calibrate", "--model", model, "--out", str(tmp_path), "-q"]) != 5  # writes no ONNX: no disk need
    capsys.readouterr()
    est = budget.estimate(Config(model=model), ["O3"])
    tight = budget.Available(10**12, 10**12, Path("/"), 0, gpu_bytes=1)
    with pytest.raises(errors.ResourceBudgetError, match="GPU memory.*--device cpu"):
        budget.check(est, tight)
    budget.check(est, budget.Available(10**12, 10**12, Path("/"), 0, gpu_bytes=None))  # no GPU in use: not checked


def test_existing_artifacts_count_as_available(tmp_path):
    (tmp_path / "random-llama" / "O3").mkdir(parents=True)
    (tmp_path / "random-llama" / "O3" / "ref.onnx").write_bytes(b"x" * 4096)
    before = budget.available_disk(tmp_path)[0]
    a = budget.available(tmp_path, "random:llama")
    after = budget.available_disk(tmp_path)[0]  # other processes may write meanwhile: free space between the two
    assert a.reusable_bytes == 4096 and min(before, after) + 4096 <= a.disk_bytes <= max(before, after) + 4096
    assert budget.available_disk(tmp_path / "not" / "yet")[1] == tmp_path


def test_plan_resources_prints_and_gates(tmp_path, monkeypatch, capsys, no_weights):
    model = shape_json(tmp_path, "llama-2-7b")
    monkeypatch.setattr(budget, "available_ram", lambda: 10**15)
    monkeypatch.setattr(budget, "available_disk", lambda out: (10**15, tmp_path))
    assert main(["plan-resources", "--model", model, "--levels", "fp,O3", "--backend", "trt", "--out", str(tmp_path),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM, 6.738 B parameters" in out and "| host RAM |" in out and "DOES NOT FIT" not in out
    assert "O3/O3.plan" in out and "fp/ref.onnx" in out
    monkeypatch.setattr(budget, "available_ram", lambda: 1)
    assert main(["plan-resources", "--model", model, "--out", str(tmp_path), "-q"]) == 5
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_unreadable_configs_are_bad_input(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "no-such-type"}')
    with pytest.raises(errors.ModelNotFoundError, match="must be a transformers config"):
        budget.model_config(f"random:{bad}")
    with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
        budget.model_config(str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    with pytest.raises(errors.ModelNotFoundError, match="Provide it locally"):
        budget.model_config("sq2trt-test/definitely-not-a-model")
    # a rewritten config is read again, not served from the cache
    good = tmp_path / "m.json"
    good.write_text(json.dumps(TINY_CONFIGS["opt"]))
    assert budget.model_config(f"random:{good}").num_hidden_layers == 2
    good.write_text(json.dumps({**TINY_CONFIGS["opt"], "num_hidden_layers": 3, "ffn_dim": 256}))
    assert budget.model_config(f"random:{good}").num_hidden_layers == 3
