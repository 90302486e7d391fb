"""The pipeline: one method per step, one artifact per step, reused when its config hash matches.

```
build/<model>/act_stats.safetensors        per-channel max|x| at every quantized Linear input
build/<model>/base.onnx                    floating-point export (graph shared by every level)
build/<model>/<level>/smooth_scales.safetensors
build/<model>/<level>/act_scales.json      static per-tensor amax on the smoothed model
build/<model>/<level>/ref.onnx             reference: no Q/DQ (smoothed weights, same outputs as FP)
build/<model>/<level>/<level>.onnx         Q/DQ model
build/<model>/<level>/<level>.ort.onnx     ONNX Runtime engine (optimized model)
build/<model>/<level>/compare.json         Polygraphy logits diff + perplexities
build/<model>/<level>/report.{json,md}
```
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import __version__
from .archs import Arch, get_arch, quantized_linear_names
from .artifacts import ensure_dir, fresh, read_json, read_meta, stamp, write_json
from .config import Config, config_hash, get_level, level_support
from .errors import ConfigError, LevelNotSupportedError

log = logging.getLogger(__name__)

Progress = Callable[[str, int], Any]  # (description, total) -> object with update(n) and close()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Pipeline:
    def __init__(self, config: Config, out: str | os.PathLike = "build", *, device: str = "auto",
                 progress: Progress | None = None, force: bool = False):
        self.config = config
        self.device = device
        self.force = force
        self._progress = progress or (lambda desc, total: _NoProgress())
        from .models import model_name

        self.name = model_name(config.model)
        self.out = Path(out)
        self.scheme = get_level(config.quant.level)
        self.timings: dict[str, float] = {}
        self._loaded = None
        self._smoothed_with: str | None = None  # hash of the scales applied to the in-memory model
        self._tokens: dict[str, torch.Tensor] = {}  # text source -> token ids (same tokenizer)
        self._kind_alphas: dict[str, float] | None = None  # searched once per run (h() asks often)
        self._torch_device: torch.device | None = None
        self.report_extras = True  # report(): per-layer diagnosis and the FP16 graph's score too

    @property
    def torch_device(self) -> torch.device:
        """Where PyTorch computes (calibration, smoothing statistics, alpha search, clip choice, fallback,
        fake-quant perplexity): ``device`` as given (``auto``: CUDA when torch sees a GPU, else the CPU).
        ``device`` also picks ONNX Runtime's provider (sq2trt.engine.providers)."""
        if self._torch_device is None:
            from .onload import resolve_device

            self._torch_device = resolve_device(self.device)
        return self._torch_device

    def adopt(self, other: "Pipeline") -> None:
        """Share ``other``'s loaded model (and its smoothing state) instead of loading it again."""
        if other.config.model == self.config.model and other._loaded is not None:
            self._loaded, self._smoothed_with = other._loaded, other._smoothed_with
            self._tokens = other._tokens
            self.timings.setdefault("load_model", other.timings.get("load_model", 0.0))

    # ------------------------------------------------------------------ paths and hashes
    @property
    def model_dir(self) -> Path:
        return self.out / self.name

    @property
    def level_dir(self) -> Path:
        return self.model_dir / self.config.quant.level

    def path(self, name: str) -> Path:
        return self.level_dir / name

    def _model_id(self) -> list[Any]:
        """The model by content: a GGUF file, a ``random:<config.json>`` or every top-level file of a
        local directory (config, tokenizer, weights) by sha256 (artifacts.file_digest: why full
        hashes, and how they are cached); a Hub id or ``random:<name>`` by its name (a tiny config
        lives in sq2trt's source, which the source fingerprint covers)."""
        from .artifacts import file_digest

        spec = self.config.model
        ident: list[Any] = [self.config.trust_remote_code]
        if spec.startswith("random:"):
            cfg = Path(spec[len("random:"):])
            return ident + ["random", file_digest(cfg) if cfg.suffix == ".json" and cfg.is_file() else spec]
        p = Path(spec)
        if p.is_file():
            return ident + [file_digest(p)]
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            return ident + [(f.name, file_digest(f)) for f in files]
        return ident + [spec]

    @property
    def alpha(self) -> float:
        a = self.config.quant.alpha
        if a is None and self.scheme.alpha_search:
            return self.searched_alpha()
        return float(self.arch.alpha if a is None else a)

    def searched_alpha(self) -> float:
        """SmoothQuant+: alpha searched on the calibration windows (sq2trt.search), cached as
        ``<level>/alpha_search.json`` (chosen alpha, loss per alpha, search time)."""
        from safetensors.torch import load_file

        from .plan import make_plan
        from .search import search_alpha

        q = self.config.quant
        path = self.path("alpha_search.json")
        # smooths as smooth() will: the same folds, the fixed per-kind alphas (a kind search, if any,
        # starts from the alpha found here)
        h = config_hash(self.h("stats"), q.level, q.fp_fallback, q.smooth_folds, q.alpha_by_kind, "search-v2")
        if not self.force and fresh(path, h):
            return float(read_json(path)["alpha"])
        stats = load_file(str(self.calibrate()))
        self._require_raw_model()
        plan = make_plan(self.gemm_names(), q, {}, layout=self.arch.layout.value)
        windows = self._windows("calib")
        from .search import GRID

        bar = self._progress("alpha search (SmoothQuant+)", len(GRID))
        try:
            with self._timed("alpha_search"):
                res = search_alpha(self.loaded.model, self.arch, stats, plan, windows, progress=bar.update,
                                   folds=q.smooth_folds, alpha_by_kind=q.alpha_by_kind)
        finally:
            bar.close()
        ensure_dir(self.level_dir)
        write_json(path, res.to_dict())
        stamp(path, h, seconds=res.seconds)
        return res.alpha

    @property
    def kind_alphas(self) -> dict[str, float]:
        """Per-kind alphas: ``quant.alpha_by_kind``, or the searched ones with ``search_alpha_by_kind``."""
        q = self.config.quant
        if q.search_alpha_by_kind and self.scheme.smooth and self.scheme.quantizes:
            if self._kind_alphas is None:
                self._kind_alphas = self.searched_kind_alphas()
            return dict(self._kind_alphas)
        return dict(q.alpha_by_kind)

    def searched_kind_alphas(self) -> dict[str, float]:
        """Alpha per group kind by coordinate descent on the whole model's KL vs floating point
        (sq2trt.alpha_search) on the first two calibration windows (256 tokens each), starting from
        ``alpha_by_kind`` / ``alpha``; cached as ``<level>/alpha_by_kind.json``."""
        from safetensors.torch import load_file

        from .alpha_search import search_alphas

        q = self.config.quant
        path = self.path("alpha_by_kind.json")
        h = config_hash(self.h("stats"), q.level, q.alpha, q.alpha_by_kind, q.smooth_folds, q.weight_granularity,
                        q.fp_fallback, "kind-search-v1")
        if not self.force and fresh(path, h):
            return {k: float(v) for k, v in read_json(path)["alphas"].items()}
        stats = load_file(str(self.calibrate()))
        self._require_raw_model()
        model = self.loaded.model
        names = quantized_linear_names(model, self.arch, skip=q.fp_fallback)
        quant = q if q.alpha is not None else dataclasses.replace(q, alpha=self.alpha)
        t0 = time.perf_counter()
        with self._timed("alpha_search"):
            res = search_alphas(model, self.arch, stats, names, quant, self._windows("calib")[:2, :256])
        log.info("alpha per kind: %s (calibration KL %.4g -> %.4g, %d evaluations, %.0f s)", res.alphas,
                 res.start_loss, res.loss, len(res.history), time.perf_counter() - t0)
        ensure_dir(self.level_dir)
        write_json(path, {"alphas": res.alphas, "kl": res.loss, "kl_start": res.start_loss,
                          "history": res.history, "seconds": time.perf_counter() - t0})
        stamp(path, h)
        return {k: float(v) for k, v in res.alphas.items()}

    def h(self, step: str) -> str:
        """Config hash of a step's artifact: what it was made from, by content (model files and
        text by sha256, not path or mtime), plus sq2trt's source fingerprint and the versions of the
        libraries the step runs through (artifacts.tool_versions)."""
        from . import artifacts

        c, q = self.config, self.config.quant
        v = artifacts.tool_versions()
        calib = dataclasses.replace(c.calib, data=artifacts.source_id(c.calib.data))
        # the weights' stored dtype (by --dtype and the model's files) and the compute device change the
        # numbers of every PyTorch step (layer-wise FP32 compute: sq2trt.onload)
        model = config_hash(self._model_id(), artifacts.source_fingerprint(), v["torch"], v["transformers"],
                            c.dtype, self.torch_device.type)
        stats = config_hash(model, calib)
        if step == "stats":  # before any alpha: a searched alpha (SmoothQuant+) itself needs the stats
            return stats
        # levels without smoothing do not depend on calibration statistics
        smooth = (config_hash(stats, self.alpha, q.smooth_folds, self.kind_alphas) if self.scheme.smooth
                  else config_hash(model, None))
        hashes = {
            "stats": stats,
            "base": config_hash(model, c.opset, v["onnx"]),
            "smooth": smooth,
            "scales": config_hash(smooth, calib, q.act_clip,
                                  q.act_percentile if q.act_clip in ("percentile", "auto") else None,
                                  # auto chooses on the quantized model's output: its weights and FP set matter
                                  (q.level, q.weight_granularity, q.fp_fallback) if q.act_clip == "auto" else None),
        }
        hashes["fallback"] = config_hash(hashes["scales"], q.weight_granularity, q.fp_fallback, q.max_ppl_increase)
        hashes["ref"] = config_hash(hashes["base"], smooth)
        from .export import QDQ_FORMAT

        hashes["quant"] = config_hash(hashes["ref"], hashes["scales"], q, QDQ_FORMAT)
        hashes["engine"] = config_hash(hashes["quant"], "ort", self.device, v["onnxruntime"])
        evald = dataclasses.replace(c.eval, data=artifacts.source_id(c.eval.data))
        hashes["compare"] = config_hash(hashes["engine"], evald)
        # the reference's perplexity, which another level with the same ref.onnx may reuse
        hashes["ref_ppl"] = config_hash(hashes["ref"], evald, "ort", self.device, v["onnxruntime"])
        hashes["fp16"] = config_hash(hashes["quant"], "fp16")
        hashes["plan"] = config_hash(hashes["fp16"], "trt", dataclasses.replace(c.trt, timing_cache=""))
        return hashes[step]

    def _reuse(self, path: Path, step: str) -> bool:
        if not self.force and fresh(path, self.h(step)):
            log.info("reusing %s (config hash %s)", path, self.h(step))
            return True
        return False

    @contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        """Time a step into ``self.timings`` and log one line when it ends, "<step> done in X s" (or
        "<step> stopped after X s" when it raised), so a log file shows where the time went."""
        t = time.perf_counter()
        try:
            yield
        except BaseException:
            log.info("%s stopped after %.1f s", step, time.perf_counter() - t)
            raise
        self.timings[step] = round(time.perf_counter() - t, 2)
        log.info("%s done in %.1f s", step, self.timings[step])

    # ------------------------------------------------------------------ model and data
    @property
    def loaded(self):
        if self._loaded is None:
            from .models import load_model

            with self._timed("load_model"):
                self._loaded = load_model(self.config.model, trust_remote_code=self.config.trust_remote_code,
                                          dtype=self.config.dtype)
            self._smoothed_with = None
            self._attach_layerwise(self._loaded.model)
        return self._loaded

    def _attach_layerwise(self, model: torch.nn.Module) -> None:
        """Weights stored other than FP32 on the compute device: every forward computes in FP32 on
        ``torch_device`` one decoder layer at a time (sq2trt.onload), so every caller of the model works
        unchanged. An FP32 model computing on the CPU gets no hooks at all."""
        from .onload import Layerwise, needs_layerwise

        if needs_layerwise(model, self.torch_device):
            Layerwise(model, get_arch(model), self.torch_device).attach()

    @contextmanager
    def _fp32_model(self) -> Iterator[torch.nn.Module]:
        """The in-memory model (as it is now: smoothed or not) as a hook-free FP32 CPU model for the
        dynamo exporter's trace (``base_onnx``, once per model; the export step's fallback re-export);
        stored back in its own dtype afterwards (exact). Everything else reads the stored weights."""
        from .onload import fp32_cpu

        with fp32_cpu(self.loaded.model) as model:
            yield model

    @property
    def arch(self) -> Arch:
        return get_arch(self.loaded.model)

    def gemm_names(self, *, with_fallback: bool = False) -> list[str]:
        skip = () if with_fallback else self.fp_fallback()
        return quantized_linear_names(self.loaded.model, self.arch, skip=skip)

    def _token_ids(self, source: str) -> torch.Tensor:
        from .data import load_text, tokenize

        if source not in self._tokens:
            self._tokens[source] = tokenize(load_text(source), self.loaded.tokenizer)
        return self._tokens[source]

    def fp_fallback(self) -> tuple[str, ...]:
        """The user's ``fp_fallback`` plus, when ``max_ppl_increase`` > 0, the automatic one
        (sq2trt.fallback); the automatic step writes fallback.json and <level>/recipe.yaml."""
        q = self.config.quant
        if q.max_ppl_increase <= 0 or not self.scheme.quantizes:
            return q.fp_fallback
        path = self.path("fallback.json")
        if not self._reuse(path, "fallback"):
            self._auto_fallback(path)
        return tuple(q.fp_fallback) + tuple(read_json(path)["fallback"])

    def _auto_fallback(self, path: Path) -> None:
        from .config import dump_recipe
        from .data import calibration_starts
        from .fallback import auto_fallback, heldout_windows
        from .plan import make_plan

        q, c = self.config.quant, self.config.calib
        scales = self.act_scales()
        model = self.prepared_model()
        plan = make_plan(quantized_linear_names(model, self.arch, skip=q.fp_fallback), q, scales,
                         layout=self.arch.layout.value)
        ids = self._token_ids(c.data)
        starts = calibration_starts(ids.numel(), c.num_samples, c.seq_len, c.seed)
        heldout = heldout_windows(ids, starts, c.seq_len, num=max(2, c.num_samples // 4), window=c.seq_len)
        with self._timed("fallback"):
            res = auto_fallback(model, plan, self._windows("calib")[:2, :256], heldout, q.max_ppl_increase)
        write_json(path, {**res.to_dict(), "heldout_tokens": int(heldout.numel())})
        dump_recipe(self.config.replace(quant={"fp_fallback": list(q.fp_fallback) + res.fallback,
                                               "max_ppl_increase": 0.0}),
                    self.path("recipe.yaml"), family=self.arch_name(),
                    notes=f"automatic FP fallback for max_ppl_increase={q.max_ppl_increase}: {len(res.fallback)} "
                          f"GEMMs, held-out calibration ppl increase {res.increase:.4f} "
                          f"({'met' if res.met else 'NOT met'})")
        stamp(path, self.h("fallback"), met=res.met)  # last: fallback.json and its recipe are both written

    def arch_name(self) -> str:
        from .archs import arch_name

        return arch_name(self.loaded.model)

    def _windows(self, which: str) -> torch.Tensor:
        from .data import bos_prefix, calibration_windows, eval_windows

        if which == "calib":
            c = self.config.calib
            return calibration_windows(self._token_ids(c.data), c.num_samples, c.seq_len, c.seed,
                                       bos=bos_prefix(self.loaded.tokenizer))
        e = self.config.eval
        ids = self._token_ids(e.data)
        if which == "eval":
            return eval_windows(ids, e.window, e.max_tokens)
        return eval_windows(ids, e.compare_seq_len)[: e.compare_samples]  # "compare"

    def _collect(self, desc: str, names: list[str], reducer, *, running: bool = False) -> dict[str, Any]:
        from .calibrate import collect, collect_with

        windows = self._windows("calib")
        bar = self._progress(desc, windows.shape[0])
        try:
            if running:  # reducer is an Update: (prev, x) -> new
                if self.torch_device.type != "cpu":  # running histograms (sq2trt.clipping) live on the CPU
                    update = reducer
                    reducer = lambda prev, x: update(prev, x.detach().float().cpu())  # noqa: E731
                return collect_with(self.loaded.model, names, windows, reducer, progress=bar.update)
            return collect(self.loaded.model, names, windows, reducer, progress=bar.update)
        finally:
            bar.close()

    # ------------------------------------------------------------------ steps
    def calibrate(self) -> Path:
        """Per-channel max|x| at the input of every quantized Linear (unsmoothed model)."""
        from safetensors.torch import load_file, save_file

        from .artifacts import producing
        from .calibrate import per_channel_absmax

        path = self.model_dir / "act_stats.safetensors"
        if self._reuse(path, "stats"):
            return path
        ensure_dir(self.model_dir)
        self._require_raw_model()
        with self._timed("calibrate"):
            stats = self._collect("calibrate (per-channel max|x|)", self.gemm_names(with_fallback=True),
                                  per_channel_absmax)
        with producing(path) as tmp:
            save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp))
        stamp(path, self.h("stats"), calib=self.config.calib.__dict__, seconds=self.timings["calibrate"])
        load_file(str(path))  # fail now, not later, if the file is unreadable
        return path

    def smooth(self) -> Path | None:
        """Smoothing scales for this level (None for levels without smoothing); folds them into the
        in-memory model."""
        from safetensors.torch import load_file, save_file

        from .artifacts import producing
        from .archs import GROUP_KINDS
        from .smooth import group_scales

        if not self.scheme.smooth:
            self._require_raw_model()
            return None
        path = self.path("smooth_scales.safetensors")
        if not self._reuse(path, "smooth"):
            stats = load_file(str(self.calibrate()))
            self._require_raw_model()
            with self._timed("smooth"):
                q = self.config.quant
                alpha = {**{k: self.alpha for k in GROUP_KINDS}, **self.kind_alphas}
                scales = group_scales(self.loaded.model, self.arch, stats, alpha, q.smooth_folds)
            with producing(path) as tmp:
                save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp))
            stamp(path, self.h("smooth"), alpha=self.alpha, alpha_by_kind=self.kind_alphas,
                  smooth_folds=list(q.smooth_folds))
        self._apply_smoothing(path)
        return path

    def _require_raw_model(self) -> None:
        if self._smoothed_with is not None:  # smoothing is exact but not undone in place: reload
            self._loaded = None

    def _apply_smoothing(self, path: Path) -> None:
        from safetensors.torch import load_file

        from .smooth import apply_scales

        h = self.h("smooth")
        if self._smoothed_with == h:
            return
        self._require_raw_model()
        apply_scales(self.loaded.model, self.arch, load_file(str(path)))
        self._smoothed_with = h

    def prepared_model(self) -> torch.nn.Module:
        """The in-memory model as this level exports it (smoothed when the level smooths)."""
        self.smooth()
        return self.loaded.model

    def act_scales(self) -> dict[str, float]:
        """Static per-tensor clip values (max or percentile of |x|) on the smoothed model."""
        from .calibrate import per_tensor_absmax

        if self.scheme.act is None or not self.scheme.act_static:
            return {}
        path = self.path("act_scales.json")
        if self._reuse(path, "scales"):
            return read_json(path)
        self.prepared_model()
        q = self.config.quant
        # a tensor's max |x| is the max of its channels' max |x|: on the unsmoothed model, the per-channel
        # statistics of `calibrate` (same windows, same Linears) already hold it exactly, no second pass
        channel_stats = self.calibrate() if q.act_clip == "max" and not self.scheme.smooth else None
        with self._timed("calibrate_static"):
            if channel_stats is not None:
                from safetensors.torch import load_file

                channel = load_file(str(channel_stats))
                scales = {k: float(channel[k].max()) for k in self.gemm_names(with_fallback=True)}
            elif q.act_clip == "max":
                stats = self._collect("calibrate (static max)", self.gemm_names(with_fallback=True), per_tensor_absmax)
                scales = {k: float(v) for k, v in stats.items()}
            elif q.act_clip == "auto":
                scales = self._auto_clips()
            else:  # one running |x| histogram per tensor, then percentile / MSE-optimal clip
                from .clipping import clip_from_hist, hist_update

                hists = self._collect(f"calibrate (static {q.act_clip})", self.gemm_names(with_fallback=True),
                                      hist_update, running=True)
                scales = {k: clip_from_hist(h, q.act_clip, q.act_percentile) for k, h in hists.items()}
        write_json(path, scales)
        stamp(path, self.h("scales"), act_clip=q.act_clip)
        return scales

    def _auto_clips(self) -> dict[str, float]:
        """``act_clip: auto``: per GEMM kind, max / percentile / MSE clip, whichever gives the lowest
        mean KL vs floating point on the first two calibration windows (256 tokens each). One
        calibration pass collects a histogram and the exact max per tensor; the choice and its losses
        go to ``<level>/clip_choice.json``."""
        from .alpha_search import amax_loss, logits_of
        from .archs import gemm_kind
        from .clipping import choose_clips, clip_candidates, hist_update

        q = self.config.quant
        names = self.gemm_names(with_fallback=True)

        def update(prev, x):
            m = float(x.detach().abs().max()) if x.numel() else 0.0
            return hist_update(None if prev is None else prev[0], x), max(m, 0.0 if prev is None else prev[1])

        both = self._collect("calibrate (static auto: max, percentile, MSE)", names, update, running=True)
        cands = clip_candidates({n: h for n, (h, _) in both.items()}, {n: m for n, (_, m) in both.items()},
                                q.act_percentile)
        model = self.loaded.model  # the prepared (smoothed) model: its FP logits are the reference
        quantized = [n for n in quantized_linear_names(model, self.arch, skip=q.fp_fallback) if n in cands]
        windows = self._windows("calib")[:2, :256]
        loss = amax_loss(model, quantized, q, windows, logits_of(model, windows), layout=self.arch.layout.value)
        choice = choose_clips({n: gemm_kind(self.arch, n) for n in names}, cands, loss)
        log.info("act_clip auto: %s (calibration KL %.4g with max everywhere -> %.4g)", choice.methods,
                 choice.start_loss, choice.loss)
        path = self.path("clip_choice.json")
        write_json(path, {"methods": choice.methods, "kl": choice.loss, "kl_max_everywhere": choice.start_loss,
                          "history": choice.history, "windows": list(windows.shape)})
        stamp(path, self.h("scales"), act_clip="auto")
        return choice.amax

    def base_onnx(self) -> Path:
        path = self.model_dir / "base.onnx"
        if self._reuse(path, "base"):
            return path
        ensure_dir(self.model_dir)
        self._require_raw_model()
        with self._timed("export_base"):
            log.info("exporting %s to ONNX (torch.onnx dynamo exporter, weightless trace; minutes for 100M+ "
                     "models)", self.name)
            from .export import export_base

            how = export_base(self.loaded.model, path, opset=self.config.opset)
        stamp(path, self.h("base"), opset=self.config.opset, seconds=self.timings["export_base"], trace=how)
        return path

    def export(self) -> tuple[Path, Path]:
        """ref.onnx (this level's weights, no Q/DQ) and <level>.onnx (Q/DQ), from the same graph."""
        from .export import check_against_torch, insert_qdq, load_onnx, save_onnx, write_reference
        from .plan import make_plan

        ref = self.path("ref.onnx")
        quant = self.path(f"{self.config.quant.level}.onnx")
        if self.scheme.quantizes and self._reuse(ref, "ref") and self._reuse(quant, "quant"):
            return ref, quant
        if not self.scheme.quantizes and self._reuse(ref, "ref"):
            return ref, ref
        base = self.base_onnx()
        scales = self.act_scales()
        self.prepared_model()
        plan = self.plan()
        ensure_dir(self.level_dir)
        # The model as stored (FP16/BF16 stays so; sq2trt.onload computes its forwards in FP32 one layer
        # at a time): the reference's weights are streamed to its data file one tensor at a time and no
        # whole-model FP32 copy is made here.
        from .onload import compute_on

        model = self.loaded.model
        with self._timed("export"), compute_on(model, "cpu"):  # checked against ORT on the CPU (compute_on)
            if (not fresh(ref, self.h("ref")) or self.force) and not self._share("ref.onnx", "ref"):
                # graph only: tensors the model does not own stay in base.onnx's data until saved
                write_reference(load_onnx(base, load_external_data=False), model, ref, base_dir=base.parent)
                err = check_against_torch(model, ref)
                if err > 1e-4:
                    log.warning("weight refresh of %s differs from PyTorch by %.2e; exporting afresh", ref, err)
                    from .export import export_reference

                    with self._fp32_model() as m:
                        export_reference(m, ref, opset=self.config.opset)
                    err = check_against_torch(model, ref)
                if err > 1e-4:
                    raise RuntimeError(f"exported {ref} differs from PyTorch by {err:.2e} (relative) > 1e-4")
                stamp(ref, self.h("ref"), max_rel_vs_torch=err, alpha=self.alpha if self.scheme.smooth else None)
            if not self.scheme.quantizes:
                return ref, ref
            from .artifacts import crash_point

            crash_point("export:mid")
            if fresh(quant, self.h("quant")) and not self.force:  # ref rebuilt, the Q/DQ graph still trusted
                return ref, quant
            bmm = self._bmm_scales(ref) if self.config.quant.quantize_bmm else None
            qproto = insert_qdq(load_onnx(ref, load_external_data=False), plan, level=self.config.quant.level,
                                bmm=bmm, base_dir=ref.parent,
                                metadata={"sq2trt.alpha": self.alpha if self.scheme.smooth else "none",
                                          "sq2trt.config_hash": self.h("quant")})
            save_onnx(qproto, quant, base_dir=ref.parent)
            # PyTorch fake quantization models the Linears only: with quantized BMMs the graph is
            # not checked here (None) rather than checked against a wrong reference.
            check = None if bmm else self._check_export(quant, ref, plan)
            stamp(quant, self.h("quant"), gemms=len(plan), fp_fallback=list(self.fp_fallback()),
                  export_check=check)
        return ref, quant

    def _share(self, name: str, step: str) -> bool:
        """Link ``name`` from another level of this model whose copy has this level's config hash for
        ``step`` (artifacts.share): e.g. one reference ONNX for fp and every level without smoothing, one
        for the smoothed levels of the same alpha. Never with ``--force``."""
        from .artifacts import share

        if self.force:
            return False
        want = self.h(step)
        return any(share(p, self.path(name), want) for p in sorted(self.model_dir.glob(f"*/{name}"))
                   if p.parent != self.level_dir)

    def _bmm_scales(self, ref: Path) -> dict[str, float]:
        """Static amax of both inputs of every attention BMM, measured through ONNX Runtime on the
        reference graph (they are not module inputs, so PyTorch hooks cannot see them)."""
        from .export import bmm_inputs, calibrate_tensors, load_onnx

        if not self.scheme.act_static:
            raise ConfigError("--quantize-bmm needs a level with static activations (O3, W8A8)")
        path = self.path("bmm_scales.json")
        from .artifacts import tool_versions

        h = config_hash(self.h("ref"), self.h("scales"), "bmm", tool_versions()["onnxruntime"])
        if not self.force and fresh(path, h):
            return read_json(path)
        tensors = sorted({t for ins in bmm_inputs(load_onnx(ref, load_external_data=False)).values() for t in ins})
        windows = self._windows("calib").numpy()
        bar = self._progress("calibrate (attention BMMs)", windows.shape[0])
        try:
            scales = calibrate_tensors(ref, tensors, windows, progress=bar.update)
        finally:
            bar.close()
        write_json(path, scales)
        stamp(path, h)
        return scales

    def _check_export(self, quant: Path, ref: Path, plan) -> dict[str, Any]:
        """Verify the Q/DQ graph against PyTorch fake quantization (see sq2trt.verify); a failure
        means the export is wrong, not that INT8 is inexact, and removes the graph."""
        from .errors import ExportMismatchError
        from .onload import compute_on
        from .verify import check_export_files

        ids = self._windows("compare")[:2, :64].numpy()
        with compute_on(self.loaded.model, "cpu") as model:  # ORT runs the graphs on the CPU: same arithmetic
            check = check_export_files(quant, ref, model, plan, f"{self.arch.layers}.0.", ids)
        log.info("export check: %s", check)
        if not check:
            quant.unlink(missing_ok=True)
            raise ExportMismatchError(f"{quant.name} does not compute its quantization plan: {check}. "
                                      "This is a bug in sq2trt's export; please report it with the model name.")
        return check.to_dict()

    def build(self, backend: str = "ort") -> Path:
        why = level_support(self.config.quant.level, backend)
        if why:
            raise LevelNotSupportedError(why)
        if backend == "trt":
            return self.build_plan()
        if backend != "ort":
            raise ConfigError(f"unknown backend {backend!r}; choose ort or trt")
        from .engine import build_ort_engine

        engine = self.path(f"{self.config.quant.level}.ort.onnx")
        if self._reuse(engine, "engine"):
            return engine
        _, quant = self.export()
        with self._timed("build"):
            info = build_ort_engine(quant, engine, device=self.device)
        stamp(engine, self.h("engine"), **info)
        return engine

    def trt_onnx(self, *, lint: bool = True) -> Path:
        """``<level>.fp16.onnx``: the Q/DQ export with its own FP16 types, what a strongly typed
        TensorRT network is built from (sq2trt.fp16); linted against TensorRT's Q/DQ rules."""
        from .fp16 import write_fp16

        path = self.path(f"{self.config.quant.level}.fp16.onnx")
        if not self._reuse(path, "fp16"):
            _, quant = self.export()
            with self._timed("fp16"):
                summary = write_fp16(quant, path)
            stamp(path, self.h("fp16"), **summary.to_dict())
        if lint:
            self.lint(path)
        return path

    def lint(self, path: Path) -> None:
        """Raise LintFailedError listing the findings when ``path`` breaks TensorRT's Q/DQ rules."""
        from .lint import lint_model
        from .trt import LintFailedError

        report = lint_model(path)
        for finding in report.warnings:
            log.warning("lint %s: %s", path.name, finding)
        if not report:
            raise LintFailedError(f"{path} breaks TensorRT's Q/DQ rules, not building it:\n{report}")

    def build_plan(self) -> Path:
        """TensorRT ``<level>.plan`` (+ ``<level>.plan.json``) through sq2trt.trt."""
        from . import trt as trtmod

        trtmod.trt._load()  # BackendUnavailableError (what to install) before any long step
        plan = self.path(f"{self.config.quant.level}.plan")
        if self._reuse(plan, "plan"):
            try:
                trtmod.check_plan(plan)
                return plan
            except trtmod.PlanMismatchError as exc:
                log.info("rebuilding %s: %s", plan.name, exc)
        _, quant = self.export()
        fp16 = self.trt_onnx(lint=False)
        self.lint(fp16)
        self.lint(quant)
        t = self.config.trt
        for what, (b, n) in (("eval window", (1, self.config.eval.window)),
                             ("comparison", (1, self.config.eval.compare_seq_len))):
            why = t.uncovered(b, n)
            if why:
                log.warning("%s: %s", what, why)
        cache = Path(t.timing_cache) if t.timing_cache else trtmod.default_timing_cache(
            self.model_dir, trtmod.runtime_environment())
        ref_meta = read_meta(self.path("ref.onnx"))
        with self._timed("build"):
            meta = trtmod.build_plan(fp16, quant, plan, t, timing_cache=cache, level=self.config.quant.level,
                                     alpha=ref_meta.get("alpha"), calibration=self._calibration_summary(),
                                     quant=self._quant_meta(), model=self.config.model)
        stamp(plan, self.h("plan"), backend="trt", tensorrt=meta["tensorrt"], gpu=meta["gpu"])
        return plan

    def _calibration_summary(self) -> dict[str, Any]:
        scales = self.act_scales()
        c, q = self.config.calib, self.config.quant
        vals = sorted(scales.values())
        return {"data": c.data, "num_samples": c.num_samples, "seq_len": c.seq_len, "seed": c.seed,
                "act_clip": q.act_clip, "act_percentile": q.act_percentile if q.act_clip == "percentile" else None,
                "static_scales": len(vals), "amax_min": vals[0] if vals else None,
                "amax_median": vals[len(vals) // 2] if vals else None, "amax_max": vals[-1] if vals else None}

    def compare(self) -> dict[str, Any]:
        """Polygraphy logits diff (engine vs ref.onnx) on the comparison windows, and a *paired*
        comparison of both on the evaluation windows (the same tokens): perplexities, the perplexity
        increase and the top-1 agreement, each with a 95% interval (sq2trt.stats)."""
        from .compare import compare_logits
        from .engine import session
        from .evaluate import ort_logits_fn, paired_summary, score_tokens

        path = self.path("compare.json")
        if self._reuse(path, "compare"):
            return read_json(path)
        engine = self.build()
        ref = self.path("ref.onnx")
        with self._timed("compare"):
            diff = compare_logits(ref, engine, self._windows("compare").numpy(), device=self.device)
        windows = self._windows("eval")
        scores = {"reference": self._cached_ref_ppl()}
        with self._timed("perplexity"):
            for which, model_path in (("reference", ref), ("engine", engine)):
                if scores.get(which) is not None:
                    continue
                bar = self._progress(f"perplexity ({which})", windows.shape[0])
                try:
                    scores[which] = score_tokens(ort_logits_fn(session(model_path, device=self.device)), windows,
                                                 progress=bar.update)
                finally:
                    bar.close()
                if which == "reference":  # per-token scores, for other levels and the FP16 graph's score
                    ref_scores = self.path("ref_eval.npz")
                    scores[which].save(ref_scores)
                    stamp(ref_scores, self.h("ref_ppl"))
        paired = paired_summary(scores["reference"], scores["engine"])
        ppl = {"reference": paired["ppl_reference"], "engine": paired["ppl_engine"]}
        result = {"logits": diff.to_dict(), "ppl": ppl,
                  "ppl_increase": paired["ppl_increase"]["value"],
                  "paired": paired,
                  "eval_config": dict(self.config.eval.__dict__),
                  "eval": {"data": self.config.eval.data, "window": self.config.eval.window,
                           "tokens": int(windows.numel()), "windows": int(windows.shape[0])},
                  "export_check": self._quant_meta().get("export_check"), "ref_ppl_hash": self.h("ref_ppl")}
        write_json(path, result)
        stamp(path, self.h("compare"))
        return result

    # ------------------------------------------------------------------ evaluate / diagnose
    def plan(self):
        """The quantization plan the export used (None for levels that do not quantize)."""
        from .plan import make_plan

        if not self.scheme.quantizes:
            return None
        return make_plan(self.gemm_names(), self.config.quant, self.act_scales(), layout=self.arch.layout.value)

    def evaluate(self, tasks: Sequence[str] = (), *, task_limit: int = 0, task_data: str | None = None,
                 batch_tokens: int = 4096) -> dict[str, Any]:
        """Perplexity three ways (PyTorch float, PyTorch fake-quant, the engine both as the exact
        Q/DQ graph and as the optimized ORT engine) and zero-shot task accuracy: ``eval.json``."""
        from .artifacts import file_digest
        from .evaluation import evaluate_pipeline

        resolved = self._resolve_tasks(tasks, task_limit, task_data)
        # the engine and the eval text (both in the "compare" hash), task files by content
        tasks_id = [(name, file_digest(p), len(examples)) for name, p, examples in resolved]
        h = config_hash(self.h("compare"), tasks_id, batch_tokens, "eval-v3")
        path = self.path("eval.json")
        if not self.force and fresh(path, h):
            log.info("reusing %s (config hash %s)", path, h)
            return read_json(path)
        result = evaluate_pipeline(self, resolved, batch_tokens=batch_tokens)
        write_json(path, result)
        stamp(path, h)
        return result

    def _resolve_tasks(self, tasks: Sequence[str], limit: int, data: str | None):
        from .tasks import resolve_task

        out = []
        for t in tasks:
            name, p, examples = resolve_task(t, data)
            out.append((name, p, examples[:limit] if limit else examples))
        return out

    def diagnose(self, *, top: int = 5) -> dict[str, Any]:
        """Per-layer / per-GEMM error of the Q/DQ graph vs ref.onnx (Polygraphy): ``layers.json``."""
        from .diagnose import diagnose

        if not self.scheme.quantizes:
            raise ConfigError(f"level {self.config.quant.level} quantizes nothing; diagnose a quantized level "
                              "(--level O3 or W8A8)")
        from . import artifacts

        ref, quant = self.export()
        e = self.config.eval
        h = config_hash(self.h("quant"), artifacts.source_id(e.data), e.compare_samples, e.compare_seq_len, top,
                        artifacts.tool_versions()["onnxruntime"], "diagnose-v3")
        path = self.path("layers.json")
        if not self.force and fresh(path, h):
            return read_json(path)
        with self._timed("diagnose"):
            result = diagnose(ref, quant, self._windows("compare").numpy(), top=top, device="cpu",
                              layers_prefix=self.arch.layers)
        result["quant_hash"] = self.h("quant")
        write_json(path, result)
        stamp(path, h)
        return result

    def _quant_meta(self) -> dict[str, Any]:
        quant = self.path(f"{self.config.quant.level}.onnx")
        try:
            return read_meta(quant) if self.scheme.quantizes else {}
        except (OSError, ValueError):
            return {}

    def _cached_ref_ppl(self):
        """Per-token scores (sq2trt.evaluate.TokenScores) of an identical reference (same ref.onnx, eval
        text by content, ORT) on the evaluation windows: ``<level>/ref_eval.npz`` of this or another
        level, stamped with the ``ref_ppl`` hash; None when there is none."""
        from .evaluate import TokenScores

        want = self.h("ref_ppl")
        if self.force:
            return None
        for npz in sorted(self.model_dir.glob("*/ref_eval.npz"), key=lambda p: p.parent != self.level_dir):
            if fresh(npz, want):
                try:
                    return TokenScores.load(npz)
                except (OSError, ValueError, KeyError):
                    continue
        return None

    def report(self) -> dict[str, Any]:
        """compare.json; for quantizing levels the per-layer diagnosis (layers.json: per-GEMM error
        table and per-layer error plot); for levels TensorRT runs, the score of the FP16 graph TensorRT
        is given (fp16_eval.json, sq2trt.evaluation.score_fp16); eval.json when fresh; the plots. Each
        is a stamped artifact, reused only when its config hash matches."""
        from .evaluation import score_fp16
        from .report import build_report, write_report

        cmp = self.compare()
        fp16 = None
        if self.report_extras:
            if self.scheme.quantizes:
                self.diagnose()
            fp16 = score_fp16(self)
        extra = self._report_extras()
        rep = build_report(self, cmp, fp16=fp16, **extra)
        write_report(rep, self.level_dir)
        return rep

    def _report_extras(self) -> dict[str, Any]:
        """eval.json / layers.json / plots when they exist and were made from this config."""
        from .report import make_plots

        out: dict[str, Any] = {}
        for key, name, want in (("evaluation", "eval.json", "engine"), ("diagnosis", "layers.json", "quant")):
            path = self.path(name)
            if not path.exists():
                continue
            d = read_json(path)
            e = self.config.eval
            same_eval = key != "evaluation" or (d.get("eval", {}).get("data"), d.get("eval", {}).get("window"),
                                                d.get("eval", {}).get("max_tokens")) == (e.data, e.window, e.max_tokens)
            if d.get(f"{want}_hash") == self.h(want) and same_eval:
                out[key] = d
            else:
                log.warning("%s was made from another configuration; left out of the report (rerun `sq2trt %s`)",
                            path, "evaluate" if key == "evaluation" else "diagnose")
        out["plots"] = make_plots(self, out.get("diagnosis"))
        return out

    def run(self) -> dict[str, Any]:
        return self.report()

    def environment(self) -> dict[str, Any]:
        import onnx
        import onnxruntime
        import polygraphy
        import transformers

        return {"sq2trt": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "polygraphy": polygraphy.__version__,
                "machine": platform.machine(), "cpu_count": os.cpu_count()}
