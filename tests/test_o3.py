"""O3 remedies: exact folds beyond the norms, per-kind alpha search, clipping, automatic FP fallback."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from sq2trt.alpha_search import alpha_grid, coordinate_descent, o3_loss, search_alphas
from sq2trt.archs import ARCHS, GROUP_KINDS, SMOOTH_FOLDS, gemm_kind, get_arch, quantized_linear_names
from sq2trt.calibrate import collect, collect_with, per_channel_absmax
from sq2trt.clipping import choose_clips, clip_mse, hist_update, mse_clip, percentile_clip
from sq2trt.config import Config, QuantConfig
from sq2trt.errors import ConfigError
from sq2trt.fallback import greedy, heldout_windows, rank
from sq2trt.models import load_model
from sq2trt.numerics import fake_quant, head_channel_index, int8_scale
from sq2trt.smooth import enabled_groups, group_scales, smooth, smoothed_act_stats

ALL = ("norm", "down", "o")


def _tiny(name: str, seed: int = 0):
    """A tiny random model whose norms and biases are not the trivial 1 / 0 (so folds into them are
    really exercised) and a few planted outlier channels."""
    model = load_model(f"random:{name}").model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        emb = model.get_input_embeddings().weight
        emb[:, :3] *= 30.0  # outlier channels persistent across tokens, as in the paper
    return model


def _ids(n=2, t=32, seed=1):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- exact folds
@pytest.mark.parametrize("name", ["opt", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("folds", [("norm",), ("down",), ("o",), ALL])
def test_folds_leave_fp32_outputs_unchanged(name, folds):
    model = _tiny(name)
    arch = get_arch(model)
    ids = _ids()
    ref = _logits(model, ids)
    stats = collect(model, quantized_linear_names(model, arch), ids, per_channel_absmax)
    scales = smooth(model, arch, stats, 0.5, folds)
    assert len(scales) == len(enabled_groups(arch, folds)) * model.config.num_hidden_layers
    assert any(float((s - 1).abs().max()) > 0.5 for s in scales.values())  # a real transform, not identity
    out = _logits(model, ids)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_gqa_index_maps_query_heads_to_their_kv_head():
    # 4 query heads, 2 KV heads, head_dim 2: heads 0,1 read kv 0; heads 2,3 read kv 1
    assert head_channel_index(4, 8, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert head_channel_index(8, 8, 2).tolist() == list(range(8))  # no GQA: identity
    assert head_channel_index(2, 8, 1).tolist() == [0, 1] * 4  # multi-query (random:mistral shape)


def test_o_fold_has_one_scale_per_kv_channel_from_the_max_over_its_query_heads():
    model = _tiny("llama")
    arch = get_arch(model)
    stats = collect(model, quantized_linear_names(model, arch), _ids(), per_channel_absmax)
    scales = group_scales(model, arch, stats, {"o": 1.0}, ("o",))
    key = "model.layers.0.self_attn.v_proj"
    v_out = model.model.layers[0].self_attn.v_proj.out_features
    assert scales[key].shape == (v_out,)
    x = stats["model.layers.0.self_attn.o_proj"]  # (n_heads * head_dim,) = (64,), 4 heads / 2 kv, d=16
    want = x.view(2, 2, 16).amax(dim=1).reshape(-1)  # alpha 1: s = max|x| over the query heads of a kv head
    assert torch.allclose(scales[key], want.clamp(min=1e-5))


def test_smoothed_stats_equal_recalibration_after_all_folds():
    model = _tiny("llama")
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    ids = _ids()
    stats = collect(model, names, ids, per_channel_absmax)
    scales = smooth(model, arch, stats, 0.7, ALL)
    again = collect(model, names, ids, per_channel_absmax)
    derived = smoothed_act_stats(model, arch, stats, scales)
    for n in names:
        assert torch.allclose(derived[n], again[n], rtol=1e-4, atol=1e-6), n


def test_table_kinds_and_folds_config():
    assert SMOOTH_FOLDS == ("norm", "down", "o")
    for name in ("LlamaForCausalLM", "OPTForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        from sq2trt.archs import ARCHS

        assert {g.kind for g in ARCHS[name].groups} == {"qkv", "mlp_in", "down", "o"}
    assert "GELU" in GROUP_KINDS["down"].doc  # the table says where no exact fold exists
    with pytest.raises(ConfigError, match="smooth_folds"):
        QuantConfig(smooth_folds=("norm", "gelu"))
    with pytest.raises(ConfigError, match="alpha_by_kind"):
        QuantConfig(alpha_by_kind={"down": 1.5})
    c = Config(quant=QuantConfig(smooth_folds=ALL, alpha_by_kind={"o": 0.4, "down": 0.6}))
    assert Config.from_dict(c.to_dict()) == c


def test_smoothing_hash_records_folds_and_kind_alphas():
    from sq2trt.pipeline import Pipeline

    def h(**q):
        return Pipeline(Config(model="random:llama", quant=QuantConfig(**q))).h("smooth")

    assert len({h(), h(smooth_folds=ALL), h(smooth_folds=("norm", "down")), h(alpha_by_kind={"down": 0.5})}) == 4


# --------------------------------------------------------------------------- export: no new ops, lint passes
def test_folded_export_has_same_ops_lints_and_matches_fakequant(tmp_path):
    from sq2trt.engine import session
    from sq2trt.evaluate import ort_logits_fn, torch_logits_fn
    from sq2trt.export import check_against_torch, export_reference, insert_qdq, load_onnx, refresh_weights, save_onnx
    from sq2trt.fakequant import fake_quantized
    from sq2trt.lint import lint_model
    from sq2trt.plan import make_plan

    model = _tiny("llama")
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    base = tmp_path / "base.onnx"
    export_reference(model, base)
    ids = _ids()
    stats = collect(model, names, ids, per_channel_absmax)
    ops = {}
    for folds in (("norm",), ALL):
        m = copy.deepcopy(model)
        smooth(m, arch, stats, 0.8, folds)
        ref = tmp_path / f"ref_{len(folds)}.onnx"
        save_onnx(refresh_weights(load_onnx(base), m), ref)
        assert check_against_torch(m, ref) < 1e-4
        amax = {n: float(v.max()) for n, v in collect(m, names, ids, per_channel_absmax).items()}
        plan = make_plan(names, QuantConfig(smooth_folds=folds), amax)
        q = tmp_path / f"q_{len(folds)}.onnx"
        save_onnx(insert_qdq(load_onnx(ref), plan, level="O3"), q)
        ops[folds] = Counter(n.op_type for n in load_onnx(q).graph.node)
        report = lint_model(str(q))
        assert report, str(report)
        # the ablation's PyTorch fake quantization is what the exact Q/DQ graph computes
        x = ids[:1].numpy()
        got = ort_logits_fn(session(q, device="cpu", optimize=False))(x)
        with fake_quantized(m, plan):
            want = torch_logits_fn(m)(x)
        assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4
    assert ops[("norm",)] == ops[ALL]


# --------------------------------------------------------------------------- alpha search
def test_coordinate_descent_finds_the_known_optimum():
    target = {"qkv": 0.35, "mlp_in": 0.8, "down": 0.15, "o": 0.6}
    calls = []

    def loss(a):
        calls.append(a)
        return sum((a[k] - target[k]) ** 2 * (i + 1) for i, k in enumerate(target)) + 0.1 * (a["qkv"] - 0.35) * (a["o"] - 0.6)

    res = coordinate_descent(list(target), {k: 0.85 for k in target}, loss, alpha_grid(0.05), rounds=3)
    assert res.alphas == pytest.approx(target)
    assert res.loss < res.start_loss
    assert alpha_grid(0.05)[:3] == [0.0, 0.05, 0.1] and len(alpha_grid(0.05)) == 21


def test_alpha_search_on_a_tiny_model_never_worse_than_start_and_is_the_grid_minimum():
    model = _tiny("llama")
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)
    ids = _ids(2, 24)
    stats = collect(model, names, ids, per_channel_absmax)
    quant = QuantConfig(smooth_folds=("down",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = search_alphas(model, arch, stats, names, quant, ids, step=0.25)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    assert set(res.alphas) == {"down"}
    tried = [v for k, _, v in res.history]
    assert res.loss == min(tried) <= res.start_loss
    loss = o3_loss(model, arch, stats, names, quant, ids)
    assert loss(res.alphas) == pytest.approx(res.loss, rel=1e-9)  # deterministic, reproducible


# --------------------------------------------------------------------------- clipping
def _brute_mse(x, c):
    return float(((x - fake_quant(x, int8_scale(c))) ** 2).mean())


@pytest.mark.parametrize("case", ["laplace", "outliers"])
def test_mse_clip_picks_the_brute_force_optimum(case):
    g = torch.Generator().manual_seed(0)
    if case == "laplace":  # Laplace(b=1): the 8-bit MSE-optimal clip is ~9.9 b (Banner et al., ACIQ)
        u = torch.rand(100_000, generator=g, dtype=torch.float64) - 0.5
        x = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    else:  # 1% of the values at 40: clipping them costs more than a coarser grid
        x = torch.randn(100_000, generator=g)
        x[:1000] = 40.0
    hist = None
    for part in x.split(7_000):  # running histogram over batches, range grows
        hist = hist_update(hist, part)
    c = mse_clip(hist)
    grid = torch.linspace(0.2, float(x.abs().max()), 300)
    errs = torch.tensor([_brute_mse(x, float(v)) for v in grid])
    assert _brute_mse(x, c) <= float(errs.min()) * 1.03
    if case == "laplace":
        assert c == pytest.approx(9.9, rel=0.12) and c < float(x.abs().max()) * 0.9
    else:
        assert c > 35


def test_running_histogram_percentile_and_growth():
    x = torch.arange(1, 10_001, dtype=torch.float32)  # |x| uniform on 1..10000
    hist = None
    for part in x.split(1000):  # every batch raises the max: the histogram doubles its range
        hist = hist_update(hist, part)
    counts, top = hist
    assert float(counts.sum()) == 10_000 and top >= 10_000
    assert percentile_clip(hist, 50.0) == pytest.approx(5000, rel=0.01)
    assert percentile_clip(hist, 99.0) == pytest.approx(9900, rel=0.01)
    errs = clip_mse(hist, torch.tensor([top / 4, top]))
    assert errs[1] < errs[0]  # no outliers: clipping a uniform distribution only hurts


def test_collect_with_histograms_sees_every_element():
    model = _tiny("opt")
    arch = get_arch(model)
    names = quantized_linear_names(model, arch)[:3]
    ids = _ids(4, 16)
    hists = collect_with(model, names, ids, hist_update, batch_size=2)
    width = {n: model.get_submodule(n).in_features for n in names}
    for n in names:
        assert float(hists[n][0].sum()) == 4 * 16 * width[n]


def test_choose_clips_keeps_a_method_only_where_the_output_loss_falls():
    # Constructed: clipping "down" cuts values the model needs (loss rises), clipping "qkv" helps
    # (loss falls, MSE best); "o" is indifferent, so it stays at the start ("max").
    kinds = {"l0.q": "qkv", "l0.k": "qkv", "l0.o": "o", "l0.down": "down", "l1.down": "down"}
    cands = {n: {"max": 100.0, "percentile": 50.0, "mse": 20.0} for n in kinds}
    best_for = {"qkv": 20.0, "o": None, "down": 100.0}

    def loss(amax):
        total = 0.0
        for n, c in amax.items():
            want = best_for[kinds[n]]
            total += 0.0 if want is None else abs(c - want) / 100.0
        return total

    ch = choose_clips(kinds, cands, loss)
    assert ch.methods == {"qkv": "mse", "o": "max", "down": "max"}
    assert ch.amax == {"l0.q": 20.0, "l0.k": 20.0, "l0.o": 100.0, "l0.down": 100.0, "l1.down": 100.0}
    assert ch.loss == pytest.approx(0.0) and ch.start_loss == pytest.approx(1.6)
    assert ch.loss == min(v for _, _, v in ch.history)  # never worse than anything it tried
    with pytest.raises(ValueError, match="same clipping candidates"):
        choose_clips(kinds, {**cands, "l0.q": {"max": 1.0}}, loss)


def test_gemm_kind_follows_the_table():
    llama, opt = ARCHS["LlamaForCausalLM"], ARCHS["OPTForCausalLM"]
    assert gemm_kind(llama, "model.layers.3.self_attn.k_proj") == "qkv"
    assert gemm_kind(llama, "model.layers.3.mlp.up_proj") == "mlp_in"
    assert gemm_kind(llama, "model.layers.3.mlp.down_proj") == "down"
    assert gemm_kind(llama, "model.layers.3.self_attn.o_proj") == "o"
    assert gemm_kind(opt, "model.decoder.layers.0.fc2") == "down"
    assert gemm_kind(llama, "lm_head") == "other"


# --------------------------------------------------------------------------- fallback
def test_greedy_fallback_stops_at_the_fewest_layers_meeting_the_target():
    # each layer's quantization costs a known ppl increase; they add up
    cost = {"a": 0.004, "b": 0.020, "c": 0.001, "d": 0.008, "e": 0.0005}
    measured = {n: cost[n] for n in ("b", "d")}  # measured gains (KL reduction) for a shortlist
    local = dict(cost)
    order = rank(local, measured)
    assert order == ["b", "d", "a", "c", "e"]
    calls = []

    def increase_of(fp):
        calls.append(list(fp))
        return sum(v for n, v in cost.items() if n not in fp)

    res = greedy(order, increase_of, target=0.006)  # all: 0.0335; -b: 0.0135; -d: 0.0055 <= 0.006
    assert res and res.fallback == ["b", "d"]
    assert [k for k, _ in res.history] == [0, 1, 2] and calls[-1] == ["b", "d"]
    assert greedy(order, increase_of, target=0.05).fallback == []  # already met: nothing in FP
    miss = greedy(order, increase_of, target=-1.0, max_layers=3)
    assert not miss and len(miss.fallback) == 3


def test_heldout_windows_avoid_calibration_text():
    ids = torch.arange(1000)
    starts = [100, 700, 850]
    held = heldout_windows(ids, starts, 64, num=4, window=64)
    used = {int(t) for s in starts for t in range(s, s + 64)}
    assert held.shape == (4, 64)
    assert not used & {int(t) for t in held.flatten()}


def test_pipeline_auto_fallback_writes_recipe(tmp_path, calib_text):
    from sq2trt.config import load_recipe
    from sq2trt.pipeline import Pipeline

    cfg = Config(model="random:llama",
                 quant=QuantConfig(smooth_folds=ALL, max_ppl_increase=0.0005),
                 calib=Config().calib.__class__(data=str(calib_text), num_samples=4, seq_len=64))
    pipe = Pipeline(cfg, tmp_path)
    fb = pipe.fp_fallback()
    recipe = load_recipe(pipe.path("recipe.yaml"))
    assert tuple(recipe["quant"]["fp_fallback"]) == fb
    assert recipe["quant"]["max_ppl_increase"] == 0.0
    assert set(fb) <= set(pipe.gemm_names(with_fallback=True))
    assert not set(fb) & set(pipe.gemm_names())


def test_pipeline_act_clip_auto_chooses_per_kind_on_calibration_kl(tmp_path, calib_text):
    from sq2trt.artifacts import read_json
    from sq2trt.pipeline import Pipeline

    calib = Config().calib.__class__(data=str(calib_text), num_samples=4, seq_len=64)
    auto = Pipeline(Config(model="random:llama", quant=QuantConfig(act_clip="auto"), calib=calib), tmp_path)
    scales = auto.act_scales()
    choice = read_json(auto.path("clip_choice.json"))
    assert set(choice["methods"]) == {"qkv", "o", "mlp_in", "down"}
    assert set(choice["methods"].values()) <= {"max", "percentile", "mse"}
    assert choice["kl"] <= choice["kl_max_everywhere"]
    assert choice["history"][0][:2] == ["start", "max"] and len(choice["history"]) == 1 + 4 * 2
    # where a kind kept "max", its scales are exactly the static max calibration's
    plain = Pipeline(Config(model="random:llama", quant=QuantConfig(act_clip="max"), calib=calib), tmp_path)
    exact = plain.act_scales()
    assert set(scales) == set(exact)
    arch = plain.arch
    for n, v in scales.items():
        if choice["methods"][gemm_kind(arch, n)] == "max":
            assert v == pytest.approx(exact[n], rel=1e-6)
        else:
            assert v <= exact[n] * (1 + 1e-6)
    assert auto.h("scales") != plain.h("scales")


def test_pipeline_searches_alpha_per_kind_and_smooths_with_it(tmp_path, calib_text):
    from sq2trt.artifacts import read_json
    from sq2trt.pipeline import Pipeline

    calib = Config().calib.__class__(data=str(calib_text), num_samples=4, seq_len=64)
    q = QuantConfig(smooth_folds=ALL, search_alpha_by_kind=True)
    pipe = Pipeline(Config(model="random:llama", quant=q, calib=calib), tmp_path)
    alphas = pipe.kind_alphas
    rec = read_json(pipe.path("alpha_by_kind.json"))
    assert set(alphas) == {"qkv", "mlp_in", "down", "o"} and rec["alphas"] == alphas
    assert rec["kl"] == min(v for _, _, v in rec["history"]) <= rec["kl_start"]
    # the smoothing scales are exactly those of a run given these alphas by hand
    fixed = Pipeline(Config(model="random:llama", quant=QuantConfig(smooth_folds=ALL, alpha_by_kind=alphas),
                            calib=calib), tmp_path / "fixed")
    from safetensors.torch import load_file

    a, b = load_file(str(pipe.smooth())), load_file(str(fixed.smooth()))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.h("smooth") == fixed.h("smooth")  # the hash names the alphas used, not how they were found
