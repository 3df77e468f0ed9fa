"""A dispatch mode recording the work a captured CUDA graph cannot hold, for tests of the captured steps on the CPU
(the graphs themselves run on a GPU only)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostWork(TorchDispatchMode):
    """Records the ops a captured CUDA graph cannot hold: a tensor made from host data (``torch.tensor``: a copy to
    the device each step, which a replay would not redo) and a value read back to the host (a synchronisation)."""

    OPS = {
        "aten.lift_fresh.default",
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten._unique2.default",
        "aten.unique_consecutive.default",
    }  # the last four: output shapes only the data decides

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class HostCalls(TorchFunctionMode):
    """Records the calls that copy a tensor to the host, which on the CPU dispatch no op the dispatch mode could see
    (``.cpu()`` and ``.numpy()`` of a CPU tensor are the tensor itself; ``.tolist()`` reads it directly)."""

    CALLS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__, torch.Tensor.item}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.CALLS:
            self.seen.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def host_work_of_step(generator, prompt: torch.Tensor) -> list[str]:
    """What ``generator``'s captured step (a ``CapturedStep``) does on the host, run as its capture runs it: after a
    short decode that makes the caches and the step's static tensors, one step of the next token."""
    generator.generate(prompt, 2)
    token, position = prompt[:, :1].clone(), torch.tensor([prompt.shape[1] + 1])
    with HostWork() as spy, HostCalls() as calls:
        generator._compiled_step.run(token, position, None)
    return spy.seen + calls.seen
