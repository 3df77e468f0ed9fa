"""One decoding step of base + Memory Decoder with the two forwards side by side on one GPU, replayed as a CUDA graph.

Why: at batch 1 a layer's kernels leave most of a large GPU idle. On an H200 a layer took 65–69 µs whatever its
width, so the 124 M decoder's 12 layers added 0.79 ms to the 774 M base's 2.47 ms (a 1.32× overhead where the FLOPs
add 16 %; benchmarks/results/gpu-h200-2026-12-04.txt). The Memory Decoder reads nothing of the base's states — unlike
kNN-LM, whose query is the base's last hidden state — so its forward can run on a second CUDA stream while the
base's runs, and only the log-space mixture waits for both.

:class:`OverlappedStep` is a :class:`~.captured_step.CapturedStep` whose step forks the decoder's forward onto a side
stream and joins it back before the mixture (fork and join are ``wait_stream`` calls, which graph capture records as
dependencies). The forwards themselves may be ``torch.compile``'d (without compile's own CUDA graphs: the capture
here is the graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_memdec.inference.captured_step import CapturedStep

__all__ = ["OverlappedStep"]

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class OverlappedStep(CapturedStep):
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
        super().__init__(self.overlapped, device, counters)
        self.first, self.second, self.combine = first, second, combine
        self.side = torch.cuda.Stream(self.device) if self.cuda else None

    def overlapped(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
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
