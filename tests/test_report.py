"""Reports and the accuracy gate: gate logic passes and fails where it should, thresholds files are
validated, the HTML report is self-contained (its images decode), and a stale eval.json cannot
make a report pass."""
from __future__ import annotations

import base64
import copy
import io
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval_helpers import evaluated_pipeline
from sq2trt.errors import AccuracyGateError, ConfigError
from sq2trt.gate import Thresholds, check_report, enforce, load_thresholds
from sq2trt.report import SCHEMA_VERSION, render_html, render_markdown

ROOT = Path(__file__).resolve().parents[1]


def _report(ppl_increase=0.01, top1=0.95, rel_l2=0.1, copa_drop=0.01, with_eval=True):
    r = {"schema_version": SCHEMA_VERSION, "compare": {"ppl_increase": 0.5, "logits": {"top1_agreement": top1,
                                                                                      "rel_l2": rel_l2}}}
    if with_eval:
        r["eval"] = {"ppl_increase": ppl_increase,
                     "tasks": {"copa": {"acc_drop": copa_drop, "acc_norm_drop": 0.0}}}
    return r


TH = Thresholds(max_ppl_increase=0.05, min_top1_agreement=0.9, max_acc_drop={"copa": 0.03})


def test_gate_passes_within_thresholds():
    res = check_report(_report(), TH)
    assert res and not res.failures
    assert "passed" in str(res)
    assert enforce(_report(), TH)


@pytest.mark.parametrize("kw,metric", [({"ppl_increase": 0.08}, "ppl_increase"),
                                       ({"top1": 0.85}, "top1_agreement"),
                                       ({"copa_drop": 0.05}, "copa.acc_drop")])
def test_gate_fails_naming_the_metric(kw, metric):
    res = check_report(_report(**kw), TH)
    assert not res
    assert [c.metric for c in res.failures] == [metric]
    with pytest.raises(AccuracyGateError, match=metric) as e:
        enforce(_report(**kw), TH)
    assert e.value.exit_code == 1


def test_gate_boundaries_are_inclusive():
    assert check_report(_report(ppl_increase=0.05, top1=0.9, copa_drop=0.03), TH)


def test_gate_prefers_eval_ppl_and_fails_on_missing_metrics():
    # compare's ppl_increase (0.5) is ignored when eval.json's is present ...
    assert check_report(_report(), Thresholds(max_ppl_increase=0.05))
    # ... and used when it is not
    assert not check_report(_report(with_eval=False), Thresholds(max_ppl_increase=0.05))
    res = check_report(_report(with_eval=False), TH)
    missing = [c for c in res.failures if c.value is None]
    assert [c.metric for c in missing] == ["copa.acc_drop"] and "sq2trt evaluate --tasks copa" in str(res)
    nan = _report()
    nan["eval"]["ppl_increase"] = float("nan")
    assert not check_report(nan, Thresholds(max_ppl_increase=0.05))


def test_thresholds_file_round_trip_and_validation(tmp_path):
    th = load_thresholds(ROOT / "recipes" / "thresholds.yaml")
    assert th.max_ppl_increase == 0.05 and th.min_top1_agreement == 0.875 and th.max_logits_rel_l2 == 0.175
    assert not th.max_acc_drop  # tasks are gated only from the user's own measurement (see the file)
    bad = tmp_path / "t.yaml"
    bad.write_text("max_ppl_rise: 0.1\n")
    with pytest.raises(ConfigError, match="unknown threshold"):
        load_thresholds(bad)
    bad.write_text("max_acc_drop: 0.03\n")
    with pytest.raises(ConfigError, match="map task names"):
        load_thresholds(bad)
    bad.write_text("min_top1_agreement: high\n")
    with pytest.raises(ConfigError, match="number"):
        load_thresholds(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_thresholds(tmp_path / "missing.yaml")


def test_cli_report_check_from_json_exit_codes(tmp_path, capsys):
    import json

    from sq2trt.cli import main

    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    ok.write_text(json.dumps(_report()))
    bad.write_text(json.dumps(_report(top1=0.5)))
    th = str(ROOT / "recipes" / "thresholds.yaml")
    strict = tmp_path / "th.yaml"
    strict.write_text("max_ppl_increase: 0.05\nmin_top1_agreement: 0.9\nmax_acc_drop: {copa: 0.03}\n")
    assert main(["report", "--from", str(ok), "--check", str(strict), "-q"]) == 0
    assert main(["report", "--from", str(bad), "--check", str(strict), "-q"]) == 1
    assert "top1_agreement" in capsys.readouterr().err
    # the shipped sample judges the same numbers (these reports have no intervals: judged on the values)
    assert main(["report", "--from", str(ok), "--check", th, "-q"]) == 0
    assert main(["report", "--from", str(bad), "--check", th, "-q"]) == 1
    assert "FAIL top1_agreement" in capsys.readouterr().err
    # a task threshold on a task the report lacks fails, naming it
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("max_acc_drop: {openbookqa: 0.05}\n")
    assert main(["report", "--from", str(ok), "--check", str(tasks), "-q"]) == 1
    assert "openbookqa.acc_drop: missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- HTML
class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1


def _decode_pngs(html_text: str) -> list[tuple[int, int]]:
    import matplotlib.image as mpimg

    p = _Imgs()
    p.feed(html_text)
    shapes = []
    for src in p.srcs:
        assert src.startswith("data:image/png;base64,")  # self-contained: nothing to fetch
        img = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        shapes.append(img.shape[:2])
    return shapes


def test_html_embeds_plots_that_decode(tmp_path):
    import torch

    from sq2trt.plots import plot_alpha_sweep, plot_layer_errors, plot_smoothing

    (tmp_path / "plots").mkdir()
    before = torch.ones(32)
    before[5] = 60.0  # an outlier channel
    plot_smoothing(before, before.sqrt(), "model.layers.0.self_attn.q_proj", tmp_path / "plots" / "s.png", alpha=0.5)
    plot_layer_errors({"layers": [{"layer": 0, "rel_l2": 0.01}, {"layer": 1, "rel_l2": 0.03}],
                       "gemms": [{"module": "a", "added": 0.01}, {"module": "b", "added": 0.05}],
                       "proposed_fp_fallback": ["b"]}, tmp_path / "plots" / "l.png")
    plot_alpha_sweep([{"alpha": 0.5, "ppl": 30.0}, {"alpha": 0.8, "ppl": 25.0}], tmp_path / "plots" / "a.png",
                     fp_ppl=22.5, naive_ppl=80.0)
    r = {"schema_version": SCHEMA_VERSION, "model": {"name": "m<x>", "source": "s", "architecture": "A"}, "level": "O3",
         "level_description": "d", "alpha": 0.5, "quant": {"weight_granularity": "per-tensor", "act_clip": "max"},
         "calibration": {"data": "c", "num_samples": 1, "seq_len": 2, "seed": 0},
         "compare": {"ppl": {"reference": 1.0, "engine": 1.1}, "ppl_increase": 0.1,
                     "logits": {"max_abs": 1, "mean_abs": 1, "max_rel": 1, "rel_l2": 1, "top1_agreement": 1, "tokens": 1},
                     "eval": {"data": "e", "windows": 1, "window": 2, "tokens": 2}},
         "timings_s": {}, "environment": {},
         "plots": {"smoothing": "plots/s.png", "layers": "plots/l.png", "sweep": "plots/a.png"}}
    html_text = render_html(r, tmp_path)
    assert "m&lt;x&gt;" in html_text and "<x>" not in html_text  # escaped
    r["quant"] = {"weight_granularity": "per-channel", "act_clip": "auto", "smooth_folds": ["norm", "down"],
                  "fp_fallback": ["*.down_proj"], "alpha_by_kind": {"down": 0.6}}
    r["resolved"] = {"weights": "INT8 per-channel", "activations": "per-tensor static", "quantized_gemms": 7,
                     "gemms": 14}
    first = render_markdown(r).splitlines()[2]  # the run's settings, as the level's definition refines them
    for part in ("weights INT8 per-channel", "activation clip auto", "smoothing folds norm+down", "alpha by kind down 0.60",
                 "1 GEMM pattern(s) kept in floating point"):
        assert part in first, (part, first)
    shapes = _decode_pngs(html_text)
    assert len(shapes) == 3 and all(h > 100 and w > 100 for h, w in shapes)


def test_pipeline_report_schema_and_html(calib_text, eval_text):
    pipe, ev, diag, rep = evaluated_pipeline(calib_text, eval_text)
    assert rep["schema_version"] == SCHEMA_VERSION == 2
    assert rep["eval"]["perplexity"] == ev["perplexity"] and rep["diagnosis"]["gemms"] == diag["gemms"]
    assert set(rep["plots"]) == {"activation magnitude before/after smoothing", "per-layer error"}
    for rel in rep["plots"].values():
        assert (pipe.level_dir / rel).is_file()
    md = pipe.path("report.md").read_text()
    assert "Perplexity three ways" in md and "mini" in md and "Proposed fp_fallback" in md
    html_text = pipe.path("report.html").read_text()
    assert len(_decode_pngs(html_text)) == 2
    for key in ("model", "level", "alpha", "calibration", "environment", "timings_s"):
        assert key in rep
    # the gate judges this report's own numbers (eval.json's, which the report carries, with its paired
    # interval): a limit at the interval's far end passes (limits are inclusive); between the value and the
    # far end the evaluation is too small to judge; below the value it fails, naming each metric
    drop, inc = rep["eval"]["tasks"]["mini"]["acc_drop"], rep["eval"]["ppl_increase"]
    hi = rep["eval"]["paired"]["ppl_increase"]["hi"]
    assert inc == ev["ppl_increase"] and drop == ev["tasks"]["mini"]["acc_drop"] and hi > inc
    assert rep["eval"]["paired"]["ppl_increase"]["value"] == pytest.approx(inc, rel=1e-9, abs=1e-12)
    drop_ci = rep["eval"]["tasks"]["mini"]["paired"]["acc"]  # paired on the task's 3 items: wide
    assert drop_ci["items"] == 3 and drop_ci["lo"] <= drop <= drop_ci["hi"] and drop_ci["hi"] > drop
    assert check_report(rep, Thresholds(max_ppl_increase=hi, max_acc_drop={"mini": drop_ci["hi"]}))
    small = check_report(rep, Thresholds(max_ppl_increase=(inc + hi) / 2))
    assert small.too_small and "TOO SMALL ppl_increase" in str(small)
    small = check_report(rep, Thresholds(max_acc_drop={"mini": drop}))
    assert small.too_small and "TOO SMALL mini.acc_drop" in str(small) and "on 3 items" in str(small)
    tight = check_report(rep, Thresholds(max_ppl_increase=inc - 1e-9, max_acc_drop={"mini": drop - 1e-9}))
    assert [c.metric for c in tight.failures] == ["ppl_increase", "mini.acc_drop"] and not tight.too_small


def test_stale_eval_is_left_out_of_the_report(calib_text, eval_text):
    """An eval.json from another engine must not feed the gate."""
    from sq2trt.artifacts import read_json, write_json

    pipe, ev, _, rep = evaluated_pipeline(calib_text, eval_text)
    path = pipe.path("eval.json")
    saved = read_json(path)
    stale = copy.deepcopy(saved)
    stale["engine_hash"] = "0" * 16
    write_json(path, stale)
    try:
        rep2 = pipe.report()
        assert rep2["eval"] is None
        # thresholds the fresh report meets (its own numbers) fail on the stale one, for the task metric
        # it no longer has: the gate must not pass because eval.json was left out
        th = Thresholds(max_acc_drop={"mini": ev["tasks"]["mini"]["paired"]["acc"]["hi"]})
        assert check_report(rep, th)
        res = check_report(rep2, th)
        assert [(c.metric, c.value) for c in res.failures] == [("mini.acc_drop", None)]
        assert "missing from the report" in str(res)
    finally:
        write_json(path, saved)
        pipe.report()
