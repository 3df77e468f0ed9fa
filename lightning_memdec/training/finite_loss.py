"""Stop training on a non-finite loss without stalling the GPU every step.

Reading a device loss on the host (``if not torch.isfinite(loss)``) makes the host wait for the forward pass to
finish before it can launch the backward, so every step starts the backward from an idle GPU and Lightning's own
per-step work is not hidden behind the device's. On a GPU the verdict is instead copied to pinned host memory
without waiting, and read at the start of the next step (by then the next step's work is queued behind it, so waiting
for it does not empty the queue), before any checkpoint is written and when training ends. Every rank reads it at
the same point, so no rank is left waiting in a collective. The cost: the step with the non-finite loss has already
applied its update when the error is raised, so no checkpoint is ever written after it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FiniteLossCheck"]


class FiniteLossCheck:
    """``record(loss, describe)`` after each step's loss: raises ``FloatingPointError(describe())`` for a non-finite
    loss at once (``defer=False``) or at the next :meth:`record` / :meth:`raise_pending` (``defer=True``)."""

    def __init__(self, defer: bool = False):
        self.defer = defer
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None, Callable[[], str]] | None = None

    def record(self, loss: torch.Tensor, describe: Callable[[], str]) -> None:
        """Check ``loss`` (a scalar); ``describe`` builds the error's message, only when one is raised."""
        self.raise_pending()
        finite = torch.isfinite(loss.detach())
        if not self.defer:
            if not finite:
                raise FloatingPointError(describe())
            return
        event = None
        if finite.is_cuda:  # copied without waiting; the event tells when the copy has landed
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite = host
        self.pending = (finite, event, describe)

    def raise_pending(self) -> None:
        """The recorded loss not yet checked, checked now (waiting for its step's forward pass if needed)."""
        if self.pending is None:
            return
        finite, event, describe = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        if not finite:
            raise FloatingPointError(describe())
