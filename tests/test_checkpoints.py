"""Random-weight checkpoints of public shapes (sq2trt.checkpoints): they load offline with the
field's own loaders, keep the public shapes, carry the planted outliers, and are never half-written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sq2trt import checkpoints, errors
from sq2trt.checkpoints import META_FILE, OUTLIER_RANGE, SHAPES, main, shape_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def public_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the full public model, built on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def opt125(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "opt-125m-random"
    script = ROOT / "scripts" / "random_checkpoint.py"
    subprocess.run([sys.executable, str(script), "--shape", "opt-125m", "--layers", "1", "--outliers", "4",
                    "--seed", "3", "--out", str(out)], check=True, capture_output=True)
    return out


def check_loads_with_public_shapes(out: Path, shape: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == dtype and model.config.num_hidden_layers == 1
    public = public_shapes(shape)
    for name, t in model.state_dict().items():
        assert tuple(t.shape) == public[name], name  # every tensor exists in the public model, same shape
    assert len(public) > len(model.state_dict())  # ... which has more layers
    ids = tok("Ünïcode text, and <|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[:2] == list("Ü".encode()) and ids[-1] == 256 and max(ids) < model.config.vocab_size
    assert tok.decode(ids[:-1]) == "Ünïcode text, and "
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    return model


def check_outliers(model: torch.nn.Module, meta: dict, n: int) -> None:
    from sq2trt.archs import get_arch, decoder_layers

    planted = meta["outliers"]
    assert len(planted["channels"]) == n == len(set(planted["channels"]))
    lo, hi = OUTLIER_RANGE
    for layer in decoder_layers(model, get_arch(model)):
        for norm in planted["norms"]:
            w = layer.get_submodule(norm).weight.float()
            out = w[planted["channels"]]
            assert torch.allclose(out, torch.tensor(planted["factors"]), rtol=1e-2)
            assert (out >= lo * 0.99).all() and (out <= hi * 1.01).all()
            rest = torch.ones_like(w, dtype=torch.bool)
            rest[planted["channels"]] = False
            assert (w[rest] == 1).all()  # transformers initialises norm weights to 1


def test_opt_125m_one_layer_loads_with_public_shapes_and_outliers(opt125):
    model = check_loads_with_public_shapes(opt125, "opt-125m", torch.float16)
    meta = json.loads((opt125 / META_FILE).read_text())
    assert meta["shape"] == "opt-125m" and meta["public_layers"] == 12 and meta["seed"] == 3
    assert meta["outliers"]["norms"] == ["self_attn_layer_norm", "final_layer_norm"]
    check_outliers(model, meta, 4)
    assert list(opt125.glob("*.safetensors")) and not list(opt125.parent.glob(".tmp-*"))


def test_sq2trt_reads_the_checkpoint(opt125):
    """What `sq2trt run --model DIR` needs: the recipe from config.json, an estimate from it, and
    sq2trt's own loader with the saved tokenizer."""
    from sq2trt.budget import estimate
    from sq2trt.cli import RECIPE_DIR, build_parser, resolve_recipe
    from sq2trt.config import Config
    from sq2trt.data import tokenize
    from sq2trt.models import load_model

    assert resolve_recipe(build_parser().parse_args(["run", "--model", str(opt125)])) == str(RECIPE_DIR / "opt.yaml")
    loaded = load_model(str(opt125))
    assert estimate(Config(model=str(opt125)), ["O3"]).params.total == loaded.model.num_parameters()
    ids = tokenize("hello", loaded.tokenizer)
    assert ids.tolist() == list(b"hello")


def test_sq2trt_exports_it_and_the_disk_estimate_holds(opt125, tmp_path, calib_text, eval_text):
    """`sq2trt export --model DIR` on the checkpoint; the files it writes are the sizes sq2trt.budget
    predicted (a 1-layer OPT-125m shape: the tied 50k-token embedding dominates, as in real models)."""
    from sq2trt.budget import estimate
    from sq2trt.cli import build_parser, main as cli_main, resolved_config
    from sq2trt.models import model_name

    args = ["export", "--model", str(opt125), "--level", "O3", "--calib-data", str(calib_text),
            "--calib-num-samples", "2", "--calib-seq-len", "32", "--eval-data", str(eval_text), "--out", str(tmp_path),
            "-q"]
    assert cli_main(args) == 0
    est = estimate(resolved_config(build_parser().parse_args(args)), ["O3"], ("onnx",))
    assert set(est.disk) == {"base.onnx", "O3/ref.onnx", "O3/O3.onnx"}
    for name, predicted in est.disk.items():
        size = (tmp_path / model_name(str(opt125)) / name).stat().st_size
        assert abs(size - predicted) < 0.02 * predicted, (name, size, predicted)


def test_rmsnorm_family_bfloat16_tied_embeddings(tmp_path):
    out = tmp_path / "qwen"
    assert main(["--shape", "qwen2-0.5b", "--layers", "1", "--outliers", "2", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    model = check_loads_with_public_shapes(out, "qwen2-0.5b", torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, as public
    meta = json.loads((out / META_FILE).read_text())
    assert meta["outliers"]["norms"] == ["input_layernorm", "post_attention_layernorm"]
    check_outliers(model, meta, 2)


def test_no_outliers_by_default_and_layers_bounds(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"--layers must be in \[1, 12\]"):
        shape_config("opt-125m", layers=13)
    with pytest.raises(errors.ConfigError, match="unknown shape"):
        shape_config("opt-175b")
    with pytest.raises(errors.ConfigError, match="--outliers must be in"):
        write_checkpoint("opt-125m", tmp_path / "x", layers=1, outliers=10_000)
    assert not (tmp_path / "x").exists()


def test_never_half_written(tmp_path, monkeypatch, opt125, capsys):
    out = tmp_path / "m"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "plant_outliers", boom)
    with pytest.raises(errors.OutputDirError, match="was left as it was"):
        write_checkpoint("opt-125m", out, layers=1, outliers=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # an existing directory is kept unless --force, and replaced whole with it
    assert main(["--shape", "opt-125m", "--layers", "1", "--out", str(opt125)]) == 2
    assert "--force" in capsys.readouterr().err
    before = json.loads((opt125 / META_FILE).read_text())
    monkeypatch.undo()
    assert main(["--shape", "opt-125m", "--layers", "1", "--seed", "3", "--outliers", "4", "--force",
                 "--out", str(opt125)]) == 0
    assert json.loads((opt125 / META_FILE).read_text()) == before  # same seed: same checkpoint
    assert sorted(p.name for p in opt125.parent.iterdir()) == [opt125.name]


def test_every_shape_has_the_public_architecture_fields():
    for shape, d in SHAPES.items():
        config = shape_config(shape)
        assert config.architectures == d["architectures"] and config.num_hidden_layers == d["num_hidden_layers"]
        if d["model_type"] == "opt":
            assert config.do_layer_norm_before == (shape != "opt-350m")
            assert config.word_embed_proj_dim == (512 if shape == "opt-350m" else config.hidden_size)
            assert config.ffn_dim == 4 * config.hidden_size
