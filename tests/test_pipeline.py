"""The whole flow through the CLI on a tiny model: artifacts, reuse by config hash, recipes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sq2trt.artifacts import read_meta
from sq2trt.cli import build_parser, config_from_args, main
from sq2trt.config import Config, dump_recipe, load_recipe

from conftest import tiny_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, request):
    from conftest import data_file

    calib = data_file("wikitext2_tokenized/valid.txt")
    evalp = data_file("wikitext2_raw_test/wiki.test.raw")
    out = tmp_path_factory.mktemp("build")
    args = ["--model", "random:llama", *tiny_args(calib, evalp, out)]
    assert main(["run", "--levels", "O3,fp,W8A8", *args]) == 0
    return out, args


def test_run_writes_every_artifact(tiny_run):
    out, _ = tiny_run
    model_dir = out / "random-llama"
    assert (model_dir / "act_stats.safetensors").is_file() and (model_dir / "base.onnx").is_file()
    for level in ("fp", "W8A8", "O3"):
        d = model_dir / level
        for name in ("ref.onnx", f"{level}.ort.onnx", "compare.json", "report.json", "report.md"):
            assert (d / name).is_file(), d / name
        assert not list(d.glob(".tmp-*")), "temporary files left behind"
        rep = json.loads((d / "report.json").read_text())
        assert rep["schema_version"] >= 1 and rep["level"] == level
        ppl = rep["compare"]["ppl"]
        assert 1.0 < ppl["reference"] < 1e4 and 1.0 < ppl["engine"] < 1e4
    assert (model_dir / "O3" / "O3.onnx").is_file() and (model_dir / "O3" / "smooth_scales.safetensors").is_file()
    assert not (model_dir / "W8A8" / "smooth_scales.safetensors").exists()  # naive: no smoothing
    fp = json.loads((model_dir / "fp" / "compare.json").read_text())
    assert fp["logits"]["max_abs"] == 0.0 and fp["logits"]["top1_agreement"] == 1.0
    o3 = json.loads((model_dir / "O3" / "compare.json").read_text())
    assert 0 < o3["logits"]["rel_l2"] < 0.2 and o3["export_check"]["passed"]
    assert o3["export_check"]["weights_only_max_rel"] < 1e-5 and o3["export_check"]["act_max_step_diff"] <= 1.0
    summary = (model_dir / "summary.md").read_text()
    assert all(f"| {lv} |" in summary for lv in ("fp", "W8A8", "O3"))
    assert summary.index("| fp |") < summary.index("| O3 |")


def test_levels_with_the_same_reference_share_one_file(tiny_run, tmp_path):
    """fp and W8A8 (no smoothing) have one reference: W8A8's ref.onnx is fp's file, linked, not a second
    export; O3's smoothed reference is its own. Replacing one level's copy leaves the other intact."""
    import os

    out, _ = tiny_run
    model_dir = out / "random-llama"
    fp, w8, o3 = (model_dir / lv / "ref.onnx" for lv in ("fp", "W8A8", "O3"))
    assert os.path.samefile(fp, w8) and fp.stat().st_nlink == 2
    assert not os.path.samefile(fp, o3)
    shared = read_meta(w8)
    assert shared["config_hash"] == read_meta(fp)["config_hash"] and shared["shared_from"] in ("fp", "W8A8")
    assert "shared_from" not in read_meta(o3)
    # one copy replaced the way every writer replaces a file (artifacts.producing: the stamp removed, a new
    # file renamed over it): the other keeps its bytes, and the unstamped copy is shared no further
    from sq2trt.artifacts import producing, share, stamp

    copy = tmp_path / "W8A8" / "ref.onnx"
    assert share(w8, copy, read_meta(w8)["config_hash"]) and os.path.samefile(copy, w8)
    before = w8.read_bytes()
    with producing(copy) as tmp:
        tmp.write_bytes(b"other")
    assert w8.read_bytes() == before and copy.read_bytes() == b"other"
    assert not share(copy, tmp_path / "x.onnx", read_meta(w8)["config_hash"])  # unstamped: not vouched for
    stamp(copy, "another-hash")
    assert not share(copy, tmp_path / "x.onnx", read_meta(w8)["config_hash"]) and not (tmp_path / "x.onnx").exists()


def test_rerun_reuses_matching_artifacts_only(tiny_run, caplog):
    out, args = tiny_run
    o3 = out / "random-llama" / "O3"
    before = {p.name: p.stat().st_mtime_ns for p in o3.iterdir()}
    stats_before = (out / "random-llama" / "act_stats.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["compare", "--level", "O3", *args]) == 0
    assert "reusing" in caplog.text
    assert (o3 / "compare.json").stat().st_mtime_ns == before["compare.json"]
    # a new alpha: calibration statistics are reused, smoothing and everything after it is redone
    assert main(["export", "--level", "O3", "--alpha", "0.3", *args]) == 0
    assert (out / "random-llama" / "act_stats.safetensors").stat().st_mtime_ns == stats_before
    assert read_meta(o3 / "smooth_scales.safetensors")["alpha"] == 0.3
    assert (o3 / "O3.onnx").stat().st_mtime_ns != before["O3.onnx"]


def test_flags_override_recipe_and_recipes_round_trip(tmp_path):
    recipe = ROOT / "recipes" / "llama.yaml"
    args = build_parser().parse_args(["run", "--model", "random:llama", "--recipe", str(recipe), "--alpha", "0.6"])
    cfg = config_from_args(args)
    assert cfg.quant.alpha == 0.6 and cfg.calib.num_samples == load_recipe(recipe)["calib"]["num_samples"]
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if path.name == "thresholds.yaml":
            continue
        c = Config.from_dict(load_recipe(path))
        dump_recipe(c, tmp_path / path.name)
        assert Config.from_dict(load_recipe(tmp_path / path.name)) == c, path.name
        assert Config.from_dict(c.to_dict()) == c


def test_unsmoothed_static_max_scales_come_from_the_per_channel_statistics(tmp_path, calib_text, eval_text):
    """W8A8 (static per-tensor max, no smoothing) takes its activation scales from the per-channel max |x| that
    calibration already collected; they equal a second calibration pass's per-tensor max exactly."""
    from sq2trt.calibrate import collect, per_tensor_absmax
    from sq2trt.pipeline import Pipeline

    args = build_parser().parse_args(["export", "--model", "random:llama", "--level", "W8A8",
                                      *tiny_args(calib_text, eval_text, tmp_path)])
    pipe = Pipeline(config_from_args(args), tmp_path)
    assert not pipe.scheme.smooth and pipe.config.quant.act_clip == "max"
    scales = pipe.act_scales()
    names = pipe.gemm_names(with_fallback=True)
    direct = collect(pipe.loaded.model, names, pipe._windows("calib"), per_tensor_absmax)
    assert sorted(scales) == sorted(names) and len(names) > 0
    assert all(scales[k] == float(direct[k]) for k in names), {k: (scales[k], float(direct[k])) for k in names}
