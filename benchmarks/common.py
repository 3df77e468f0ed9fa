"""What the benchmark scripts share: their ``name: value`` output lines and a one-shot wall-clock timer.

Repeated measurements use the package's one timing harness, ``lightning_memdec.evaluation.latency.median_times``
(interleaved runners, warm-up, median). Scripts import this module as ``common``: benchmarks/ is the running
script's directory, first on ``sys.path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def report(name: str, value: Any, digits: int = 4) -> None:
    """Print one ``name: value`` line (floats to ``digits`` significant digits), flushed so partial runs show."""
    print(f"{name}: {value:.{digits}g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds; CUDA is synchronised before and after, so queued GPU work is counted."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start
