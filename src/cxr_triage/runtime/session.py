"""The onnxruntime CPU session that every network (classifier, lung segmenter) runs in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cpu_session(model: Path, threads: int | None = None) -> Any:
    """The onnxruntime CPU session both networks run in: ``threads`` intra-op threads (default: the cores, up to 4),
    every graph optimisation (int8 QDQ graphs need it; fp32 ones get activations fused into convolutions), no
    spin-waiting (steadier latency on shared CPUs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
