"""Resumable, multi-device chunked jobs on top of Lightning's ``Trainer.predict``.

A long stage (datastore keys, kNN targets) is cut into chunks of consecutive items (windows, query positions) whose
content depends on the chunk's item range alone, never on which rank computes it or how many ranks there are, so a
run on N devices, a run on one, and a killed-then-resumed run with the same chunk size all produce the same bytes.
Each finished chunk leaves a marker of its range in ``<work>/progress`` (:mod:`~stages.chunk_ranges`); a resumed run
(with any number of ranks) cuts the items no marker covers into chunks of its own chunk size, so a resume with
another size (the fix for a CUDA OOM in a chunk) keeps every finished chunk: its rows are then computed by batches
of other shapes, equal to an uninterrupted run's within floating-point tolerance (BLAS may block differently).
SIGTERM (``timeout``, ``docker stop``, a scheduler's preemption) stops the run once the chunks in hand are saved
(:class:`SigtermStop`).
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_memdec.io.artifact_dirs import Interrupted
from lightning_memdec.io.shared_filesystem import SharedFilesystemCheck
from lightning_memdec.stages.chunk_ranges import Span, done_ranges, items_done, pending_chunks, progress_dir

log = logging.getLogger(__name__)
# A rank with no chunk left (fewer unfinished chunks than ranks) still runs one step, on this placeholder:
# Lightning refuses a zero-length loader on one rank, and the collective start-up needs every rank anyway.
IDLE_CHUNK = (-1, -1)
# Chunks carry their own ranges, so Lightning's batch-index bookkeeping is not needed.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


def finish_chunks(work: Path, total: int, unit: str = "items") -> None:
    """Check every item is done. The markers stay until :func:`~stages.chunk_ranges.drop_progress`, so a kill in the
    final steps (merge, values) resumes there instead of recomputing every chunk."""
    missing = total - items_done(done_ranges(work), total)
    if missing:
        raise RuntimeError(
            f"{missing:,} of {total:,} {unit} are unfinished in {work}; run the command again to resume."
        )


def pending_for_rank(total: int, chunk_size: int, work: Path, rank: int, world_size: int, unit: str = "items"):
    """Chunks (item ranges) this rank still has to do: a round-robin share of the work left."""
    done = done_ranges(work)
    todo = pending_chunks(total, chunk_size, done)
    if done and rank == 0:  # the progress bar counts only this run's chunks: say where the run stands
        log.info("resuming with %s of %s %s done; the progress bar counts the %d chunks left",
                 f"{items_done(done, total):,}", f"{total:,}", unit, len(todo))  # fmt: skip
    return todo[rank::world_size]


class ChunkDataset(Dataset):
    """One item per chunk: its items [``lo``, ``hi``), its place ``order`` in the loader, and what ``make_item(lo,
    hi)`` builds of the whole chunk (batching is the chunk itself)."""

    def __init__(self, chunks: Sequence[Span], make_item: Callable[[int, int], dict[str, Any]]):
        self.chunks = list(chunks)
        self.make_item = make_item

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        lo, hi = self.chunks[i]
        if (lo, hi) == IDLE_CHUNK:
            return {"lo": lo, "hi": hi, "order": i}
        return {"lo": lo, "hi": hi, "order": i, **self.make_item(lo, hi)}


def is_idle(batch: dict[str, Any]) -> bool:
    """True for the placeholder step of a rank with nothing to do: predict_step returns None, writers skip it."""
    return int(batch["lo"]) == IDLE_CHUNK[0]


class UntilStopped(Sampler[int]):
    """The chunks' positions in order, until ``stop`` says to stop (asked as each chunk is fetched): the loop then
    ends as after its last chunk, so every rank reaches the closing barrier (an exception would leave a rank that
    already waits there waiting for ever)."""

    def __init__(self, count: int, stop: SigtermStop | None):
        self.count, self.stop = count, stop

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i in range(self.count):
            if self.stop is not None and self.stop.should_stop():
                self.stop.cut_short = True
                return
            yield i


def chunk_loader(
    module: L.LightningModule,
    total: int,
    chunk_size: int,
    work: Path,
    make_item,
    every_rank: bool = False,
    unit: str = "items",
) -> DataLoader:
    """The unfinished chunks of ``total`` items (``unit``: what they are, in messages) of this rank, cut
    ``chunk_size`` items at most: a round-robin share, or all of them on ``every_rank`` (for jobs whose ranks each
    do part of every chunk, such as a search over keys sharded by rank: their steps must call :func:`agree_to_stop`,
    so that all ranks stop on SIGTERM after the same chunk; the chunk's ``order`` says which rank owns it)."""
    trainer = module.trainer
    rank, ranks = (0, 1) if every_rank else (trainer.global_rank, trainer.world_size)
    chunks = pending_for_rank(total, chunk_size, work, rank, ranks, unit) or [IDLE_CHUNK]
    stop = sigterm_stop(trainer)
    if stop is not None:
        stop.total, stop.unit, stop.collective = total, unit, every_rank
    sampler = UntilStopped(len(chunks), stop)
    return DataLoader(ChunkDataset(chunks, make_item), batch_size=None, sampler=sampler)


IN_FLIGHT = 2  # chunks a BackgroundWriter may hold unsaved while the next is computed


class BackgroundWriter(BasePredictionWriter):
    """A writer whose :meth:`save` of each chunk (its files, then its marker) runs on a helper thread while the next
    chunk is computed: on a GPU the next forward or search waits for nothing on the host's writes.

    Saves run one after another, in order; at most ``in_flight`` chunks wait (each holds its rows in memory). The end
    of the run, and an exception in it, wait for them, so every chunk computed is saved and marked before the run
    returns or fails (a kill of the process loses only chunks not yet saved, which a resumed run computes again); a
    failed save fails the run. Predictions must hold host values only: a device tensor read on the helper thread
    would wait for the next chunk's work, queued on the same stream.
    """

    def __init__(self, in_flight: int = IN_FLIGHT):
        super().__init__(write_interval="batch")
        self.in_flight = in_flight
        self.saver: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []

    def save(self, pl_module: L.LightningModule, prediction: dict) -> None:
        raise NotImplementedError

    def on_predict_start(self, trainer, pl_module):
        self.saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}-saver")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:  # an idle rank's placeholder step
            return
        while len(self.pending) >= self.in_flight:
            self.pending.pop(0).result()  # a failed save raises here, in the run
        self.pending.append(self.saver.submit(self.save, pl_module, prediction))

    def wait(self) -> None:
        """Every submitted chunk saved (the first failure raised once all have finished)."""
        pending, self.pending = self.pending, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if self.saver is not None:
            self.saver.shutdown(wait=True)
            self.saver = None
        if errors:
            raise errors[0]

    def on_predict_end(self, trainer, pl_module):
        self.wait()

    def on_exception(self, trainer, pl_module, exception):
        try:
            self.wait()  # the chunks computed before the failure are kept for a resumed run
        except Exception as err:  # the run's own exception is the one raised; this chunk is computed again
            log.warning("a chunk's save failed too (a resumed run computes it again): %s", err)


class SigtermStop(L.Callback):
    """Stops a chunked run on SIGTERM once the chunks in hand are saved; the run then raises :class:`Interrupted`.

    Lightning's own handler only records SIGTERM (nothing in ``predict`` reads it), and it runs a collective inside
    the handler, which hangs a rank whose peer already waits in a barrier. This handler only sets a flag and passes
    the signal on to the ranks Lightning's launcher started, as Lightning's does; the loader (:class:`UntilStopped`)
    then hands out no more chunks. It is in place from before the run to past its closing barrier (:meth:`install`):
    a SIGTERM there (a signal sent to every rank and passed on by rank 0 too) must not kill a rank in the barrier.
    Ranks whose steps run collectives decide together (:func:`agree_to_stop`): one rank stopping alone would leave
    the others waiting in the next chunk's collective.
    """

    def __init__(self):
        self.requested = False  # this rank received SIGTERM
        self.agreed = False  # collective steps: some rank had received it at the last agreement
        self.collective = False  # every rank does part of every chunk: only the agreed decision counts
        self.cut_short = False  # the loader stopped before this rank's last chunk
        self.total, self.unit = 0, "items"  # the job's items, for the message of a stopped run
        self.launcher = None
        self.previous = None  # the handler :meth:`install` replaced, for :meth:`uninstall`
        self.installed = False

    def install(self, trainer: L.Trainer) -> None:
        """This handler from here on (signals reach the main thread only: elsewhere, Lightning's stays in place)."""
        self.launcher = trainer.strategy.launcher
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self.on_sigterm)

    def uninstall(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
            self.installed = False

    def on_predict_start(self, trainer, pl_module):
        self.requested = self.requested or trainer.received_sigterm  # caught by Lightning's handler before this
        if self.installed:  # Lightning's (with its collective) out; its teardown puts back the one it found: this
            signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum, frame) -> None:
        if not self.requested and self.launcher is not None:
            self.launcher.kill(signum)  # the other ranks, where this process started them
        self.requested = True

    def should_stop(self) -> bool:
        return self.agreed if self.collective else self.requested

    def stopped(self) -> bool:
        return self.requested or self.cut_short


def sigterm_stop(trainer: L.Trainer) -> SigtermStop | None:
    return next((c for c in trainer.callbacks if isinstance(c, SigtermStop)), None)


def agree_to_stop(module: L.LightningModule) -> None:
    """For steps where every rank does part of every chunk (collectives in each step): every rank learns whether any
    received SIGTERM, at the same point of the same chunk, so all stop after the same chunk. Call it once per chunk,
    on every rank."""
    stop = sigterm_stop(module.trainer)
    if stop is not None:
        stop.agreed = module.trainer.strategy.reduce_boolean_decision(stop.requested, all=False)


def interrupted(work: Path, stop: SigtermStop, trainer: L.Trainer) -> Interrupted:
    """The error a stopped run raises (:meth:`Interrupted.said`: its message printed too)."""
    done = items_done(done_ranges(work), stop.total)
    message = (
        f"interrupted (SIGTERM) with {done:,} of {stop.total:,} {stop.unit} done: run the same command "
        f"again to resume (the finished chunks are kept in {work})."
    )
    return Interrupted.said(message, trainer.global_rank, trainer.world_size)


def run_sharded_predict(
    module: L.LightningModule,
    writer: L.Callback,
    work: Path,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    callbacks: Sequence[L.Callback] = (),
) -> L.Trainer:
    """Run ``module`` over its chunks on the given devices; returns the trainer after all ranks finished.

    First (once the ranks are connected) every rank must see ``work``: a multi-node run needs it on a shared
    filesystem (:mod:`lightning_memdec.io.shared_filesystem`). Its progress bar is tqdm's unless ``callbacks`` hold
    one (Lightning would pick rich's where rich is installed: the stage's own bars are tqdm's). On SIGTERM every rank
    stops after the chunks in hand and, past the closing barrier, raises :class:`Interrupted`."""
    tqdm_bar = [] if any(isinstance(c, ProgressBar) for c in callbacks) else [TQDMProgressBar()]
    stop = SigtermStop()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SharedFilesystemCheck(progress_dir(work), "--out"), writer, stop, *callbacks, *tqdm_bar],
    )
    stop.install(trainer)
    try:
        trainer.predict(module, return_predictions=False)
        trainer.strategy.barrier()
    finally:
        stop.uninstall()
    if stop.stopped():
        raise interrupted(work, stop, trainer)
    return trainer
