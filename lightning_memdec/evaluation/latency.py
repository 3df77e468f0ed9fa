"""Wall-clock timing of inference: forward-pass latency of base / + MemDec / + kNN-LM, and greedy decoding speed.

Runners are interleaved (A, B, C, A, B, C, …) and the median is reported, so a change in machine load during the
measurement hits every runner alike. Used by ``memdec evaluate --audit.latency`` and benchmarks/latency.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.kernels.scoring import vocab_log_probs

__all__ = ["median_times", "model_latency", "generation_throughput"]


def median_times(
    runners: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1, device: torch.device | str | None = None
) -> dict[str, float]:
    """Median wall time in seconds of each runner, interleaved (A, B, C, A, B, C, …) so that a change in machine
    load during the measurement hits every runner alike; CUDA is synchronised around each call."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}.")
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, fn in runners.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


@torch.no_grad()
def model_latency(
    base,
    input_ids: torch.Tensor,
    vocab: int,
    mixed: InterpolatedLM | None = None,
    knnlm: KNNLM | None = None,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Median time of one forward pass giving next-token log-probs ``[B, T, V]``: base, base+MemDec, base+kNN-LM.

    All three produce the same output (a full distribution at every position) from the same batch, so the ratios
    are the inference overheads: the decoder's extra forward + the log-space mix, or retrieval + the mix.
    """
    ids = input_ids.to(base.device)
    runners = {"base": lambda: vocab_log_probs(base(input_ids=ids, use_cache=False).logits, vocab)}
    if mixed is not None:
        runners["base+memdec"] = lambda: mixed.log_probs(ids)
    if knnlm is not None:
        runners["base+knnlm"] = lambda: knnlm.log_probs(ids)
    seconds = median_times(runners, repeats, warmup, base.device)
    return {
        "repeats": repeats,
        "seconds": seconds,
        "overhead": {key: s / seconds["base"] for key, s in seconds.items()},
    }


@torch.no_grad()
def generation_throughput(
    models: dict[str, Any], input_ids: torch.Tensor, max_new_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Greedy decoding speed (generated tokens per second, median, interleaved) of each model, KV caches on.

    ``models`` maps a name to a Hugging Face generator (``generate``; no early stop) or a :class:`KNNLM`
    (its ``generate_greedy`` loop).
    """

    def runner(model):
        ids = input_ids.to(model.device)
        if isinstance(model, KNNLM):
            return lambda: model.generate_greedy(ids, max_new_tokens)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        return lambda: model.generate(ids, **kwargs)

    device = next(iter(models.values())).device
    seconds = median_times({name: runner(model) for name, model in models.items()}, repeats, warmup, device)
    return {name: input_ids.shape[0] * max_new_tokens / s for name, s in seconds.items()}
