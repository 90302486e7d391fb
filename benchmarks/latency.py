#!/usr/bin/env python3
"""ONNX Runtime prefill latency of the FP32 engine vs INT8 engines, measured side by side.

Runs are interleaved (fp, int8, fp, int8, ...) in one process so machine noise hits both alike;
prints median and spread per engine and the speed-up ratio. Default shape: batch 4 x 256 tokens
(the paper's prefill setting).

    python benchmarks/latency.py --build build/smollm2-135m-instruct.q4_1 --levels fp,W8A8,O3
    python benchmarks/latency.py --engine fp=a.onnx --engine int8=b.onnx
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, help="build/<model> directory holding <level>/<level>.ort.onnx")
    ap.add_argument("--levels", default="fp,O3", help="levels to time from --build (first is the baseline)")
    ap.add_argument("--engine", action="append", default=[], help="NAME=PATH, instead of --build")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default = all cores)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    from sq2trt.engine import session

    engines: list[tuple[str, Path]] = []
    if args.engine:
        engines = [(e.split("=", 1)[0], Path(e.split("=", 1)[1])) for e in args.engine]
    elif args.build:
        engines = [(lv, args.build / lv / f"{lv}.ort.onnx") for lv in args.levels.split(",")]
    else:
        ap.error("give --build or --engine")
    missing = [str(p) for _, p in engines if not p.is_file()]
    if missing:
        print(f"missing engines: {missing}; run `make engine` first", file=sys.stderr)
        return 2
    sessions = {name: session(p, device="cpu", threads=args.threads) for name, p in engines}
    ids = np.random.default_rng(0).integers(0, 1000, (args.batch, args.seq), dtype=np.int64)
    feeds = {name: {s.get_inputs()[0].name: ids} for name, s in sessions.items()}
    for _ in range(args.warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - t)
    base = engines[0][0]
    base_med = statistics.median(times[base])
    print(f"ONNX Runtime prefill latency, batch {args.batch} x {args.seq} tokens, {args.repeats} interleaved "
          f"runs, {os.cpu_count()} CPUs, threads={args.threads or 'default'}")
    print(f"{'engine':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'speed-up vs ' + base:>16}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                      "speedup": base_med / med}
        print(f"{name:<10} {med*1e3:>10.1f} {min(ts)*1e3:>8.1f} {max(ts)*1e3:>8.1f} {base_med/med:>15.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "seq": args.seq, "engines": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
