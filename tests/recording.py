"""A callback for the distributed and resume tests: what each rank trained on and what it logged."""

import json
import os
import signal
from pathlib import Path

import lightning as L


class RecordWindows(L.Callback):
    """Writes ``rank<r>.json``: ``starts`` (per training step, the corpus starts of its windows, -1 for filler),
    ``train`` (the logged ``train/*`` values of every step), ``val`` (``val/*`` after each validation) and ``test``."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.record = {"starts": [], "train": [], "val": [], "test": []}

    @staticmethod
    def _logged(trainer, split: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(split + "/")}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["starts"].append(batch["start"].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["train"].append(self._logged(trainer, "train"))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record["val"].append(self._logged(trainer, "val"))

    def on_test_end(self, trainer, pl_module):
        self.record["test"].append(self._logged(trainer, "test"))
        self._write(trainer)

    def on_train_end(self, trainer, pl_module):
        self._write(trainer)

    def _write(self, trainer):
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class KillAtStep(L.Callback):
    """Stands for a kill: raises before training step ``step`` starts (its checkpoints up to then are written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM (as a scheduler's preemption or ``docker stop`` would) as training step ``step``
    starts; Lightning's handler records it and the step runs to its end."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordShards(L.Callback):
    """Writes ``shards<r>.json`` at the start of training: for each decoder parameter, the elements this rank holds
    and the whole parameter's (equal unless the strategy sharded it)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module):
        local = {
            n: p.to_local().numel() if hasattr(p, "to_local") else p.numel() for n, p in pl_module.named_parameters()
        }
        whole = {n: p.numel() for n, p in pl_module.named_parameters()}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"shards{trainer.global_rank}.json").write_text(json.dumps({"local": local, "whole": whole}))
