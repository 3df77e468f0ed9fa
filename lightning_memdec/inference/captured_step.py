"""One decoding step replayed as a CUDA graph: the launches of a batch-1 step cost more than its kernels.

At batch 1 a step of a large model is hundreds of small kernels, each launched from Python; replaying them as one
captured CUDA graph removes the launches. ``torch.compile(mode="reduce-overhead")`` does that for a step it can trace
whole; :class:`CapturedStep` does it for any step made of capture-safe work (no host synchronisation, fixed shapes
for fixed input shapes): the base + decoder forwards on two streams (:mod:`.overlapped_step`), or the base's forward
followed by a kNN-LM's exact search over resident keys, whose Python loop over key blocks no compiler traces.

It captures, once per input shape, one CUDA graph of ``run(*inputs)``; later calls copy their inputs into the
graph's static tensors and replay it. Before a capture the step runs twice on a side stream (compilation, lazy
allocations, cuBLAS workspaces); transformers' static caches count the positions they have written in tensors
(``cumulative_length``), so those are saved before the warm-up and put back after it: the replay then writes where
the first call's step should. Keys and values the warm-up wrote past that position are masked by causality and
overwritten later. On a CPU there are no graphs: each call runs ``run`` on the same static tensors, which is what
the tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = ["CapturedStep"]


class CapturedStep:
    """``step(*inputs) -> run(*inputs)`` (tensors or None), replayed as one CUDA graph per input shape on CUDA.

    The returned tensor is the graph's output: the next call overwrites it (copy or clone it to keep it).
    """

    def __init__(
        self, run: Callable[..., torch.Tensor], device: torch.device | str, counters: Callable[[], list] = list
    ):
        """``counters``: the tensors a step advances in place (the static caches' write counters), restored after
        the warm-up before a capture."""
        self.run, self.counters = run, counters
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.graphs: dict[tuple, tuple] = {}  # input shapes (None: no tensor) -> (graph or None, inputs, output)

    def forget(self) -> None:
        """Drop the captured graphs: call when the tensors the step writes (the caches) are replaced, since a graph
        keeps writing the ones it was captured with."""
        self.graphs.clear()

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        key = tuple(None if t is None else tuple(t.shape) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_inputs, out = self.graphs[key]
        for static, new in zip(static_inputs, inputs):
            if static is not None:
                static.copy_(new)
        if graph is None:  # CPU: the same static tensors, run in turn into the one output
            result = self.run(*static_inputs)
            self.graphs[key] = (None, static_inputs, result if out is None else out.copy_(result))
            return self.graphs[key][2]
        graph.replay()
        return out

    def _capture(self, inputs: tuple):
        """(graph, static inputs, static output) for this input shape, after the warm-up (on the CPU too, so that the
        tests check that it leaves the caches' counters as it found them); on the CPU no graph (nor output yet)."""
        static_inputs = tuple(None if t is None else t.clone() for t in inputs)
        saved = [c.clone() for c in self.counters()]
        warm = torch.cuda.Stream(self.device) if self.cuda else None  # off the main stream, as torch.cuda.graph asks
        if warm is not None:
            warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm) if warm is not None else contextlib.nullcontext():
            for _ in range(2):
                self.run(*static_inputs)
        if warm is not None:
            torch.cuda.current_stream(self.device).wait_stream(warm)
        for counter, value in zip(self.counters(), saved):
            counter.copy_(value)
        if not self.cuda:
            return None, static_inputs, None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.run(*static_inputs)
        return graph, static_inputs, out
