"""Evaluation: metrics against hand-computed values, task converters on the real files, batched
log-likelihoods, three-way perplexity agreement, export-mismatch detection, per-layer diagnosis,
and the lm-eval adapter against our own scorer."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import data_file
from eval_helpers import cached, evaluated_pipeline, tiny_config
from sq2trt.errors import ExportMismatchError
from sq2trt.evaluate import (batched_perplexity, ort_logits_fn, perplexity,
                             torch_logits_fn, window_nll)
from sq2trt.tasks import (Example, TaskDataError, acc, acc_norm, encode_pair, example_from_copa,
                          example_from_openbookqa, load_copa, load_openbookqa, load_task_jsonl, loglikelihoods,
                          mean_stderr, resolve_task, score_examples)


# --------------------------------------------------------------------------- metrics, by hand
def test_perplexity_of_uniform_logits_is_vocab_size():
    ids = torch.tensor([[1, 2, 3, 0, 1]])
    ppl = perplexity(lambda x: np.zeros((*x.shape, 7), dtype=np.float32), ids)
    assert ppl == pytest.approx(7.0, rel=1e-6)  # log_softmax runs in float32


def test_window_nll_hand_computed():
    # V = 2, one window [0, 1, 1]: predictions of tokens 1 and 1 from positions 0 and 1.
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, 5.0]]])  # p(1)=3/4, then 1/4
    s, n = window_nll(logits, torch.tensor([[0, 1, 1]]))
    assert n == 2
    assert s == pytest.approx(-math.log(0.75) - math.log(0.25), rel=1e-6)
    ppl = perplexity(lambda x: logits.numpy(), torch.tensor([[0, 1, 1]]))
    assert ppl == pytest.approx(math.exp(s / 2), rel=1e-6)
    assert batched_perplexity(lambda x: np.repeat(logits.numpy(), x.shape[0], 0),
                              torch.tensor([[0, 1, 1]] * 3), batch=2) == pytest.approx(ppl, rel=1e-9)


def test_acc_and_acc_norm_differ_on_constructed_example():
    lls, choices = [-3.0, -4.0], [" a", " bbbbbbb"]  # raw: choice 0; per character: -1.5 vs -0.5 -> choice 1
    assert acc(lls, 1) == 0.0 and acc_norm(lls, choices, 1) == 1.0
    assert acc(lls, 0) == 1.0 and acc_norm(lls, choices, 0) == 0.0


def test_mean_stderr_hand_computed():
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))


def test_loglikelihood_hand_computed():
    # logits put log(3) on (previous id + 1) % 4: p(next = prev + 1) = 3/6, any other token 1/6.
    def fn(ids):
        out = np.zeros((*ids.shape, 4), dtype=np.float32)
        np.put_along_axis(out, ((ids + 1) % 4)[..., None], math.log(3.0), axis=-1)
        return out

    (ll, greedy), (ll2, greedy2) = loglikelihoods(fn, [([0, 1], [2, 3]), ([2], [0])])
    assert ll == pytest.approx(2 * math.log(0.5)) and greedy
    assert ll2 == pytest.approx(math.log(1 / 6)) and not greedy2


def test_encode_pair_moves_trailing_space_like_lm_eval():
    from sq2trt.models import ByteTokenizer

    tok = ByteTokenizer(256)
    ctx, cont = encode_pair(tok, "ab ", "c")
    assert ctx == list(b"ab") and cont == list(b" c")


# --------------------------------------------------------------------------- converters
def test_copa_converter_first_item():
    ex = load_copa(data_file("copa/test.jsonl"))
    assert len(ex) == 100
    assert ex[0] == Example("The man turned on the faucet therefore",
                            (" the toilet filled with water.", " water flowed from the spout."), 1, " ")
    cause = example_from_copa({"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
                               "choice2": "The grass was cut.", "question": "cause", "label": 0})
    assert cause.context == "My body cast a shadow over the grass because"
    assert cause.choices[0] == " the sun was rising."


def test_openbookqa_converter_first_item():
    ex = load_openbookqa(data_file("openbookqa/test.tsv"))
    assert len(ex) == 500
    assert ex[0].context.startswith("A person wants to start saving money") and ex[0].context.endswith("save money is to")
    assert ex[0].choices == ("make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                             "have lunch with friends")
    assert ex[0].label == 1 and ex[0].delimiter == " "
    assert ex[1].choices[0] == "a marsh" and ex[1].label == 0
    with pytest.raises(TaskDataError, match="answer key"):
        example_from_openbookqa({"Question Stem": "q", "Choices": "(A) x (B) y", "Answer Key": "C"})


def test_task_jsonl_validation(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"context": "x", "choices": ["a", "b"], "label": 2}\n')
    with pytest.raises(TaskDataError, match="label"):
        load_task_jsonl(p)
    p.write_text('{"context": "x", "choices": [" a", " b"], "label": 1}\n')
    assert load_task_jsonl(p) == [Example("x", (" a", " b"), 1)]
    with pytest.raises(TaskDataError, match="unknown task"):
        resolve_task("hellaswag")


@pytest.mark.parametrize("env, outcome", [({}, "1 skipped"), ({"CI": "true"}, "1 failed"),
                                          ({"SQ2TRT_REQUIRE_DATA": "1"}, "1 failed")])
def test_missing_real_data_skips_locally_and_fails_in_ci(tmp_path, env, outcome):
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_needs_data.py").write_text(
        "from conftest import data_file\n\ndef test_it():\n    data_file('copa/test.jsonl')\n")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "SQ2TRT_REQUIRE_DATA")}
    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**base, **env, "PYTHONPATH": str(tests), "SQ2TRT_DATA": str(tmp_path / "absent")})
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert "SQ2TRT_DATA" in proc.stdout  # the message names the variable to set


# --------------------------------------------------------------------------- batching on a tiny model
def test_batched_loglikelihoods_match_one_at_a_time():
    from sq2trt.models import load_model

    loaded = load_model("random:llama")
    fn = torch_logits_fn(loaded.model)
    ex = [Example("The man turned on the faucet therefore", (" the toilet filled.", " water flowed from the spout."), 1),
          Example("Q: 2+2? A:", (" 4", " five", " a very long and wrong answer indeed"), 0)]
    res_big, lls_big = score_examples("t", ex, fn, loaded.tokenizer, batch_tokens=4096)
    res_one, lls_one = score_examples("t", ex, fn, loaded.tokenizer, batch_tokens=1)
    np.testing.assert_allclose(np.concatenate(lls_big), np.concatenate(lls_one), rtol=1e-5)
    assert res_big == res_one
    # and against a direct unpadded computation of the first choice
    ctx, cont = encode_pair(loaded.tokenizer, ex[0].context, ex[0].choices[0])
    ids = np.array([ctx + cont[:-1]])
    logp = torch.log_softmax(torch.from_numpy(fn(ids)), -1)[0, len(ctx) - 1:]
    want = float(sum(logp[i, t] for i, t in enumerate(cont)))
    assert lls_big[0][0] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- three-way perplexity
def test_three_way_perplexity_agrees_on_tiny_model(calib_text, eval_text):
    _, ev, _, _ = evaluated_pipeline(calib_text, eval_text)
    p = ev["perplexity"]
    assert abs(p["engine_exact"] / p["torch_fakequant"] - 1) < 1e-3  # tiny model: no amplified rounding flips
    assert abs(p["engine"] / p["torch_fakequant"] - 1) < ev["agreement"]["engine_warn_above"]
    assert p["torch_fakequant"] != p["torch_fp"]  # quantization did something
    assert ev["eval"]["windows"] == 8 and ev["eval"]["tokens"] == 1024


def test_task_scores_in_eval_json_are_the_float_model_and_the_engine(calib_text, eval_text):
    """eval.json's task entries must be what the float model and the shipped engine score, independently
    recomputed here (a swapped model, a stale engine or a sign error in the drop would differ)."""
    from sq2trt.engine import session

    pipe, ev, _, _ = evaluated_pipeline(calib_text, eval_text)
    examples = load_task_jsonl(cached("task"))
    fns = {"torch_fp": torch_logits_fn(pipe.prepared_model()),
           "engine": ort_logits_fn(session(pipe.build(), device="cpu"))}
    want = {k: score_examples("mini", examples, fn, pipe.loaded.tokenizer, batch_tokens=1)[0].to_dict()
            for k, fn in fns.items()}
    t = ev["tasks"]["mini"]
    for which in ("torch_fp", "engine"):
        assert t[which] == pytest.approx(want[which], nan_ok=True), which
    assert t["acc_drop"] == pytest.approx(want["torch_fp"]["acc"] - want["engine"]["acc"])
    assert t["acc_norm_drop"] == pytest.approx(want["torch_fp"]["acc_norm"] - want["engine"]["acc_norm"])


def test_wrong_export_is_a_typed_error(calib_text, eval_text, tmp_path):
    """A Q/DQ graph whose weight scales are wrong (x30, as a scale computed on the wrong axis or
    tensor would be) must fail the exact-agreement check. (The random tiny model's perplexity is
    close to its vocabulary size whatever one activation scale does, so the bug must be model-wide.)"""
    pipe, ev, _, _ = evaluated_pipeline(calib_text, eval_text)
    model = onnx.load(str(pipe.path("O3.onnx")))
    for i, init in enumerate(model.graph.initializer):
        if init.name.endswith(".weight_scale"):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 30, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    from sq2trt.engine import session

    from sq2trt.verify import check_export_files

    args = (pipe.path("ref.onnx"), pipe.prepared_model(), pipe.plan(), "model.layers.0.", pipe._windows("compare")[:2, :64].numpy())
    assert not check_export_files(bad, *args)
    assert check_export_files(pipe.path("O3.onnx"), *args)  # the real one passes
    assert ev["agreement"]["export_check"]["passed"]
    # and the evaluate step refuses a wrong graph with the typed error
    import shutil

    shutil.copy(bad, pipe.path("O3.onnx"))
    try:
        with pytest.raises(ExportMismatchError, match="quantization plan"):
            from sq2trt.evaluation import evaluate_pipeline

            evaluate_pipeline(pipe, [])
    finally:
        pipe.path("O3.onnx").unlink()
        pipe.export()  # restore (the meta no longer matches the tampered file's absence)


def test_evaluate_is_reused_and_cli_prints(calib_text, eval_text, capsys):
    from eval_helpers import tiny_task_file  # noqa: F401
    from sq2trt.cli import main

    pipe, ev, _, _ = evaluated_pipeline(calib_text, eval_text)
    root = cached("root")
    args = ["evaluate", "--model", "random:llama", "--level", "O3", "--calib-data", str(calib_text),
            "--calib-num-samples", "4", "--calib-seq-len", "64", "--eval-data", str(eval_text), "--eval-window", "128",
            "--eval-max-tokens", "1024", "--eval-compare-samples", "2", "--eval-compare-seq-len", "64",
            "--out", str(root / "build"), "-q", "--tasks", str(cached("task"))]
    mtime = pipe.path("eval.json").stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"torch_fakequant {ev['perplexity']['torch_fakequant']:.4f}" in out
    assert pipe.path("eval.json").stat().st_mtime_ns == mtime  # same config hash: reused, not recomputed


# --------------------------------------------------------------------------- diagnosis
def test_diagnose_covers_every_layer_and_gemm(calib_text, eval_text):
    pipe, _, diag, _ = evaluated_pipeline(calib_text, eval_text)
    plan = pipe.plan()
    assert sorted(g["module"] for g in diag["gemms"]) == sorted(plan)
    assert [x["layer"] for x in diag["layers"]] == [0, 1]
    assert all(x["rel_l2"] > 0 for x in diag["layers"])
    first_q = next(g for g in diag["gemms"] if g["module"] == "model.layers.0.self_attn.q_proj")
    assert first_q["input_rel"] == 0.0  # nothing quantized upstream of the first GEMM
    assert first_q["qinput_rel"] > 0 and first_q["output_rel"] > 0
    assert 0 < diag["logits_rel_l2"] < 1
    assert set(diag["proposed_fp_fallback"]) <= set(diag["worst_gemms"])


def test_propose_fallback_picks_outliers_only():
    from sq2trt.diagnose import propose_fallback

    gemms = [{"module": f"m{i}", "added": a} for i, a in enumerate([0.01, 0.012, 0.011, 0.2, 0.05, 0.009])]
    assert propose_fallback(gemms, top=3) == ["m3", "m4"]
    assert propose_fallback([{"module": "x", "added": 0.01}] * 3, top=3) == []


def test_fallback_from_diagnosis_is_accepted_by_config(calib_text, eval_text):
    _, _, diag, _ = evaluated_pipeline(calib_text, eval_text)
    cfg = tiny_config(calib_text, eval_text).replace(quant={"fp_fallback": diag["worst_gemms"][:1]})
    assert cfg.quant.fp_fallback == tuple(diag["worst_gemms"][:1])


# --------------------------------------------------------------------------- lm-eval adapter
def test_lm_eval_adapter_matches_task_scorer():
    try:
        from lm_eval.api.instance import Instance
    except ImportError as exc:
        pytest.skip(f"lm-eval not installed ({exc}); pip install 'sq2trt[eval]'")
    from lm_eval.api.registry import get_model

    from sq2trt.lm_eval_adapter import model_class
    from sq2trt.models import load_model

    cls = model_class()
    assert get_model("sq2trt") is cls
    loaded = load_model("random:llama")
    fn = torch_logits_fn(loaded.model)
    ex = [Example("The man turned on the faucet therefore", (" the toilet filled.", " water flowed."), 1, " "),
          Example("Question:", ("yes", "no"), 0, " ")]
    _, lls = score_examples("t", ex, fn, loaded.tokenizer)
    lm = cls(fn, loaded.tokenizer)
    reqs = [Instance("loglikelihood", {}, (e.context, e.delimiter + c), i) for e in ex for i, c in enumerate(e.choices)]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    np.testing.assert_allclose(got, np.concatenate(lls), rtol=1e-6)
    text = "hello world " * 30
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = torch.tensor([[0] + list(text.encode())])  # prefix token 0 (ByteTokenizer has no BOS), then the text
    want = -window_nll(torch.from_numpy(fn(ids.numpy())), ids)[0]
    assert rolling == pytest.approx(want, rel=1e-5)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.generate_until([])


def test_sq2trt_imports_without_lm_eval():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import sq2trt.cli, sq2trt.pipeline, sq2trt.tasks, sq2trt.lm_eval_adapter as a\n"
            "from sq2trt.errors import BackendUnavailableError\n"
            "try:\n    a.model_class()\nexcept BackendUnavailableError as e:\n    print('OK', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("OK") and "sq2trt[eval]" in out.stdout, out.stderr
