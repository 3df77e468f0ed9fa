"""A `memdec fit` run root: one run at a time in it, where checkpoints live, and what a resume needs.

A resumed run must continue exactly where the killed one stopped. Weights, optimiser, schedule and the data
position are Lightning's checkpoint (and :class:`ResumableLoader`'s state); the random streams that dropout draws
from are not, so :class:`RandomStateCheckpoint` stores them and puts them back before the first resumed step.
"""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import Namespace

from lightning_memdec.io.output_lock import OutputLock

CHECKPOINTS = "checkpoints"
LOGGER_KEY = "memdec_logger"  # in a checkpoint: the logger class and version its run wrote to


def default_checkpoint_dir(root_dir: str | Path | None) -> Path:
    """``<trainer.default_root_dir>/checkpoints``: one place per run root, the same for the run and its resume."""
    return Path(root_dir if root_dir is not None else Path.cwd()) / CHECKPOINTS


def random_state() -> dict[str, Any]:
    """The torch (CPU and current CUDA device), numpy and Python RNG states, as tensors and plain lists only
    (so ``torch.load(weights_only=True)`` reads them back)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`random_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Saves the RNG states in every checkpoint and restores them just before the first training step of a resume.

    Restoring at that step (not when the checkpoint is read) skips whatever drew random numbers in between, such as
    building the model or the sanity check, so the resumed steps draw the dropout masks of the uninterrupted run.
    All ranks draw the same stream (one seed), so rank 0's state serves every rank.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pending is not None:
            set_random_state(self.pending)
            self.pending = None


class ExclusiveRunRoot(L.Callback):
    """Holds the lock on ``trainer.default_root_dir`` while fitting: a second run into the same root (which would
    write into the same checkpoints and log version) is refused with the first one's pid."""

    def __init__(self) -> None:
        self.lock: OutputLock | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and self.lock is None:
            self.lock = OutputLock(trainer.default_root_dir).acquire()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class LoggerVersionCheckpoint(L.Callback):
    """Records the logger's class and version in every checkpoint: a resume logs on into the same version directory
    (see :func:`resumed_logger`), so its curves continue those of the killed run instead of starting a version_N+1."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        logger = trainer.logger
        if logger is not None:
            checkpoint[LOGGER_KEY] = {"class_path": f"{type(logger).__module__}.{type(logger).__name__}",
                                      "version": logger.version}  # fmt: skip


def resumed_logger(logger: Any, checkpoint: Path, root_dir: str | None) -> Any:
    """The ``trainer.logger`` config of a run resumed from ``checkpoint``: the default logger (None/True), or one of
    the same class given without a version, is pinned to the version the checkpointed run wrote to."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(LOGGER_KEY)
    if saved is None:  # a checkpoint of an older version, or of a run without a logger
        return logger
    if logger is None or logger is True:  # what Lightning builds by default, in the default place
        args = Namespace(save_dir=str(root_dir if root_dir is not None else os.getcwd()), version=saved["version"])
        return Namespace(class_path=saved["class_path"], init_args=args)
    same_class = isinstance(logger, Namespace) and full_class_path(logger.get("class_path")) == saved["class_path"]
    if same_class and logger.get("init_args.version") is None:
        logger["init_args.version"] = saved["version"]
    return logger


def full_class_path(class_path: str | None) -> str | None:
    """Where a config's class is defined (``lightning.pytorch.loggers.TensorBoardLogger`` is
    ``lightning.pytorch.loggers.tensorboard.TensorBoardLogger``), as :class:`LoggerVersionCheckpoint` records it.
    Only the config's own class is imported (the parser imports it anyway), never a name read from a checkpoint."""
    if not class_path or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path  # the parser will name it
    return f"{cls.__module__}.{cls.__name__}"
