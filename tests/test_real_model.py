"""The real SmolLM2-135M model: the README's main command, every level of the README's table, and
zero-shot COPA, each with a small budget. Bounds come from measurement (stated beside each).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import data_file

ROOT = Path(__file__).resolve().parents[1]


# Measured: with recipes/llama.yaml (per-channel weights, norm + down_proj folds, alpha 0.85) at this
# budget (32 x 512 calibration tokens, 4 x 1024 evaluation tokens) O3 is +4.8% perplexity (23.09 ->
# 24.20; again 1.0484 x fp in December through every_level below, same configuration) with 90.2% (89.8%)
# top-1 agreement on 2 x 128 tokens; with 8 x 256 calibration tokens it was +16.4% (the rare large
# down_proj activations need the text). Bounds: perplexity <= 1.048 x 1.02 = 1.07 x fp (ONNX Runtime's
# fused INT8 CPU kernels move a perplexity by up to ENGINE_PPL_RTOL = 2% between CPUs: sq2trt.evaluate),
# top-1 >= 0.84 (89.8% less three binomial standard deviations on 256 tokens, 3 x 1.9%). The paper's O3
# (+127% here) or a broken export (a wrong scale, axis or weight sends a 135M model's perplexity into the
# hundreds) fails. Measured again 2026-12-02 with the paired comparison (sq2trt.stats; the numbers
# .ci/thresholds.yaml gates): +4.14% (95% interval +2.90% to +5.40%) and top-1 agreement 89.2% (87.8% to
# 90.5%) over all 4,092 evaluation tokens, Polygraphy's 88.7% on 256; the FP16 TensorRT input +4.43% on
# the first 2 windows.
O3_MAX_PPL_RATIO = 1.07
O3_MIN_TOP1 = 0.84


@pytest.fixture(scope="module")
def smollm2_out(tmp_path_factory):
    """One build directory for this module: `make engine` (fp, O3) writes it first, and `sq2trt run` over
    every README level then reuses fp, O3, the base export and the calibration statistics (same
    configuration, same config hashes) instead of building them again. ~10 GB: removed afterwards."""
    out = tmp_path_factory.mktemp("smollm2-build")
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _keep_reports(model_dir: Path, dest: Path) -> None:
    """Copy the reports (not the GB of ONNX) to ``dest``/<model>/: CI gates and keeps them."""
    for f in model_dir.rglob("*"):
        if f.is_file() and (f.name.startswith("report.") or f.name == "summary.md" or f.suffix == ".png"):
            target = dest / model_dir.name / f.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


@pytest.fixture(scope="module")
def made_engine(smollm2, smollm2_out):
    """`make engine` at the CI budget (fp, O3) into this module's build directory: the model directory."""
    calib_text = data_file("wikitext2_tokenized/valid.txt")
    eval_text = data_file("wikitext2_raw_test/wiki.test.raw")
    out = smollm2_out
    models = smollm2.parent.parent  # build/models (make fetch-model layout) or wherever it lives
    cmd = ["make", "engine", f"OUT={out}", f"MODELS={models}", f"CALIB={calib_text}", f"EVAL={eval_text}",
           "LEVELS=fp,O3", "CALIB_SAMPLES=32", "CALIB_LEN=512", "EVAL_TOKENS=4096", "EVAL_WINDOW=1024",
           "EXTRA=-q --eval-compare-samples 2"]
    assert smollm2.parent.name == "smollm2", ("the make target expects <MODELS>/smollm2/<file>.gguf; set "
                                              "SQ2TRT_SMOLLM2 accordingly")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = next(out.glob("smollm2*"))
    if os.environ.get("SQ2TRT_CI_OUT"):  # copied now, before later tests add levels to the directory
        _keep_reports(model_dir, Path(os.environ["SQ2TRT_CI_OUT"]))
    return model_dir


@pytest.mark.slow
def test_make_engine_on_smollm2(made_engine):
    # CI sets SQ2TRT_CI_OUT so the reports outlive the test: .ci/run gates them with
    # `sq2trt report --check .ci/thresholds.yaml` and keeps them as CI output.
    model_dir = made_engine
    fp = json.loads((model_dir / "fp" / "report.json").read_text())["compare"]
    o3 = json.loads((model_dir / "O3" / "report.json").read_text())["compare"]
    ppl_fp, ppl_o3 = fp["ppl"]["engine"], o3["ppl"]["engine"]
    assert 5 < ppl_fp < 60, ppl_fp  # a real pretrained 135M model on wikitext-2
    assert math.isfinite(ppl_o3) and ppl_o3 < O3_MAX_PPL_RATIO * ppl_fp, (ppl_fp, ppl_o3)
    assert o3["ppl"]["reference"] == pytest.approx(ppl_fp, rel=1e-4)  # smoothing is exact
    assert o3["logits"]["top1_agreement"] >= O3_MIN_TOP1
    assert o3["export_check"]["passed"], o3["export_check"]
    assert (model_dir / "summary.md").is_file()
    # the default report: paired intervals on every evaluation token, the per-layer diagnosis and its plot,
    # and the FP16 graph TensorRT is given, scored (sq2trt.evaluation.score_fp16)
    o3_rep = json.loads((model_dir / "O3" / "report.json").read_text())
    inc, top1 = o3["paired"]["ppl_increase"], o3["paired"]["top1_agreement"]
    assert inc["lo"] < o3["ppl_increase"] < inc["hi"] and inc["tokens"] == 4 * 1023, inc
    assert top1["lo"] < top1["value"] < top1["hi"] and top1["value"] >= O3_MIN_TOP1, top1
    assert o3_rep["diagnosis"]["gemms"] and (model_dir / "O3" / o3_rep["plots"]["per-layer error"]).is_file()
    f16 = o3_rep["fp16"]["paired"]
    assert o3_rep["fp16"]["windows"] >= 1 and f16["ppl_engine"] < O3_MAX_PPL_RATIO * f16["ppl_reference"], f16
    assert "INT8 per-channel weights" in o3_rep["level_description"], o3_rep["level_description"]


# --------------------------------------------------------------------------- every level of the README
def readme_levels() -> list[str]:
    """The levels of the README's table (a level added there is built here too)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- levels:start -->\n(.*?)\n<!-- levels:end -->", text, re.S)
    assert m, "README.md lost its <!-- levels:start/end --> markers"
    return [row.split("|")[1].strip() for row in m.group(1).splitlines()[2:]]


# The budget: fp and O3 are `make engine`'s above (4 x 1024 evaluation tokens). Every other level is built
# with the same calibration (32 x 512 tokens; the base export and the calibration statistics are reused)
# and scored on one 1,024-token window: enough to see a level regress, at a quarter of the time. The
# SmoothQuant+ alpha search (W4A16, W4A16-asym) runs the whole model 21 times over its calibration
# windows: 4 x 256 tokens there.
CALIB = ("32", "512")
SEARCH_CALIB = ("4", "256")
EVAL = ["--eval-max-tokens", "1024", "--eval-window", "1024", "--eval-compare-samples", "2"]
MADE = ("fp", "O3")  # built by `make engine` (made_engine)
# Measured perplexity / fp perplexity of each level's ONNX Runtime engine at its budget (fp and O3 on 4
# windows, the others on the first), and the bound (x 1.05: ONNX Runtime's fused INT8 CPU kernels move a
# perplexity by up to 2% between CPUs, see sq2trt.evaluate.ENGINE_PPL_RTOL, plus 3% for the rest). Measured
# on a 2-core AVX2 CPU, recipes/llama.yaml (per-channel INT8 weights, norm + down_proj folds). A level that
# regresses by more than ~5%, a wrong export or a level that stops quantizing what it names fails.
# Measured 2026-12-08 (the first window's float perplexity is 13.70, the four windows' 23.09):
MEASURED_RATIO = {"fp": 1.0, "O3": 1.0414, "W8A8": 2.574, "W8A8-dyn": 1.876, "ZeroQuant": 1.045, "O1": 1.017,
                  "O2": 1.071, "W4-RTN": 1.582, "W4A16": 2.559, "W4A16-asym": 1.592}
RATIO_MARGIN = 1.05


def _sq2trt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sq2trt", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def every_level(smollm2, made_engine, smollm2_out):
    """``sq2trt run`` over the README levels `make engine` did not build, on SmolLM2 (recipes/llama.yaml,
    the recipe `make engine` picks for it): (model dir, reports of every README level, seconds, flags)."""
    calib = data_file("wikitext2_tokenized/valid.txt")
    evalp = data_file("wikitext2_raw_test/wiki.test.raw")
    out = smollm2_out
    from sq2trt.config import get_level

    levels = readme_levels()
    searched = [lv for lv in levels if get_level(lv).alpha_search]
    common = ["--model", str(smollm2), "--recipe", str(ROOT / "recipes" / "llama.yaml"), "--out", str(out),
              "--calib-data", str(calib), "--eval-data", str(evalp), *EVAL, "-q"]
    seconds = {}
    for name, group, (n, length) in (("levels", [lv for lv in levels if lv not in (*searched, *MADE)], CALIB),
                                     ("searched", searched, SEARCH_CALIB)):
        t = time.perf_counter()
        # the per-layer diagnosis and FP16 score (test_make_engine_on_smollm2 checks them on O3) would add
        # ~1 min a level: left out here
        proc = _sq2trt("run", *common, "--levels", ",".join(group), "--calib-num-samples", n, "--calib-seq-len", length,
                       "--no-report-extras")
        seconds[name] = round(time.perf_counter() - t, 1)
        assert proc.returncode == 0, f"sq2trt run --levels {','.join(group)}: exit {proc.returncode}\n" + \
            proc.stdout[-3000:] + proc.stderr[-5000:]
    model_dir = made_engine
    reports = {lv: json.loads((model_dir / lv / "report.json").read_text()) for lv in levels}
    return model_dir, reports, seconds, common


@pytest.mark.slow
def test_every_readme_level_builds_and_checks_out_on_smollm2(every_level):
    """Every level of the README's table through `sq2trt run` on the real model: each export check passes
    (O1, O2 and ZeroQuant used to be refused with exit 4 by a weights-only check that still rounded
    their activations), smoothing is exact, and each engine's perplexity over the float reference's on the
    same tokens is within 5% of what it measured. Levels without smoothing share fp's reference file.
    (W4A16's alpha searched on 4 x 256 tokens is worse than plain W4-RTN here: that budget is too small for
    the search to generalise; docs/levels.md has it at 16 x 512.)"""
    from sq2trt.config import get_level

    model_dir, reports, seconds, _ = every_level
    print(f"\nsq2trt run seconds: {seconds}")
    # the float reference's perplexity on each budget's tokens: fp's (4 windows) and an unsmoothed level's (1)
    unsmoothed = [lv for lv in reports if lv not in MADE and not get_level(lv).smooth]
    fp = {4: reports["fp"]["compare"]["ppl"]["engine"], 1: reports[unsmoothed[0]]["compare"]["ppl"]["reference"]}
    assert all(5 < v < 60 for v in fp.values()), fp  # a real pretrained 135M model on wikitext-2
    for level, rep in reports.items():
        c = rep["compare"]
        ref = fp[c["eval"]["windows"]]
        assert c["eval"]["windows"] == (4 if level in MADE else 1), (level, c["eval"])
        ppl, top1 = c["ppl"]["engine"], c["logits"]["top1_agreement"]
        print(f"{level}: ppl {ppl:.3f} ({ppl / ref:.4f} x fp on {c['eval']['windows']} windows), top-1 {top1:.4f}, "
              f"rel L2 {c['logits']['rel_l2']:.4f}, export check {c['export_check']}")
        assert math.isfinite(ppl) and ppl / ref <= MEASURED_RATIO[level] * RATIO_MARGIN, (level, ppl / ref)
        assert c["ppl"]["reference"] == pytest.approx(ref, rel=1e-4), level  # smoothing is exact
        if not get_level(level).smooth:  # the same reference: one file, linked (Pipeline._share)
            assert os.path.samefile(model_dir / level / "ref.onnx", model_dir / "fp" / "ref.onnx"), level
        if level == "fp":
            continue
        assert c["export_check"] and c["export_check"]["passed"], (level, c["export_check"])
        # the layer-0 activation comparison ran wherever activations are quantized, dynamic ones too
        assert (c["export_check"]["act_elements"] > 0) == (get_level(level).act is not None), level
    assert set(reports) == set(readme_levels()) == set(MEASURED_RATIO)
    summary = (model_dir / "summary.md").read_text()
    assert all(f"| {lv} |" in summary for lv in ("W4A16", "W4A16-asym"))


# COPA (all 100 items, lm-eval's prompt), measured on the float engine and each level's engine at the
# budget above: float acc 0.64 (chance 0.5; `sq2trt evaluate`'s PyTorch float model 0.64 too). Items on
# which an engine picks the same choice as the float engine: O3 0.93, O1 0.97, ZeroQuant 0.98, O2 0.86,
# W8A8-dyn 0.75, W8A8 0.74, W4A16-asym 0.85, W4-RTN 0.86, W4A16 0.77. Accuracy alone cannot judge a level
# on 100 items (O3 0.67, W8A8 0.56, stderr 0.05, and a damaged engine can gain as often as it loses), the
# paired agreement can: the bounds below leave 5 items for other CPUs' kernels, and W8A8 (+148%
# perplexity) fails them by 14.
COPA_MIN_FP_ACC = 0.58
COPA_MIN_AGREEMENT = {"O3": 0.88, "O1": 0.92}


@pytest.mark.slow
def test_smollm2_copa_engines_choose_as_float(every_level, smollm2):
    """`sq2trt evaluate --tasks copa` on the real O3 engine, and each engine's choice per item against the
    float engine's."""
    from sq2trt.engine import session
    from sq2trt.evaluate import ort_logits_fn
    from sq2trt.models import load_model
    from sq2trt.tasks import load_copa, score_examples

    model_dir, _, _, common = every_level
    copa = data_file("copa/test.jsonl")
    # the O3 engine the fixture built (calibration, not evaluation settings, make an engine); this test judges
    # COPA, so the perplexities `evaluate` also reports are taken on one 1,024-token window instead of four
    proc = _sq2trt("evaluate", *common, "--level", "O3", "--calib-num-samples", CALIB[0], "--calib-seq-len", CALIB[1],
                   "--eval-max-tokens", "1024", "--tasks", "copa", "--task-data", str(copa.parents[1]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ev = json.loads((model_dir / "O3" / "eval.json").read_text())
    assert ev["agreement"]["export_check"]["passed"]
    task = ev["tasks"]["copa"]
    assert task["n"] == 100 and task["torch_fp"]["acc"] >= COPA_MIN_FP_ACC, task
    # the drop's paired interval (Newcombe) holds the drop, from the items the two answer differently
    pr = task["paired"]["acc"]
    assert pr["items"] == 100 and pr["lo"] <= task["acc_drop"] <= pr["hi"] < pr["lo"] + 0.3, pr

    examples = load_copa(copa)
    tok = load_model(str(smollm2)).tokenizer
    picks, accs = {}, {}
    for level in ("fp", *COPA_MIN_AGREEMENT):
        engine = model_dir / level / f"{level}.ort.onnx"
        res, lls = score_examples("copa", examples, ort_logits_fn(session(engine, device="cpu")), tok)
        picks[level], accs[level] = np.array([int(np.argmax(ll)) for ll in lls]), res.acc
    assert accs["O3"] == task["engine"]["acc"]  # eval.json scored the shipped engine
    assert abs(accs["fp"] - task["torch_fp"]["acc"]) <= 0.02  # float engine vs PyTorch float: close items only
    for level, bound in COPA_MIN_AGREEMENT.items():
        agreement = float((picks[level] == picks["fp"]).mean())
        assert agreement >= bound, (level, agreement)
