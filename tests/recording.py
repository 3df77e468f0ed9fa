"""A callback for the distributed tests: records which windows each rank trained on."""

import json
from pathlib import Path

import lightning as L


class RecordWindows(L.Callback):
    def __init__(self, path: str):
        self.path, self.starts = Path(path), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts += batch["start"].tolist()

    def on_train_end(self, trainer, pl_module):
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.starts))
