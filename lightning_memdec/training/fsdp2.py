"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the decoder, through Lightning's ``ModelParallelStrategy``.

Lightning's ``FSDPStrategy`` wraps with FSDP1, which needs CUDA devices; FSDP2 shards the same way on GPUs and also
runs on CPU processes over gloo, so the multi-process tests check it on any machine. ``FSDP2Strategy`` is plain
data parallelism: every rank holds a shard, no tensor parallelism, and checkpoints are one full file on rank 0 (what
``--ckpt_path last`` and the Hugging Face export read). :class:`MemoryDecoderModule` shards its decoder in
``configure_model`` when the strategy hands it a device mesh.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism over every process (``ModelParallelStrategy`` with its data-parallel size the
    world size and tensor parallelism off), checkpoints assembled on rank 0 into one file."""

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_decoder(decoder: torch.nn.Module, mesh: DeviceMesh) -> None:
    """``fully_shard`` each transformer block (the classes the model names in ``_no_split_modules``), then the rest:
    a block's weights are gathered for its own forward and backward only. Tied embeddings stay one parameter."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(decoder, "_no_split_modules", None) or ()
    for module in decoder.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
