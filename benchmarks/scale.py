#!/usr/bin/env python3
"""What each pipeline step costs at real size: wall time, peak host RSS, peak GPU memory, disk.

Runs the pipeline one step at a time in this process (as `sq2trt run` does) and prints, per step:
wall seconds, the peak resident set size during the step (sampled every 20 ms by a thread), the
peak CUDA memory allocated by PyTorch (when a GPU is used), the bytes the process wrote and the
growth of the build directory; then, per level, peak RSS divided by the model's FP16 weight bytes
and how many decoder GEMMs the ONNX Runtime engine runs as fused INT8 kernels
(MatMulIntegerToFloat / QGemm / MatMulInteger) out of the GEMMs the level quantizes.

    python benchmarks/scale.py --model build/models/opt-1.3b-random --levels fp,O3 \\
        --calib-data ../shared/data/wikitext2_tokenized/valid.txt --calib-num-samples 16 --calib-seq-len 256 \\
        --eval-data ../shared/data/wikitext2_raw_test/wiki.test.raw --eval-window 512 --eval-max-tokens 2048 \\
        --out build/scale --json build/scale/scale.json

Every artifact is rebuilt (``--force``) unless ``--reuse`` is given, so the numbers measure work.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

INT8_KERNELS = ("MatMulIntegerToFloat", "QGemm", "MatMulInteger", "DynamicQuantizeMatMul")


class RssSampler:
    """Peak RSS of this process since the last :meth:`reset`, sampled by a daemon thread."""

    def __init__(self, period: float = 0.02):
        import psutil

        self._proc, self._period = psutil.Process(), period
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def reset(self) -> None:
        self.peak = self._proc.memory_info().rss

    def close(self) -> None:
        self._stop.set()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="fp,O3")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts whose hash matches (default: rebuild)")
    ap.add_argument("--fp16", action="store_true", help="also time the FP16 TensorRT input (<level>.fp16.onnx)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--until", help="stop each level after this step (e.g. base_onnx: what loading, calibrating "
                                    "and the base export cost, without building engines)")
    ap.add_argument("--device", default="auto", help="ORT provider / PyTorch device (auto, cpu, cuda)")
    from sq2trt.cli import add_config_flags, config_from_args

    add_config_flags(ap)
    ap.add_argument("--out", default="build/scale")
    args = ap.parse_args()
    steps_known = ("calibrate", "smooth", "act_scales", "base_onnx", "export", "build_ort", "compare", "fp16_onnx")
    if args.until and args.until not in steps_known:
        ap.error(f"--until {args.until}: not a step; choose one of {', '.join(steps_known)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import psutil
    import torch

    from sq2trt.pipeline import Pipeline

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    io = psutil.Process().io_counters if hasattr(psutil.Process(), "io_counters") else None
    sampler = RssSampler()
    rows: list[dict] = []
    out = Path(args.out)

    @contextmanager
    def step(level: str, name: str, model_dir: Path):
        sampler.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        w0, d0, t0 = io().write_bytes if io else 0, dir_bytes(model_dir), time.perf_counter()
        yield
        row = {"level": level, "step": name, "seconds": round(time.perf_counter() - t0, 2),
               "peak_rss_gib": round(sampler.peak / 2**30, 3),
               "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
               "written_gib": round(((io().write_bytes if io else 0) - w0) / 2**30, 3),
               "dir_growth_gib": round((dir_bytes(model_dir) - d0) / 2**30, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    first = None
    summary: list[dict] = []
    for level in args.levels.split(","):
        config = config_from_args(args).replace(quant={"level": level})
        p = Pipeline(config, out=out, device=args.device, force=not args.reuse)
        if first is None:
            with step(level, "load", p.model_dir):
                p.loaded
            first = p
        else:
            p.adopt(first)
        level_peak = sampler.peak
        steps = [("calibrate", p.calibrate), ("smooth", p.smooth), ("act_scales", p.act_scales),
                 ("base_onnx", p.base_onnx), ("export", p.export), ("build_ort", p.build), ("compare", p.compare)]
        if args.fp16 and p.scheme.quantizes:
            steps.append(("fp16_onnx", lambda: p.trt_onnx(lint=False)))
        for name, fn in steps:
            with step(level, name, p.model_dir):
                fn()
            level_peak = max(level_peak, sampler.peak)
            if name in ("calibrate", "base_onnx"):
                p.force = False  # shared across levels: measured once
            if name == args.until:
                break
        if args.until:
            continue
        fp16_bytes = 2 * sum(t.numel() for t in p.loaded.model.parameters())
        engine = p.path(f"{level}.ort.onnx")
        ops = json.loads(Path(f"{engine}.meta.json").read_text()).get("ops", {})
        cmp = p.compare()
        summary.append({"level": level, "peak_rss_gib": round(level_peak / 2**30, 3),
                        "peak_rss_over_fp16_bytes": round(level_peak / fp16_bytes, 3),
                        "fp16_weight_gib": round(fp16_bytes / 2**30, 3),
                        "int8_gemms": sum(ops.get(k, 0) for k in INT8_KERNELS),
                        "quantized_gemms": len(p.plan() or {}),
                        "ppl_reference": cmp["ppl"]["reference"], "ppl_engine": cmp["ppl"]["engine"],
                        "build_dir_gib": round(dir_bytes(p.model_dir) / 2**30, 3)})
        print(json.dumps(summary[-1]), flush=True)
    sampler.close()

    print("\n| level | step | seconds | peak RSS GiB | peak GPU GiB | written GiB | build/ growth GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        print(f"| {r['level']} | {r['step']} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {gpu} | "
              f"{r['written_gib']:.2f} | {r['dir_growth_gib']:.2f} |")
    print("\n| level | peak RSS GiB | / FP16 weight bytes | INT8 GEMMs (ORT engine) | ppl ref | ppl engine | build/ GiB |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['level']} | {s['peak_rss_gib']:.2f} | {s['peak_rss_over_fp16_bytes']:.2f}x "
              f"(FP16 {s['fp16_weight_gib']:.2f} GiB) | {s['int8_gemms']}/{s['quantized_gemms']} | "
              f"{s['ppl_reference']:.3f} | {s['ppl_engine']:.3f} | {s['build_dir_gib']:.2f} |")
    total = sum(r["seconds"] for r in rows)
    print(f"\ntotal {total:.1f} s; machine: {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name()}" if cuda else ", no GPU used"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": rows, "levels": summary, "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
