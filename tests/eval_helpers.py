"""One tiny O3 pipeline (random:llama) shared by test_eval.py and test_report.py: exported,
evaluated and diagnosed once per test session (tens of seconds on 2 cores)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_CACHE: dict[str, object] = {}


def tiny_config(calib: Path, evalp: Path, level: str = "O3"):
    from sq2trt.config import Config

    return Config.from_dict({"model": "random:llama", "quant": {"level": level},
                             "calib": {"data": str(calib), "num_samples": 4, "seq_len": 64},
                             "eval": {"data": str(evalp), "window": 128, "max_tokens": 1024,
                                      "compare_samples": 2, "compare_seq_len": 64}})


def tiny_task_file(root: Path) -> Path:
    """A task in the documented JSONL format (byte-tokenizer friendly)."""
    from sq2trt.tasks import Example, examples_to_jsonl

    ex = [Example("The capital of France is", (" Paris.", " a banana split with sprinkles."), 0),
          Example("Two plus two equals", (" four", " nineteen"), 0, ""),
          Example("Water freezes at zero degrees", (" Celsius.", " Fahrenheit."), 0)]
    p = root / "mini.jsonl"
    p.write_text(examples_to_jsonl(ex))
    return p


def evaluated_pipeline(calib: Path, evalp: Path):
    """(pipeline, eval.json dict, layers.json dict, report dict) for random:llama at O3."""
    if "pipe" not in _CACHE:
        from sq2trt.pipeline import Pipeline

        root = Path(tempfile.mkdtemp(prefix="sq2trt-eval-test-"))
        atexit.register(shutil.rmtree, root, True)
        pipe = Pipeline(tiny_config(calib, evalp), root / "build")
        task = tiny_task_file(root)
        ev = pipe.evaluate([str(task)])
        diag = pipe.diagnose(top=3)
        rep = pipe.report()
        _CACHE.update(pipe=pipe, ev=ev, diag=diag, rep=rep, task=task, root=root)
    return _CACHE["pipe"], _CACHE["ev"], _CACHE["diag"], _CACHE["rep"]


def cached(key: str):
    return _CACHE[key]
