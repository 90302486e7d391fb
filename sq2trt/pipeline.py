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

import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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

    def adopt(self, other: "Pipeline") -> None:
        """Share ``other``'s loaded model (and its smoothing state) instead of loading it again."""
        if other.config.model == self.config.model and other._loaded is not None:
            self._loaded, self._smoothed_with = other._loaded, other._smoothed_with
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
        spec = self.config.model
        p = Path(spec)
        ident: list[Any] = [spec, self.config.trust_remote_code]
        if p.exists():
            files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
            ident += [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
        return ident

    @property
    def alpha(self) -> float:
        a = self.config.quant.alpha
        return float(self.arch.alpha if a is None else a)

    def h(self, step: str) -> str:
        c, q = self.config, self.config.quant
        model = config_hash(self._model_id(), __version__)
        stats = config_hash(model, c.calib)
        smooth = config_hash(stats, self.alpha if self.scheme.smooth else None,
                             *([q.smooth_folds, q.alpha_by_kind] if self.scheme.smooth else []))
        hashes = {
            "stats": stats,
            "base": config_hash(model, c.opset),
            "smooth": smooth,
            "scales": config_hash(smooth, q.act_clip, q.act_percentile if q.act_clip == "percentile" else None),
        }
        hashes["fallback"] = config_hash(hashes["scales"], q.weight_granularity, q.fp_fallback, q.max_ppl_increase)
        hashes["ref"] = config_hash(hashes["base"], smooth)
        hashes["quant"] = config_hash(hashes["ref"], hashes["scales"], q)
        hashes["engine"] = config_hash(hashes["quant"], "ort", self.device)
        hashes["compare"] = config_hash(hashes["engine"], c.eval)
        return hashes[step]

    def _reuse(self, path: Path, step: str) -> bool:
        if not self.force and fresh(path, self.h(step)):
            log.info("reusing %s (config hash %s)", path, self.h(step))
            return True
        return False

    @contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - t, 2)
        log.info("%s took %.1f s", step, self.timings[step])

    # ------------------------------------------------------------------ model and data
    @property
    def loaded(self):
        if self._loaded is None:
            from .models import load_model

            with self._timed("load_model"):
                self._loaded = load_model(self.config.model, trust_remote_code=self.config.trust_remote_code)
            self._smoothed_with = None
        return self._loaded

    @property
    def arch(self) -> Arch:
        return get_arch(self.loaded.model)

    def gemm_names(self, *, with_fallback: bool = False) -> list[str]:
        skip = () if with_fallback else self.fp_fallback()
        return quantized_linear_names(self.loaded.model, self.arch, skip=skip)

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
        from .data import calibration_starts, load_text, tokenize
        from .fallback import auto_fallback, heldout_windows
        from .plan import make_plan

        q, c = self.config.quant, self.config.calib
        scales = self.act_scales()
        model = self.prepared_model()
        plan = make_plan(quantized_linear_names(model, self.arch, skip=q.fp_fallback), q, scales)
        ids = tokenize(load_text(c.data), self.loaded.tokenizer)
        starts = calibration_starts(ids.numel(), c.num_samples, c.seq_len, c.seed)
        heldout = heldout_windows(ids, starts, c.seq_len, num=max(2, c.num_samples // 4), window=c.seq_len)
        with self._timed("fallback"):
            res = auto_fallback(model, plan, self._windows("calib")[:2, :256], heldout, q.max_ppl_increase)
        write_json(path, {**res.to_dict(), "heldout_tokens": int(heldout.numel())})
        stamp(path, self.h("fallback"), met=res.met)
        dump_recipe(self.config.replace(quant={"fp_fallback": list(q.fp_fallback) + res.fallback,
                                               "max_ppl_increase": 0.0}),
                    self.path("recipe.yaml"), family=self.arch_name(),
                    notes=f"automatic FP fallback for max_ppl_increase={q.max_ppl_increase}: {len(res.fallback)} "
                          f"GEMMs, held-out calibration ppl increase {res.increase:.4f} "
                          f"({'met' if res.met else 'NOT met'})")

    def arch_name(self) -> str:
        from .archs import arch_name

        return arch_name(self.loaded.model)

    def _windows(self, which: str) -> torch.Tensor:
        from .data import calibration_windows, eval_windows, load_text, tokenize

        if which == "calib":
            c = self.config.calib
            ids = tokenize(load_text(c.data), self.loaded.tokenizer)
            return calibration_windows(ids, c.num_samples, c.seq_len, c.seed)
        e = self.config.eval
        ids = tokenize(load_text(e.data), self.loaded.tokenizer)
        if which == "eval":
            return eval_windows(ids, e.window, e.max_tokens)
        return eval_windows(ids, e.compare_seq_len)[: e.compare_samples]  # "compare"

    def _collect(self, desc: str, names: list[str], reducer, *, running: bool = False) -> dict[str, Any]:
        from .calibrate import collect, collect_with

        windows = self._windows("calib")
        bar = self._progress(desc, windows.shape[0])
        try:
            if running:  # reducer is an Update: (prev, x) -> new
                return collect_with(self.loaded.model, names, windows, reducer, progress=bar.update)
            return collect(self.loaded.model, names, windows, reducer, progress=bar.update)
        finally:
            bar.close()

    # ------------------------------------------------------------------ steps
    def calibrate(self) -> Path:
        """Per-channel max|x| at the input of every quantized Linear (unsmoothed model)."""
        from safetensors.torch import load_file, save_file

        from .artifacts import atomic_path
        from .calibrate import per_channel_absmax

        path = self.model_dir / "act_stats.safetensors"
        if self._reuse(path, "stats"):
            return path
        ensure_dir(self.model_dir)
        self._require_raw_model()
        with self._timed("calibrate"):
            stats = self._collect("calibrate (per-channel max|x|)", self.gemm_names(with_fallback=True),
                                  per_channel_absmax)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp))
        stamp(path, self.h("stats"), calib=self.config.calib.__dict__, seconds=self.timings["calibrate"])
        load_file(str(path))  # fail now, not later, if the file is unreadable
        return path

    def smooth(self) -> Path | None:
        """Smoothing scales for this level (None for levels without smoothing); folds them into the
        in-memory model."""
        from safetensors.torch import load_file, save_file

        from .artifacts import atomic_path
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
                alpha = {**{k: self.alpha for k in GROUP_KINDS}, **q.alpha_by_kind}
                scales = group_scales(self.loaded.model, self.arch, stats, alpha, q.smooth_folds)
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp))
            stamp(path, self.h("smooth"), alpha=self.alpha, alpha_by_kind=q.alpha_by_kind,
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
        with self._timed("calibrate_static"):
            if q.act_clip == "max":
                stats = self._collect("calibrate (static max)", self.gemm_names(with_fallback=True), per_tensor_absmax)
                scales = {k: float(v) for k, v in stats.items()}
            else:  # one running |x| histogram per tensor, then percentile / MSE-optimal clip
                from .clipping import clip_from_hist, hist_update

                hists = self._collect(f"calibrate (static {q.act_clip})", self.gemm_names(with_fallback=True),
                                      hist_update, running=True)
                scales = {k: clip_from_hist(h, q.act_clip, q.act_percentile) for k, h in hists.items()}
        write_json(path, scales)
        stamp(path, self.h("scales"), act_clip=q.act_clip)
        return scales

    def base_onnx(self) -> Path:
        from .export import export_reference

        path = self.model_dir / "base.onnx"
        if self._reuse(path, "base"):
            return path
        ensure_dir(self.model_dir)
        self._require_raw_model()
        with self._timed("export_base"):
            log.info("exporting %s to ONNX (torch.onnx dynamo exporter; minutes for 100M+ models)", self.name)
            export_reference(self.loaded.model, path, opset=self.config.opset)
        stamp(path, self.h("base"), opset=self.config.opset, seconds=self.timings["export_base"])
        return path

    def export(self) -> tuple[Path, Path]:
        """ref.onnx (this level's weights, no Q/DQ) and <level>.onnx (Q/DQ), from the same graph."""
        from .export import check_against_torch, insert_qdq, load_onnx, refresh_weights, save_onnx
        from .plan import make_plan

        ref = self.path("ref.onnx")
        quant = self.path(f"{self.config.quant.level}.onnx")
        if self.scheme.quantizes and self._reuse(ref, "ref") and self._reuse(quant, "quant"):
            return ref, quant
        if not self.scheme.quantizes and self._reuse(ref, "ref"):
            return ref, ref
        base = self.base_onnx()
        scales = self.act_scales()
        model = self.prepared_model()
        ensure_dir(self.level_dir)
        with self._timed("export"):
            if not fresh(ref, self.h("ref")) or self.force:
                proto = refresh_weights(load_onnx(base), model)
                save_onnx(proto, ref)
                err = check_against_torch(model, ref)
                if err > 1e-4:
                    log.warning("weight refresh of %s differs from PyTorch by %.2e; exporting afresh", ref, err)
                    from .export import export_reference

                    export_reference(model, ref, opset=self.config.opset)
                    err = check_against_torch(model, ref)
                if err > 1e-4:
                    raise RuntimeError(f"exported {ref} differs from PyTorch by {err:.2e} (relative) > 1e-4")
                stamp(ref, self.h("ref"), max_rel_vs_torch=err, alpha=self.alpha if self.scheme.smooth else None)
            if not self.scheme.quantizes:
                return ref, ref
            plan = make_plan(self.gemm_names(), self.config.quant, scales)
            qproto = insert_qdq(load_onnx(ref), plan, level=self.config.quant.level,
                                metadata={"sq2trt.alpha": self.alpha if self.scheme.smooth else "none",
                                          "sq2trt.config_hash": self.h("quant")})
            save_onnx(qproto, quant)
            exact = self._graph_vs_fakequant(quant, plan)
            stamp(quant, self.h("quant"), gemms=len(plan), fp_fallback=list(self.fp_fallback()),
                  graph_vs_fakequant_max_rel=exact)
        return ref, quant

    def _graph_vs_fakequant(self, quant: Path, plan) -> float:
        """The Q/DQ graph (ORT without kernel fusions) against PyTorch fake quantization: a gap
        means the export is wrong, not that INT8 is inexact."""
        import numpy as np

        from .engine import session
        from .evaluate import ort_logits_fn, torch_logits_fn
        from .fakequant import fake_quantized

        ids = self._windows("compare")[:1, :64].numpy()
        got = ort_logits_fn(session(quant, device="cpu", optimize=False))(ids)
        with fake_quantized(self.loaded.model, plan):
            want = torch_logits_fn(self.loaded.model)(ids)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        if err > 1e-3:
            log.warning("Q/DQ graph differs from PyTorch fake quantization by %.2e (relative): check the export",
                        err)
        return err

    def build(self, backend: str = "ort") -> Path:
        why = level_support(self.config.quant.level, backend)
        if why:
            raise LevelNotSupportedError(why)
        if backend == "trt":
            from ._lazy import trt

            trt._load()  # raises BackendUnavailableError with what to install
            raise LevelNotSupportedError("TensorRT .plan builds are not implemented in this version")
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

    def compare(self) -> dict[str, Any]:
        """Polygraphy logits diff (engine vs ref.onnx) and perplexity of both on held-out text."""
        from .compare import compare_logits
        from .engine import session
        from .evaluate import ort_logits_fn, perplexity

        path = self.path("compare.json")
        if self._reuse(path, "compare"):
            return read_json(path)
        engine = self.build()
        ref = self.path("ref.onnx")
        with self._timed("compare"):
            diff = compare_logits(ref, engine, self._windows("compare").numpy(), device=self.device)
        windows = self._windows("eval")
        ppl = {}
        with self._timed("perplexity"):
            for which, model_path in (("reference", ref), ("engine", engine)):
                cached = self._cached_ref_ppl() if which == "reference" else None
                if cached is not None:
                    ppl[which] = cached
                    continue
                bar = self._progress(f"perplexity ({which})", windows.shape[0])
                try:
                    ppl[which] = perplexity(ort_logits_fn(session(model_path, device=self.device)), windows,
                                            progress=bar.update)
                finally:
                    bar.close()
        result = {"logits": diff.to_dict(), "ppl": ppl,
                  "ppl_increase": ppl["engine"] / ppl["reference"] - 1.0,
                  "eval_config": dict(self.config.eval.__dict__),
                  "eval": {"data": self.config.eval.data, "window": self.config.eval.window,
                           "tokens": int(windows.numel()), "windows": int(windows.shape[0])},
                  "graph_vs_fakequant_max_rel": self._quant_meta().get("graph_vs_fakequant_max_rel")}
        write_json(path, result)
        stamp(path, self.h("compare"))
        return result

    def _quant_meta(self) -> dict[str, Any]:
        quant = self.path(f"{self.config.quant.level}.onnx")
        try:
            return read_meta(quant) if self.scheme.quantizes else {}
        except (OSError, ValueError):
            return {}

    def _cached_ref_ppl(self) -> float | None:
        """Perplexity of an identical reference (same ref hash, same eval config) from another level."""
        want = (read_meta(self.path("ref.onnx"))["config_hash"], self.config.eval.__dict__)
        for cmp in self.model_dir.glob("*/compare.json"):
            ref_meta = cmp.parent / "ref.onnx.meta.json"
            if cmp.parent == self.level_dir or not ref_meta.exists():
                continue
            try:
                other = read_json(cmp)
                if (read_json(ref_meta)["config_hash"], other["eval_config"]) == want:
                    return float(other["ppl"]["reference"])
            except (KeyError, OSError, ValueError):
                continue
        return None

    def report(self) -> dict[str, Any]:
        from .report import build_report, write_report

        cmp = self.compare()
        rep = build_report(self, cmp)
        write_report(rep, self.level_dir)
        return rep

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
