"""One decoding step of base + Memory Decoder with the two forwards side by side on one GPU, replayed as a CUDA graph.

Why: at batch 1 a layer's kernels leave most of a large GPU idle. On an H200 a layer took 65–69 µs whatever its
width, so the 124 M decoder's 12 layers added 0.79 ms to the 774 M base's 2.47 ms (a 1.32× overhead where the FLOPs
add 16 %; benchmarks/results/gpu-h200-2026-12-04.txt). The Memory Decoder reads nothing of the base's states — unlike
kNN-LM, whose query is the base's last hidden state — so its forward can run on a second CUDA stream while the
base's runs, and only the log-space mixture waits for both.

:class:`OverlappedStep` captures, once per input shape, one CUDA graph in which the decoder's forward is forked onto
a side stream and joined back before the mixture (fork and join are ``wait_stream`` calls, which graph capture
records as dependencies); later steps copy their inputs into the graph's static tensors and replay it. The forwards
themselves may be ``torch.compile``'d (without compile's own CUDA graphs: the capture here is the graph). Before a
capture the step runs eagerly twice (compilation, lazy cache allocation, cuBLAS workspaces); transformers' static
caches count the positions they have written in tensors (``cumulative_length``), so those are saved before the
warm-up and put back after it: the replay then writes where the first call's step should. Keys and values the
warm-up wrote past that position are masked by causality and overwritten later. On a CPU there are no streams or
graphs: each call runs the forwards in turn on the same static tensors, which is what the tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = ["OverlappedStep"]

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class OverlappedStep:
    """``step(ids [B, 1], positions [1], mask [B, L] or None) -> combine(first(...), second(...))`` with ``second``
    (the decoder's forward) on a side stream beside ``first`` (the base's) on CUDA, as one replayed CUDA graph.

    The returned tensor is the graph's output: the next call overwrites it (copy or clone it to keep it).
    """

    def __init__(
        self,
        first: Forward,
        second: Forward,
        combine: Callable,
        device: torch.device | str,
        counters: Callable[[], list[torch.Tensor]] = list,
    ):
        """``counters``: the tensors a step advances in place (the static caches' write counters), restored after
        the warm-up before a capture."""
        self.first, self.second, self.combine, self.counters = first, second, combine, counters
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.graphs: dict[tuple, tuple] = {}  # (ids shape, masked) -> (graph or None, static inputs, output)

    def forget(self) -> None:
        """Drop the captured graphs: call when the tensors the forwards write (the caches) are replaced, since a
        graph keeps writing the ones it was captured with."""
        self.graphs.clear()

    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The step without a graph: on CUDA ``second`` forked onto the side stream and joined before combining."""
        if not self.cuda:
            return self.combine(self.first(ids, positions, mask), self.second(ids, positions, mask))
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # fork: the inputs are ready
        with torch.cuda.stream(self.side):
            other = self.second(ids, positions, mask)
        own = self.first(ids, positions, mask)
        main.wait_stream(self.side)  # join
        if not torch.cuda.is_current_stream_capturing():  # a capture's memory stays the graph's own
            other.record_stream(main)  # made on the side stream, read on the main one: not reused before that
        return self.combine(own, other)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        key = (tuple(ids.shape), mask is None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, positions, mask)
        graph, inputs, out = self.graphs[key]
        for static, new in zip(inputs, (ids, positions, mask)):
            if static is not None:
                static.copy_(new)
        if graph is None:  # CPU: the same static tensors, run in turn into the one output
            result = self.run(*inputs)
            self.graphs[key] = (None, inputs, result if out is None else out.copy_(result))
            return self.graphs[key][2]
        graph.replay()
        return out

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        """(graph, static inputs, static output) for this input shape, after the warm-up (on the CPU too, so that the
        tests check that it leaves the caches' counters as it found them); on the CPU no graph (nor output yet)."""
        inputs = tuple(None if t is None else t.clone() for t in (ids, positions, mask))
        saved = [c.clone() for c in self.counters()]
        warm = torch.cuda.Stream(self.device) if self.cuda else None  # off the main stream, as torch.cuda.graph asks
        if warm is not None:
            warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm) if warm is not None else contextlib.nullcontext():
            for _ in range(2):
                self.run(*inputs)
        if warm is not None:
            torch.cuda.current_stream(self.device).wait_stream(warm)
        for counter, value in zip(self.counters(), saved):
            counter.copy_(value)
        if not self.cuda:
            return None, inputs, None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.run(*inputs)
        return graph, inputs, out
