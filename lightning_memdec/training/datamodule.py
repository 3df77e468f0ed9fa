"""`MemDecDataModule`: token windows with their position-aligned sparse kNN targets.

A window of ``W`` positions starting at ``s`` holds input ids ``tokens[s:s+W]``, labels
``tokens[s+1:s+W+1]`` and the CSR target rows ``s..s+W-1``; only its new positions (``loss_mask``)
carry loss. Batches carry the targets as CSR (the kept entries and a count per position) to the device, where
:func:`pad_targets` pads the support to the largest row in the batch (capped by ``max_support``), so the
dense ``[B, W, V]`` target tensor is never built and no padding crosses the host-to-device copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_memdec.io.artifact_dirs import jsonable, meta_sha256
from lightning_memdec.io.readers import Targets, check_targets_match_corpus
from lightning_memdec.io.settings import check_positive
from lightning_memdec.io.token_corpus import Corpus, position_windows
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer

PAD_WINDOW = -1


class WindowTargetsDataset(Dataset):
    """Windows of a corpus with their targets; index ``-1`` is a fully masked filler window (see sampler).

    Without ``targets`` the windows carry an empty support (plain language-model data, for CE-only
    training such as pretraining a base or the paper's CE-only ablation).
    """

    def __init__(
        self, corpus: str | Path, targets: str | Path | None, window: int, stride: int, max_support: int | None = None
    ):
        self.corpus_dir = Path(corpus)
        self.targets_dir = None if targets is None else Path(targets)
        corpus_ = Corpus(corpus)
        targets_meta = None
        if targets is not None:
            targets_ = Targets(targets)
            check_targets_match_corpus(targets_, corpus_)
            targets_meta = targets_.meta
        self.windows = position_windows(corpus_.num_positions, window, stride)
        self.window, self.max_support = window, max_support
        self.meta = {"corpus": corpus_.meta, "targets": targets_meta}
        self._corpus: Corpus | None = None
        self._targets: Targets | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def _open(self) -> tuple[Corpus, Targets | None]:
        # memmaps are opened lazily so each dataloader worker maps the files itself
        if self._corpus is None:
            self._corpus = Corpus(self.corpus_dir)
            self._targets = None if self.targets_dir is None else Targets(self.targets_dir)
        return self._corpus, self._targets

    def window_item(self, j: int) -> tuple[dict[str, torch.Tensor], int]:
        """Window ``j``'s tokens, labels, loss mask and start (a filler window: masked, start −1), and the corpus
        position its target rows start at: everything of an item but its targets."""
        corpus, _ = self._open()
        filler = j == PAD_WINDOW
        j = 0 if filler else j
        start, w = int(self.windows.starts[j]), self.window
        tokens = np.asarray(corpus.tokens[start : start + w + 1], dtype=np.int64)
        mask = np.arange(w) >= self.windows.score_from[j]
        item = {
            "input_ids": torch.from_numpy(tokens[:-1]),
            "labels": torch.from_numpy(tokens[1:]),
            "loss_mask": torch.from_numpy(mask & (not filler)),
            "start": torch.tensor(-1 if filler else start),
        }
        return item, start

    def __getitem__(self, j: int) -> dict[str, torch.Tensor | int]:
        item, start = self.window_item(j)
        _, targets = self._open()
        w = self.window
        if targets is None:  # an empty support, padded to one probability-0 entry of id 0
            ids, probs, counts, support = np.zeros(0, np.int32), np.zeros(0, np.float16), np.zeros(w, np.int32), 1
        else:
            ids, probs, counts, support = self._target_rows(targets, start)
        csr = {"target_flat_ids": ids, "target_flat_probs": probs, "target_counts": counts}
        return {**item, **{k: torch.from_numpy(v) for k, v in csr.items()}, "target_support": support}

    def _target_rows(self, targets: Targets, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """CSR rows of positions [start, start + W): their kept entries (flat int32 ids, fp16 probs), the count kept
        per position and the window's support (the largest count, capped by ``max_support``).

        Kept as stored, int32 ids and fp16 probs (the loss upcasts on the device): only the entries travel through
        the workers, pinned memory and the host-to-device copy; :func:`pad_targets` pads them there.
        """
        w = self.window
        offsets = np.asarray(targets.offsets[start : start + w + 1])
        lo, hi = int(offsets[0]), int(offsets[-1])
        counts = np.diff(offsets)
        ids, probs = np.array(targets.ids[lo:hi]), np.array(targets.probs[lo:hi])  # copies: the memmaps are read-only
        support = int(counts.max())
        if self.max_support is None or support <= self.max_support:
            return ids, probs, counts.astype(np.int32), support
        # rows are sorted by prob: the cap keeps the top tokens, renormalised in fp32 and stored back in fp16. The
        # sums are taken over the padded [W, support] rows, so their rounding is that of the padded batches before.
        support = self.max_support
        cols = np.arange(hi - lo) - np.repeat(offsets[:-1] - lo, counts)
        keep = cols < support
        rows, cols = np.repeat(np.arange(w), counts)[keep], cols[keep]
        p32 = np.zeros((w, support), dtype=np.float32)
        p32[rows, cols] = probs[keep]
        sums = p32.sum(1, keepdims=True)  # 0 only for a row without entries, none of which is gathered below
        renormalised = (p32 / np.where(sums > 0, sums, 1.0)).astype(np.float16)
        return ids[keep], renormalised[rows, cols], np.minimum(counts, support).astype(np.int32), support


CSR_KEYS = ("target_flat_ids", "target_flat_probs", "target_counts", "target_support")


def collate(items: list[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor | int]:
    """Stack windows; their targets stay CSR (entries concatenated, counts ``[B, W]``, the batch's support an int):
    :func:`pad_targets` pads them on the device, to the dense rows the loss reads."""
    stack = lambda key: torch.stack([i[key] for i in items])
    cat = lambda key: torch.cat([i[key] for i in items])
    return {
        "input_ids": stack("input_ids"),
        "labels": stack("labels"),
        "loss_mask": stack("loss_mask"),
        "start": stack("start"),
        "target_flat_ids": cat("target_flat_ids"),
        "target_flat_probs": cat("target_flat_probs"),
        "target_counts": stack("target_counts"),
        "target_support": max(i["target_support"] for i in items),
    }


def pad_targets(batch: dict) -> dict:
    """A collated batch with its CSR targets as dense ``target_ids`` / ``target_probs`` ``[B, W, support]``: each
    position's entries first, then probability-0 entries of id 0. Runs where the batch is (on the device, from
    ``MemoryDecoderModule``'s loss); a batch without CSR targets is returned as it is."""
    if "target_counts" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in CSR_KEYS}
    counts = batch["target_counts"]
    keep = torch.arange(batch["target_support"], device=counts.device) < counts[..., None]  # [B, W, S]
    # CSR order is row-major order: masked_scatter_ fills the kept slots with the entries in turn
    out["target_ids"] = batch["target_flat_ids"].new_zeros(keep.shape).masked_scatter_(keep, batch["target_flat_ids"])
    probs = batch["target_flat_probs"]
    out["target_probs"] = probs.new_zeros(keep.shape).masked_scatter_(keep, probs)
    return out


class EvenShardSampler(DistributedSampler):
    """Each rank gets a disjoint share of the windows, padded with masked filler windows (index -1).

    Every window is seen exactly once per epoch, and every rank runs the same number of steps, which
    DDP/FSDP need (the standard sampler repeats windows instead, counting them twice). Windows are dealt
    round-robin, so the ranks' batches of a step together are the batch of one process with ``num_replicas``
    times the batch size. After a mid-epoch resume the first epoch iterated skips the windows this rank already
    trained on (:meth:`resume`).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        # ``batch_size`` > 1: each rank's share padded to whole batches too (every batch of one shape)
        self.num_samples = math.ceil(len(dataset) / (num_replicas * batch_size)) * batch_size
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, windows of this rank already done)

    def resume(self, epoch: int, done: int) -> None:
        """The next iterator is epoch ``epoch``'s order less this rank's first ``done`` windows. The epoch is set
        here: with loader workers the iterator is made (and its order drawn) before Lightning sets the epoch."""
        self.set_epoch(epoch)
        self._resume = (epoch, done)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        order += [PAD_WINDOW] * (self.total_size - n)
        mine = order[self.rank : self.total_size : self.num_replicas]
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] :]
        self._resume = None
        return iter(mine)


class ResumableLoader(DataLoader):
    """A DataLoader whose checkpointed state lets a run killed mid-epoch continue with the very next windows.

    Lightning stores ``state_dict()`` in the checkpoint and hands it back on resume. The state is the epoch and
    the number of this rank's batches the training loop has processed (``progress()``, read from the trainer
    when the checkpoint is written), so prefetched-but-unused batches are not counted as trained.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size, "ranks": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["ranks"] != self.sampler.num_replicas or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint was written with {state['ranks']} ranks × batch size {state['batch_size']}, this "
                f"run has {self.sampler.num_replicas} × {self.batch_size}; resume with the same devices and "
                "data.batch_size (or start the epoch afresh from an end-of-epoch checkpoint)."
            )
        if state["batches"] * self.batch_size < self.sampler.num_samples:
            self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
        else:  # an epoch-end state skips nothing: the run goes on with the next epoch's order
            self.sampler.set_epoch(state["epoch"] + 1)


def check_resume_data(saved: dict | None, current: dict) -> None:
    """A resume must train on the data of the checkpoint: the same corpus content and targets, cut into the same
    windows, pruned alike and shuffled by the same seed (another seed or window trained some windows twice and others
    never within the epoch). A checkpoint of an older version compares the fields it recorded."""
    if saved is None:
        return
    differs = {name: value for name, value in saved.items() if jsonable(current.get(name)) != jsonable(value)}
    if differs:
        named = "; ".join(f"{name}: {saved[name]!r} there, {current.get(name)!r} here" for name in differs)
        raise ValueError(
            f"the checkpoint was trained on other data ({named}); resume with the run's own data settings "
            "(data.train_corpus, data.train_targets, data.window, data.stride, data.max_support, data.seed), or drop "
            "--ckpt_path to start a new run."
        )


class MemDecDataModule(L.LightningDataModule):
    """Streams token windows and sparse kNN targets from memmapped corpus and targets directories.

    Args:
        train_corpus: corpus directory of the training split (`memdec tokenize`).
        train_targets: targets directory built for it (`memdec build-targets`); None trains on next
            tokens alone (requires model.beta=0).
        val_corpus: corpus directory of the validation split.
        val_targets: targets for the validation split (queries = a datastore of that split).
        test_corpus: corpus directory of the test split (`memdec test`); without it the test stage refuses to run.
        test_targets: targets for the test split (then test/loss includes the KL term).
        window: positions per training window (the decoder's context length).
        stride: new positions per window (= window: non-overlapping blocks, every position trained once).
        batch_size: windows per batch and device (R devices × b train like one device with R·b).
        max_support: cap on target tokens per position (the top ones, renormalised); None keeps all.
        num_workers: dataloader worker processes.
        seed: shuffling seed (the epoch is added each epoch).
        pad_last_batch: fill each epoch's last training batch up to ``batch_size`` with masked filler windows, so
            every batch has one shape: a compiled decoder (``model.compile``) then compiles once, where a partial
            batch compiles it again for its shape (and a third size once more, with a dynamic batch). Costs the
            fillers' compute.
    """

    def __init__(
        self,
        train_corpus: str,
        train_targets: str | None = None,
        val_corpus: str | None = None,
        val_targets: str | None = None,
        test_corpus: str | None = None,
        test_targets: str | None = None,
        window: int = 1024,
        stride: int | None = None,
        batch_size: int = 8,
        max_support: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pad_last_batch: bool = False,
    ):
        super().__init__()
        if val_targets is not None and val_corpus is None:
            raise ValueError("val_targets needs val_corpus.")
        if test_targets is not None and test_corpus is None:
            raise ValueError("test_targets needs test_corpus.")
        if (train_targets is None) != (val_targets is None) and val_corpus is not None:
            raise ValueError("give targets for both train and validation splits, or for neither.")
        check_positive("window", window, whole=True)
        check_positive("stride", stride, whole=True, omitted="the window (windows side by side)")
        check_positive("batch_size", batch_size, whole=True)
        check_positive("max_support", max_support, whole=True, omitted="every target token")  # 0 would drop the KL
        self.save_hyperparameters()
        self.stride = window if stride is None else stride
        self.train: WindowTargetsDataset | None = None
        self.val: WindowTargetsDataset | None = None
        self.test: WindowTargetsDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train is None:
            self.train = WindowTargetsDataset(h.train_corpus, h.train_targets, h.window, self.stride, h.max_support)
        if self.val is None and h.val_corpus is not None:
            self.val = self._split("validation", h.val_corpus, h.val_targets)
        if stage == "test" and self.test is None:
            if h.test_corpus is None:
                raise ValueError("`memdec test` needs data.test_corpus (a corpus directory of the test split).")
            self.test = self._split("test", h.test_corpus, h.test_targets)

    def _split(self, what: str, corpus: str, targets: str | None) -> WindowTargetsDataset:
        """An evaluation split, refused when its tokenizer is not the training corpus's."""
        h = self.hparams
        dataset = WindowTargetsDataset(corpus, targets, h.window, self.stride, h.max_support)
        check_same_tokenizer(
            dataset.meta["corpus"]["tokenizer"], f"{what} corpus {corpus}",
            self.train.meta["corpus"]["tokenizer"], f"training corpus {h.train_corpus}",
            "tokenize every split with the training corpus's tokenizer",
        )  # fmt: skip
        return dataset

    @property
    def tokenizer_name(self) -> str:
        return self.train.meta["corpus"]["tokenizer"]["name"]

    def provenance(self) -> dict:
        """What the decoder was trained on, for the exported model's meta.json."""
        t = self.train.meta["targets"] or {}
        keys = (
            "model",
            "layer",
            "k",
            "temperature",
            "index_factory",
            "corpus",
            "corpus_sha256",
            "datastore",
            "tokenizer",
        )
        return {
            "train_targets": self.hparams.train_targets,
            **{k: t.get(k) for k in keys},
            "tokenizer": self.train.meta["corpus"]["tokenizer"],
        }

    def data_identity(self) -> dict:
        """What the run trains on: the training corpus's content hash, the hash of its targets' meta.json, and how
        they are cut, pruned and shuffled."""
        h = self.hparams
        targets = None if h.train_targets is None else meta_sha256(h.train_targets)
        return {"train_corpus": self.train.meta["corpus"]["content_sha256"], "train_targets": targets,
                "window": h.window, "stride": self.stride, "max_support": h.max_support, "seed": h.seed}  # fmt: skip

    def state_dict(self) -> dict:
        return {"data_identity": self.data_identity()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("data_identity")
        if saved is not None and self.trainer is not None and self.trainer.state.fn != "fit":
            saved = {k: v for k, v in saved.items() if k in ("train_corpus", "train_targets")}  # test/validate
        check_resume_data(saved, self.data_identity())

    def _loader(
        self, dataset: WindowTargetsDataset, shuffle: bool, resumable: bool = False, whole_batches: bool = False
    ) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        whole = self.hparams.batch_size if whole_batches else 1
        sampler = EvenShardSampler(dataset, world, rank, shuffle=shuffle, seed=self.hparams.seed, batch_size=whole)
        extra = {"progress": self._training_progress} if resumable else {}
        return (ResumableLoader if resumable else DataLoader)(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=trainer is not None and trainer.accelerator.__class__.__name__ == "CUDAAccelerator",
            # its own generator: starting an epoch's iterator draws no number from the global stream dropout uses,
            # so a resumed run's dropout masks are the uninterrupted run's
            generator=torch.Generator().manual_seed(self.hparams.seed),
            **extra,
        )

    def _training_progress(self) -> tuple[int, int]:
        """(epoch, training batches this rank has processed in it): what a checkpoint written now has trained on."""
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True, resumable=True, whole_batches=self.hparams.pad_last_batch)

    def stepping_batches(self) -> int | float:
        """``trainer.estimated_stepping_batches`` (Lightning's formula) without the fit loop's train loader. Lightning
        builds that loader to estimate, and when the estimate comes first (the LR schedule's length, with
        ``trainer.max_epochs`` set) the loader a resume restores is never handed its state (Lightning issue
        #20550): a resumed epoch started its window order again. Counts a loader of this module, never iterated."""
        trainer = self.trainer
        if trainer.max_epochs == -1 or trainer.overfit_batches:
            return trainer.estimated_stepping_batches  # max_steps alone: Lightning builds no loader
        length, limit = len(self.train_dataloader()), trainer.limit_train_batches
        batches = int(length * limit) if isinstance(limit, float) else min(length, int(limit))
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    def val_dataloader(self) -> DataLoader:
        if self.val is None:
            return []
        return self._loader(self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test, shuffle=False)
