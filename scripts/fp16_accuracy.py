"""FP16 graph (sq2trt.fp16) vs the FP32 graphs, on real text, in ONNX Runtime (optimize=False).

    PYTHONPATH=. python scripts/fp16_accuracy.py build/<model>/O3 --model <model spec> \
        --text wiki.test.raw --windows 2 --seq 256

Prints, for ref (no Q/DQ) and <level> (Q/DQ): relative L2 and max relative error of the logits
against ref.onnx (FP32, the accuracy reference), top-1 agreement, and the same for a control
that runs *every* op in FP16 (no FP32 islands), to show what the islands are for.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from sq2trt import fp16
from sq2trt.data import eval_windows, load_text, tokenize
from sq2trt.engine import session
from sq2trt.export import load_onnx, save_onnx
from sq2trt.models import load_model


def run(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = session(path, device="cpu", optimize=False)
    return np.concatenate([sess.run(None, {"input_ids": ids[i:i + 1]})[0] for i in range(len(ids))])


def stats(got: np.ndarray, ref: np.ndarray) -> str:
    d = got.astype(np.float64) - ref
    finite = np.isfinite(got).all()
    return (f"rel_l2={np.linalg.norm(d) / np.linalg.norm(ref):.3e} max_rel={np.abs(d).max() / np.abs(ref).max():.3e} "
            f"top1={(got.argmax(-1) == ref.argmax(-1)).mean():.4f} finite={finite}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("level_dir", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--level", default="O3")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    d = a.level_dir
    tok = load_model(a.model).tokenizer
    ids = eval_windows(tokenize(load_text(a.text), tok), a.seq)[: a.windows].numpy()
    for name in ("ref", a.level):
        t = time.perf_counter()
        summary = fp16.write_fp16(d / f"{name}.onnx", d / f"{name}.fp16.onnx")
        print(f"{name}: transform {time.perf_counter() - t:.1f} s, {summary.fp16_nodes} FP16 / {summary.fp32_nodes} "
              f"FP32 nodes, {summary.casts_inserted} Casts, FP32 ops {summary.fp32_ops}, "
              f"clamped {len(summary.clamped_constants)}, raised scales {len(summary.raised_scales)}")
    ref = run(d / "ref.onnx", ids).astype(np.float64)
    print(f"{a.level} (FP32 Q/DQ) vs ref:   {stats(run(d / f'{a.level}.onnx', ids), ref)}")
    print(f"ref.fp16 vs ref:               {stats(run(d / 'ref.fp16.onnx', ids), ref)}")
    print(f"{a.level}.fp16 vs ref:          {stats(run(d / f'{a.level}.fp16.onnx', ids), ref)}")
    # control: no FP32 islands at all
    fp16.FP32_OPS, fp16._POSITION_SINKS, fp16._UNSAFE_SOURCES = frozenset(), frozenset(), frozenset()
    for name in ("ref", a.level):
        proto, _ = fp16.fp16_from_onnx(load_onnx(d / f"{name}.onnx"))
        out = d / f"{name}.allfp16.onnx"
        save_onnx(proto, out)
        print(f"{name} all-FP16 control vs ref:  {stats(run(out, ids), ref)}")


if __name__ == "__main__":
    main()
