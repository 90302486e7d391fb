"""The accuracy gate judges measured values with confidence intervals (sq2trt.stats), and each gate
trips on a planted regression in a real pipeline run on a tiny model, while the unplanted run passes.

The tiny model: random:llama's config and weights with the SmoothQuant paper's phenomenon planted
*exactly*: 4 hidden channels of every input norm are multiplied by 100 and the matching input columns
of the Linears that read the norm divided by 100, so the float model computes what it computed before,
but the GEMM inputs have persistent 100x outlier channels that carry a normal share of the signal.
Static per-tensor INT8 then rounds the other 60 channels to a step or two, unless smoothing migrates
the outliers into the weights: dropping the smoothing is a real, measurable regression here (on
random:llama without this it is not).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sq2trt.errors import AccuracyGateError
from sq2trt.gate import (FAIL, PASS, TOO_SMALL, Check, EvaluationTooSmallError, Thresholds, check_report, enforce,
                         report_metrics)
from sq2trt.stats import (agreement_ci, block_sums, design_effect, paired_drop_ci, paired_ppl_increase, ratio_ci,
                          rel_l2_ci, t_quantile, wilson)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("df,want", [(1, 12.706205), (3, 3.182446), (10, 2.228139), (30, 2.042272),
                                     (1000, 1.962339)])
def test_t_quantile_matches_tables(df, want):
    assert t_quantile(0.975, df) == pytest.approx(want, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-want, abs=2e-6)


def test_ratio_ci_is_the_t_interval_for_equal_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 12)
    r, lo, hi = ratio_ci(x * 5, np.full(12, 5.0))
    half = t_quantile(0.975, 11) * x.std(ddof=1) / math.sqrt(12)
    assert r == pytest.approx(x.mean()) and lo == pytest.approx(x.mean() - half) and hi == pytest.approx(x.mean() + half)
    assert ratio_ci([1.0], [2.0])[1:] == (-math.inf, math.inf)  # one block: no spread to estimate from


def test_paired_ppl_increase_is_the_exact_ratio_and_covers_the_truth():
    rng = np.random.default_rng(1)
    counts = np.array([128] * 7 + [127])  # one 1024-token window cut into blocks
    ref = rng.gamma(3.0, 1.0, counts.size) * counts
    eng = ref * 1.05
    d = paired_ppl_increase(ref, eng, counts)
    assert d["value"] == pytest.approx(math.exp((eng.sum() - ref.sum()) / counts.sum()) - 1)
    assert d["ppl_engine"] / d["ppl_reference"] - 1 == pytest.approx(d["value"])
    assert d["tokens"] == 1023 and d["blocks"] == 8 and d["lo"] <= d["value"] <= d["hi"]
    # coverage: blocks whose per-token log-ratio is drawn around a known mean; the 95% interval must contain
    # it about 95% of the time (400 trials: a correct interval lands in [0.92, 0.98] with probability > 0.99)
    true, hits = 0.02, 0
    for _ in range(400):
        n = rng.integers(60, 129, 16).astype(float)
        r_nll = rng.gamma(3.0, 1.0, 16) * n
        e_nll = r_nll + n * (true + rng.normal(0, 0.05, 16)) + rng.normal(0, 1.0, 16) * np.sqrt(n)
        x = paired_ppl_increase(r_nll, e_nll, n)
        hits += x["lo"] <= math.expm1(true) <= x["hi"]
    assert 0.92 <= hits / 400 <= 0.98, hits


def test_wilson_interval_known_values():
    p, lo, hi = wilson(0, 10)
    z2 = 1.959964 ** 2
    assert p == 0 and lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(z2 / (10 + z2), rel=1e-6)
    p, lo, hi = wilson(50, 100)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.40383, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_agreement_interval_accounts_for_correlated_blocks():
    """Whole blocks agreeing or not (maximal correlation) must widen the interval by the block size's
    square root; independent tokens must not; and the widened interval covers the truth ~95%."""
    rng = np.random.default_rng(2)
    n = np.full(40, 128)
    indep = rng.binomial(128, 0.9, 40)
    assert design_effect(indep, n) < 2.0
    clustered = 128 * rng.binomial(1, 0.9, 40)
    assert design_effect(clustered, n) > 100
    hits = naive_hits = 0
    for _ in range(300):
        p_block = np.clip(rng.normal(0.9, 0.05, 40), 0, 1)  # agreement rate varies by passage
        k = rng.binomial(128, p_block)
        a = agreement_ci(k, n)
        hits += a["lo"] <= 0.9 <= a["hi"]
        _, lo, hi = wilson(k.sum(), n.sum())
        naive_hits += lo <= 0.9 <= hi
    assert 0.9 <= hits / 300 <= 0.99, hits
    assert naive_hits / 300 < 0.8, naive_hits  # the plain Wilson interval would be far too narrow here


def test_block_sums_cut_within_windows():
    v = np.arange(2 * 300, dtype=float).reshape(2, 300)
    sums, counts = block_sums(v, 128)
    assert counts.tolist() == [128, 128, 44] * 2
    assert sums.sum() == v.sum() and sums[2] == v[0, 256:].sum()


def test_rel_l2_interval_is_the_exact_value_and_covers_the_truth():
    rng = np.random.default_rng(3)
    ref = rng.gamma(4.0, 1.0, 16)
    err = ref * 0.01 * rng.uniform(0.5, 1.5, 16)
    d = rel_l2_ci(err, ref)
    assert d["value"] == pytest.approx(math.sqrt(err.sum() / ref.sum())) and d["lo"] <= d["value"] <= d["hi"]
    assert d["blocks"] == 16
    # blocks whose squared error is a known share (0.12^2) of the squared reference, with noise: the interval
    # holds 0.12 about 95% of the time (400 trials)
    hits = 0
    for _ in range(400):
        ref = rng.gamma(4.0, 1.0, 16)
        err = ref * 0.12 ** 2 * rng.gamma(5.0, 1 / 5.0, 16)
        x = rel_l2_ci(err, ref)
        hits += x["lo"] <= 0.12 <= x["hi"]
    assert 0.92 <= hits / 400 <= 0.98, hits


def test_logit_diff_interval_follows_the_positions():
    from sq2trt.compare import logit_diff

    rng = np.random.default_rng(4)
    refs = [rng.normal(0, 3, (1, 128, 50)) for _ in range(2)]
    engs = [r + rng.normal(0, 0.3, r.shape) for r in refs]
    d = logit_diff(refs, engs, atol=1e-2, rtol=1e-2, polygraphy_passed=False)
    whole = np.linalg.norm(np.concatenate([(e - r).ravel() for r, e in zip(refs, engs)])) / \
        np.linalg.norm(np.concatenate([r.ravel() for r in refs]))
    ci = d.rel_l2_interval
    assert d.rel_l2 == pytest.approx(whole) and d.tokens == 256 and ci["blocks"] == 8
    assert ci["lo"] < d.rel_l2 < ci["hi"] and ci["hi"] - ci["lo"] < 0.02  # uniform error: a tight interval
    flat = logit_diff([r[0] for r in refs], [e[0] for e in engs], atol=1e-2, rtol=1e-2, polygraphy_passed=False)
    assert flat.rel_l2 == d.rel_l2 and flat.rel_l2_interval == ci  # (T, vocab) logits: the same blocks
    bad = [e.copy() for e in engs]
    bad[1][0, 5, 3] = np.nan
    nan = logit_diff(refs, bad, atol=1e-2, rtol=1e-2, polygraphy_passed=False)
    assert math.isnan(nan.max_abs) and math.isnan(nan.rel_l2) and nan.rel_l2_interval is None
    # the error concentrated in a few positions: same kind of value, far wider interval
    engs[0][0, :8] += rng.normal(0, 8, (8, 50))
    wide = logit_diff(refs, engs, atol=1e-2, rtol=1e-2, polygraphy_passed=False).rel_l2_interval
    assert wide["hi"] - wide["lo"] > 5 * (ci["hi"] - ci["lo"])


def _pairs(a, b, c, d):
    """Outcomes of two models on a + b + c + d items: both right, first only, second only, neither."""
    first = np.array([1] * a + [1] * b + [0] * c + [0] * d, bool)
    second = np.array([1] * a + [0] * b + [1] * c + [0] * d, bool)
    return first, second


def test_paired_drop_interval():
    d = paired_drop_ci(*_pairs(60, 5, 2, 33))
    assert d["value"] == pytest.approx(0.03) and d["lo"] < 0.03 < d["hi"] and d["discordant"] == 7
    assert d["items"] == 100 and d["first_only"] == 5 and d["second_only"] == 2
    # the same accuracies (0.65 vs 0.62) judged as if unpaired: the paired interval is much narrower
    _, l1, u1 = wilson(65, 100)
    _, l2, u2 = wilson(62, 100)
    unpaired = math.sqrt((0.65 - l1) ** 2 + (u2 - 0.62) ** 2) + math.sqrt((u1 - 0.65) ** 2 + (0.62 - l2) ** 2)
    assert d["hi"] - d["lo"] < 0.5 * unpaired
    # published examples: Newcombe (1998)'s (1, 1, 7, 12) and Cavo et al. (2012) in R's contingencytables
    for table, want in (((1, 1, 7, 12), (-0.2857, -0.5069, -0.0256)), ((59, 6, 16, 80), (-0.0621, -0.1186, -0.0046))):
        got = paired_drop_ci(*_pairs(*table))
        assert (got["value"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-4), table
    same = paired_drop_ci(*_pairs(60, 0, 0, 40))  # identical answers: zero drop, but not a zero-width interval
    assert same["value"] == 0 and same["lo"] < 0 < same["hi"]
    # coverage: each item's two answers drawn with a known marginal difference and strong correlation; the
    # interval holds it about 95% of the time (400 trials of 100 items)
    true = (0.66 - 0.63) * (1 - 2 * 0.04)  # the marginals after the 4% flips below
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(400):
        u = rng.uniform(size=100)
        first, second = u < 0.66, u < 0.63  # agree except on the 3% band
        flip = rng.uniform(size=100) < 0.04  # plus some answers that differ both ways
        first, second = np.where(flip, ~first, first), np.where(flip[::-1], ~second, second)
        x = paired_drop_ci(first, second)
        hits += x["lo"] <= true <= x["hi"]
    assert 0.92 <= hits / 400 <= 0.99, hits


# --------------------------------------------------------------------------- gate decisions
def test_check_states():
    assert Check("ppl_increase", 0.04, 0.06, "max", lo=0.03, hi=0.05).status == PASS
    assert Check("ppl_increase", 0.07, 0.06, "max", lo=0.065, hi=0.075).status == FAIL
    assert Check("ppl_increase", 0.05, 0.06, "max", lo=0.03, hi=0.07).status == TOO_SMALL
    assert Check("top1_agreement", 0.9, 0.85, "min", lo=0.88, hi=0.92).status == PASS
    assert Check("top1_agreement", 0.9, 0.85, "min", lo=0.84, hi=0.95).status == TOO_SMALL
    assert Check("top1_agreement", 0.8, 0.85, "min", lo=0.7, hi=0.9).status == FAIL
    assert Check("logits_rel_l2", 0.1, 0.2, "max").status == PASS  # no interval (an older report): the value
    assert Check("logits_rel_l2", 0.1, 0.12, "max", lo=0.08, hi=0.13).status == TOO_SMALL
    drop = Check("copa.acc_drop", 0.02, 0.05, "max", lo=-0.01, hi=0.07, n=100, unit="items")
    assert drop.status == TOO_SMALL and "on 100 items" in str(drop) and "more items" in str(drop)
    assert "95% interval [0.03, 0.07]" in str(Check("ppl_increase", 0.05, 0.06, "max", lo=0.03, hi=0.07, n=4092))


def _paired_report(value, lo, hi, top=(0.9, 0.88, 0.92)):
    return {"compare": {"ppl_increase": value, "logits": {"top1_agreement": 0.5, "rel_l2": 0.1, "tokens": 256},
                        "paired": {"ppl_increase": {"value": value, "lo": lo, "hi": hi, "tokens": 4092},
                                   "top1_agreement": {"value": top[0], "lo": top[1], "hi": top[2],
                                                      "tokens": 4092}}}}


def test_enforce_says_too_small_when_only_intervals_cross():
    th = Thresholds(max_ppl_increase=0.06, min_top1_agreement=0.85)
    assert enforce(_paired_report(0.04, 0.03, 0.05), th)
    # the paired top-1 over the evaluation text is gated, not Polygraphy's 0.5 on the comparison windows
    assert report_metrics(_paired_report(0.04, 0.03, 0.05))["top1_agreement"] == 0.9
    with pytest.raises(EvaluationTooSmallError, match="too small to judge") as e:
        enforce(_paired_report(0.05, 0.03, 0.07), th)
    assert e.value.exit_code == 1
    with pytest.raises(AccuracyGateError) as e:  # a real regression is not reported as "too small"
        enforce(_paired_report(0.05, 0.03, 0.07, top=(0.8, 0.78, 0.82)), th)
    assert not isinstance(e.value, EvaluationTooSmallError) and "FAIL top1_agreement" in str(e.value)


def test_shipped_thresholds_are_consistent():
    """recipes/thresholds.yaml and .ci/thresholds.yaml gate the same default model: the CI file's limits are
    the looser ones (its evaluation is 4x smaller, so its intervals are wider), and the README's own
    measured O3 numbers pass the recipe's limits."""
    from sq2trt.gate import load_thresholds

    rec, ci = load_thresholds(ROOT / "recipes" / "thresholds.yaml"), load_thresholds(ROOT / ".ci" / "thresholds.yaml")
    assert ci.max_ppl_increase >= rec.max_ppl_increase and ci.min_top1_agreement <= rec.min_top1_agreement
    import re

    readme = (ROOT / "README.md").read_text()
    row = next((r for r in readme.splitlines() if r.startswith("| O3 (SmoothQuant")), None)
    assert row, "README lost its measured O3 row"
    cells = [c.strip() for c in row.strip("|").split("|")]
    inc = [float(x) / 100 for x in re.findall(r"[+-]?[\d.]+(?=%)", cells[2])]  # value, interval low, high
    top1 = [float(x) / 100 for x in re.findall(r"[\d.]+(?=%)", cells[3])]
    rel = float(cells[4])
    assert len(inc) == 3 and len(top1) == 3, cells
    # the README's own run passes the recipe's gate: values and intervals inside the limits
    assert max(inc) <= rec.max_ppl_increase and min(top1) >= rec.min_top1_agreement and rel <= rec.max_logits_rel_l2


# --------------------------------------------------------------------------- levels text from the plan
def test_weights_text_is_what_the_plan_applies():
    """`sq2trt levels` and the report's head describe weights through report.effective_weights; it must
    say what make_plan really does for every level under every granularity (the README said per-tensor
    where the llama recipe's plan is per-channel)."""
    from sq2trt.config import LEVELS, WEIGHT_GRANULARITIES, QuantConfig
    from sq2trt.plan import make_plan
    from sq2trt.report import effective_weights, recipe_granularities, support_matrix_markdown

    for level, scheme in LEVELS.items():
        for g in WEIGHT_GRANULARITIES:
            plan = make_plan(["m"], QuantConfig(level=level, weight_granularity=g), {"m": 1.0})
            if not plan or scheme.weight is None:
                assert effective_weights(scheme, g) == "float"
                continue
            q = plan["m"]
            want = f"INT{q.weight_bits} {q.weight_granularity}" + ("" if q.weight_symmetric else " asymmetric")
            assert effective_weights(scheme, g) == want, (level, g)
    grans = recipe_granularities()
    assert grans["llama"] == "per-channel" and grans["opt"] == "per-tensor"
    o3 = next(r for r in support_matrix_markdown().splitlines() if r.startswith("| O3 |"))
    assert "per-channel in the" in o3 and "llama" in o3 and "opt" not in o3


# --------------------------------------------------------------------------- planted regressions
# Thresholds for the tiny model at the budget below (4 x 64 calibration tokens, 32 x 128 evaluation
# tokens), from the unplanted run, measured 2026-12-02 with `pytest tests/test_gate.py -k planted -s`
# (which prints every run's numbers): perplexity increase -0.34% (95% interval -0.39% to -0.30%), top-1
# agreement with the reference 87.8% (86.4% to 89.0%), logits rel. L2 0.116 (no interval; ONNX Runtime's
# fused INT8 CPU kernels, the exact Q/DQ graph is 0.019). Each limit sits a few interval widths beyond
# the measured interval (ppl: +0.1%, 4 widths past -0.30%; top-1: 84%, one width below 86.4%; rel. L2:
# 0.2, room for other CPUs' kernels), so the unplanted run passes with its interval inside and each
# planted bug fails. Measured on the plants: scale x100 +1.97% / 30.9% / 0.69; no smoothing +0.39% (0.16%
# to 0.63%) / 60.1% / 0.457; transposed weights +3.7% / 16.9% / 0.90.
TINY_THRESHOLDS = {"max_ppl_increase": 0.001, "min_top1_agreement": 0.84, "max_logits_rel_l2": 0.2}

OUTLIER_FACTOR = 100.0


def _tiny_outlier_model(dest: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sq2trt.checkpoints import byte_tokenizer
    from sq2trt.models import TINY_CONFIGS

    d = dict(TINY_CONFIGS["llama"])
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ch = torch.tensor([3, 17, 40, 58])
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  (layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))):
                norm.weight[ch] *= OUTLIER_FACTOR
                for name in linears:
                    layer.get_submodule(name).weight[:, ch] /= OUTLIER_FACTOR
    model.save_pretrained(dest)
    byte_tokenizer().save_pretrained(dest)
    return dest


def _config(model: Path, calib: Path, evalp: Path):
    from sq2trt.config import Config

    return Config.from_dict({"model": str(model),
                             "quant": {"level": "O3", "weight_granularity": "per-channel", "smooth_folds": ["norm", "down"]},
                             "calib": {"data": str(calib), "num_samples": 4, "seq_len": 64},
                             "eval": {"data": str(evalp), "window": 128, "max_tokens": 4096,
                                      "compare_samples": 2, "compare_seq_len": 64}})


def _unstamp(level_dir: Path, keep: tuple[str, ...]) -> None:
    """Remove the stamps of the level's artifacts except ``keep``: the pipeline redoes those steps."""
    for meta in level_dir.glob("*.meta.json"):
        if meta.name[: -len(".meta.json")] not in keep:
            meta.unlink()


def _plant_scale_x100(level_dir: Path) -> None:
    p = level_dir / "act_scales.json"
    p.write_text(json.dumps({k: 100.0 * v for k, v in json.loads(p.read_text()).items()}))
    _unstamp(level_dir, ("act_scales.json", "smooth_scales.safetensors", "ref.onnx", "ref_eval.npz"))


def _plant_no_smoothing(level_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    p = level_dir / "smooth_scales.safetensors"
    save_file({k: torch.ones_like(v) for k, v in load_file(str(p)).items()}, str(p))
    _unstamp(level_dir, ("smooth_scales.safetensors",))


def _plant_transposed_weights(level_dir: Path) -> None:
    """The INT8 weights of every square GEMM (q_proj, o_proj) stored with their axes swapped."""
    import onnx
    from onnx import numpy_helper

    p = level_dir / "O3.onnx"
    m = onnx.load(str(p))
    inits = {t.name: t for t in m.graph.initializer}
    n = 0
    for node in m.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if t is not None and len(t.dims) == 2 and t.dims[0] == t.dims[1]:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
            n += 1
    assert n == 4  # q_proj and o_proj of both layers
    onnx.save(m, str(p))
    _unstamp(level_dir, ("act_scales.json", "smooth_scales.safetensors", "ref.onnx", "ref_eval.npz", "O3.onnx"))


PLANTS = {"scale_x100": _plant_scale_x100, "no_smoothing": _plant_no_smoothing,
          "transposed_weights": _plant_transposed_weights}


@pytest.fixture(scope="module")
def tiny_runs(calib_text_m, eval_text_m, tmp_path_factory):
    """{name: report} for the unplanted run and each plant: real pipeline runs (compare, diagnose, FP16
    score, report). Each plant starts from a copy of the unplanted build (same config hashes), plants its
    bug, removes the stamps of what depends on it, and reruns Pipeline.report()."""
    from sq2trt.pipeline import Pipeline

    root = tmp_path_factory.mktemp("gates")
    model = _tiny_outlier_model(root / "tiny-llama-outliers")
    cfg = _config(model, calib_text_m, eval_text_m)
    clean = Pipeline(cfg, root / "clean")
    reports = {"clean": clean.report()}
    for name, plant in PLANTS.items():
        out = root / name
        shutil.copytree(root / "clean", out)
        pipe = Pipeline(cfg, out)
        plant(pipe.level_dir)
        reports[name] = Pipeline(cfg, out).report()
    for name, r in reports.items():
        m = report_metrics(r)
        print(f"\n{name}: ppl_increase {m['ppl_increase']:+.4f} {m['ppl_increase_ci']}, top1 {m['top1_agreement']:.4f} "
              f"{m['top1_agreement_ci']}, rel_l2 {m['logits_rel_l2']:.4f}, fp16 ppl_increase "
              f"{r['fp16']['paired']['ppl_increase']['value']:+.4f}, diagnosis logits {r['diagnosis']['logits_rel_l2']:.4f}")
    yield reports
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def calib_text_m():
    from conftest import data_file

    return data_file("wikitext2_tokenized/valid.txt")


@pytest.fixture(scope="module")
def eval_text_m():
    from conftest import data_file

    return data_file("wikitext2_raw_test/wiki.test.raw")


def test_planted_unplanted_run_passes_every_gate(tiny_runs):
    rep = tiny_runs["clean"]
    res = check_report(rep, Thresholds.from_dict(TINY_THRESHOLDS))
    assert res, str(res)
    assert {c.status for c in res.checks} == {PASS}
    # the default report carries the diagnosis, its plot and the FP16 graph's score
    assert rep["diagnosis"] and "per-layer error" in rep["plots"]
    assert rep["fp16"]["windows"] >= 1 and rep["fp16"]["file"] == "O3.fp16.onnx"
    assert rep["resolved"]["weights"] == "INT8 per-channel"
    assert "per-tensor weights" not in rep["level_description"] and "per-channel" in rep["level_description"]


# which gates each plant must trip: each plant trips every gate (measured above)
EXPECTED_FAILURES = {"scale_x100": {"ppl_increase", "top1_agreement", "logits_rel_l2"},
                     "no_smoothing": {"ppl_increase", "top1_agreement", "logits_rel_l2"},
                     "transposed_weights": {"ppl_increase", "top1_agreement", "logits_rel_l2"}}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_regression_fails_the_gate(tiny_runs, plant):
    res = check_report(tiny_runs[plant], Thresholds.from_dict(TINY_THRESHOLDS))
    failed = {c.metric for c in res.failures}
    assert failed >= EXPECTED_FAILURES[plant], str(res)
    with pytest.raises(AccuracyGateError):
        enforce(tiny_runs[plant], Thresholds.from_dict(TINY_THRESHOLDS))


def test_planted_every_gate_is_tripped_by_some_plant():
    assert set().union(*EXPECTED_FAILURES.values()) == {"ppl_increase", "top1_agreement", "logits_rel_l2"}


def test_cli_check_exit_code_and_message_when_too_small(tmp_path, capsys):
    from sq2trt.cli import main

    th = tmp_path / "th.yaml"
    th.write_text("max_ppl_increase: 0.06\nmin_top1_agreement: 0.85\n")
    ok, small = tmp_path / "ok.json", tmp_path / "small.json"
    ok.write_text(json.dumps(_paired_report(0.04, 0.03, 0.05)))
    small.write_text(json.dumps(_paired_report(0.05, 0.03, 0.07)))
    assert main(["report", "--from", str(ok), "--check", str(th), "-q"]) == 0
    assert main(["report", "--from", str(small), "--check", str(th), "-q"]) == 1
    assert "evaluation too small to judge" in capsys.readouterr().err
