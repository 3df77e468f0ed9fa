"""Batches carry their sparse targets as CSR and are padded on the device (``pad_targets``, run by the module's loss
on the batch its step receives): the padded batch the loss reads is bit-identical to the batch the loader used to pad on
the host, kept below as the reference (``host_padded_item`` / ``host_padded_collate``: the code before the change)."""

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from lightning_memdec.io.readers import Targets
from lightning_memdec.training.datamodule import (
    PAD_WINDOW,
    MemDecDataModule,
    WindowTargetsDataset,
    collate,
    pad_targets,
)
from lightning_memdec.training.lightning_module import MemoryDecoderModule

DECODER = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip


def host_padded_rows(targets: Targets, start: int, w: int, max_support: int | None):
    """The old ``WindowTargetsDataset._target_rows``: a window's CSR rows as padded [W, support] arrays."""
    offsets = np.asarray(targets.offsets[start : start + w + 1])
    lo, hi = int(offsets[0]), int(offsets[-1])
    counts = np.diff(offsets)
    rows = np.repeat(np.arange(w), counts)
    cols = np.arange(hi - lo) - np.repeat(offsets[:-1] - lo, counts)
    support = int(counts.max())
    if max_support is not None:
        support = min(support, max_support)
    keep = cols < support
    ids = np.zeros((w, support), dtype=np.int32)
    probs = np.zeros((w, support), dtype=np.float16)
    ids[rows[keep], cols[keep]] = targets.ids[lo:hi][keep]
    probs[rows[keep], cols[keep]] = targets.probs[lo:hi][keep]
    if max_support is not None and support < counts.max():
        p32 = probs.astype(np.float32)
        probs = (p32 / p32.sum(1, keepdims=True)).astype(np.float16)
    return ids, probs


def host_padded_item(ds: WindowTargetsDataset, j: int) -> dict[str, torch.Tensor]:
    """The old ``__getitem__``'s targets (the token fields are unchanged and taken from the new item)."""
    item = {k: v for k, v in ds[j].items() if not k.startswith("target_")}
    w = ds.window
    if ds.targets_dir is None:
        return {**item, "target_ids": torch.zeros(w, 1, dtype=torch.int32), "target_probs": torch.zeros(w, 1).half()}
    start = int(ds.windows.starts[0 if j == PAD_WINDOW else j])
    ids, probs = host_padded_rows(Targets(ds.targets_dir), start, w, ds.max_support)
    return {**item, "target_ids": torch.from_numpy(ids), "target_probs": torch.from_numpy(probs)}


def host_padded_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The old ``collate``: the support padded on the host with probability-0 entries of id 0."""
    support = max(item["target_ids"].shape[1] for item in items)
    pad = lambda t: torch.nn.functional.pad(t, (0, support - t.shape[1]))
    return {
        "input_ids": torch.stack([i["input_ids"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "target_ids": torch.stack([pad(i["target_ids"]) for i in items]),
        "target_probs": torch.stack([pad(i["target_probs"]) for i in items]),
        "loss_mask": torch.stack([i["loss_mask"] for i in items]),
        "start": torch.stack([i["start"] for i in items]),
    }


def reference(ds: WindowTargetsDataset, indices: list[int]) -> dict[str, torch.Tensor]:
    return host_padded_collate([host_padded_item(ds, j) for j in indices])


def assert_same_batch(got: dict, want: dict) -> None:
    assert list(got) and set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def window_indices(ds: WindowTargetsDataset) -> list[list[int]]:
    """Batches of one, two and four windows: the first ones, the last one (shorter history), fillers mixed in."""
    n = len(ds)
    return [[0], [1, n - 1], [PAD_WINDOW, 2], [3, PAD_WINDOW, n - 2, 0], [PAD_WINDOW]]


@pytest.mark.parametrize("max_support", [None, 1, 2, 7, 16, 32])
def test_device_padded_batch_is_the_host_padded_batch(biomed_targets_pair, max_support):
    pair = biomed_targets_pair
    ds = WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], 64, 48, max_support=max_support)
    truncated = 0
    for indices in window_indices(ds):
        batch = collate([ds[j] for j in indices])
        want = reference(ds, indices)
        assert batch["target_flat_ids"].numel() == int(batch["target_counts"].sum())  # no padding travels
        assert_same_batch(pad_targets(batch), want)
        truncated += max_support is not None and batch["target_support"] == max_support
    if max_support is not None and max_support < 16:
        assert truncated, "the cap truncates some of these windows"


def test_windows_without_targets_pad_to_one_empty_entry(biomed_targets_pair):
    ds = WindowTargetsDataset(biomed_targets_pair["train_corpus"], None, 64, 64)
    for indices in window_indices(ds):
        batch = collate([ds[j] for j in indices])
        assert batch["target_flat_ids"].numel() == 0 and batch["target_support"] == 1
        padded = pad_targets(batch)
        assert_same_batch(padded, reference(ds, indices))
        assert padded["target_ids"].shape == (len(indices), 64, 1) and not padded["target_probs"].any()


def test_a_later_wider_window_sets_the_batch_s_support_and_every_row_keeps_its_own_entries():
    """The batch's support is its widest window's, wherever it stands: each position's row holds its own CSR entries
    then zeros (a support read off the first window cut the wider rows and shifted every later row's entries)."""
    width = 4

    def window(counts: list[int], first_id: int) -> dict:
        ids = torch.arange(first_id, first_id + sum(counts), dtype=torch.int32)
        probs = torch.cat([torch.full((c,), 1.0 / c) for c in counts]).half()
        return {"input_ids": torch.zeros(width, dtype=torch.long), "labels": torch.zeros(width, dtype=torch.long),
                "loss_mask": torch.ones(width, dtype=torch.bool), "start": torch.tensor(0), "target_flat_ids": ids,
                "target_flat_probs": probs, "target_counts": torch.tensor(counts, dtype=torch.int32),
                "target_support": max(counts)}  # fmt: skip

    items = [window([2, 1, 2, 1], 100), window([5, 3, 4, 1], 200)]
    dense = pad_targets(collate(items))
    assert dense["target_ids"].shape == (2, width, 5)
    for b, item in enumerate(items):
        start = 0
        for row, count in enumerate(item["target_counts"].tolist()):
            own_ids = item["target_flat_ids"][start : start + count].tolist()
            own_probs = item["target_flat_probs"][start : start + count].tolist()
            assert dense["target_ids"][b, row].tolist() == own_ids + [0] * (5 - count)
            assert dense["target_probs"][b, row].tolist() == own_probs + [0.0] * (5 - count)
            start += count


def test_a_batch_without_csr_targets_is_left_as_it_is():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "target_ids": torch.zeros(1, 4, 2, dtype=torch.int32)}
    assert pad_targets(batch) is batch


def test_mid_epoch_resume_batches_are_the_host_padded_ones(biomed_targets_pair):
    """The resumed loader (the sampler path, unchanged) hands the same windows; padded, they are the old batches."""
    pair = biomed_targets_pair

    def loader():
        dm = MemDecDataModule(pair["train_corpus"], pair["train_targets"], window=32, batch_size=3, max_support=5)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=1, accelerator=None)  # rank 1 of 2: fillers at the end
        dm.setup("fit")
        out = dm.train_dataloader()
        out.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 3, "ranks": 2})
        return dm, out

    dm, first = loader()
    indices = list(first.sampler)  # this rank's windows after the resume point
    _, resumed = loader()
    batches = list(resumed)
    assert len(batches) == -(-len(indices) // 3) and len(batches) > 1
    for b, batch in enumerate(batches):
        assert_same_batch(pad_targets(batch), reference(dm.train, indices[3 * b : 3 * b + 3]))


def loss_and_grads(module: MemoryDecoderModule, batch: dict):
    module.zero_grad(set_to_none=True)
    module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.decoder.named_parameters()}


@pytest.mark.parametrize("max_support", [None, 3])
def test_training_step_loss_and_gradients_are_unchanged(biomed_targets_pair, max_support):
    pair = biomed_targets_pair
    ds = WindowTargetsDataset(pair["train_corpus"], pair["train_targets"], 64, 64, max_support=max_support)
    indices = [2, PAD_WINDOW, 5, len(ds) - 1]
    torch.manual_seed(0)
    module = MemoryDecoderModule(config=DECODER, beta=0.5)
    module.configure_model()
    batch = collate([ds[j] for j in indices])  # CSR: the step pads it
    got, got_grads = loss_and_grads(module, batch)
    want, want_grads = loss_and_grads(module, reference(ds, indices))
    assert torch.equal(got, want) and torch.isfinite(got)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


class CheckBatches(L.Callback):
    """Compares each training and validation batch a step receives with the host-padded batch of its windows."""

    def __init__(self):
        self.seen = 0

    def _check(self, trainer, batch, dataset):
        assert "target_counts" in batch  # still CSR on the device: the step's loss pads it
        batch = pad_targets(batch)
        starts = batch["start"].tolist()
        index = {int(s): j for j, s in enumerate(dataset.windows.starts)}
        assert_same_batch(batch, reference(dataset, [PAD_WINDOW if s < 0 else index[s] for s in starts]))
        self.seen += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(trainer, batch, trainer.datamodule.train)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._check(trainer, batch, trainer.datamodule.val)


def test_trainer_steps_pad_to_the_host_padded_batches(tmp_path, biomed_targets_pair):
    pair = biomed_targets_pair
    data = MemDecDataModule(**pair, window=64, batch_size=2, max_support=6)
    check = CheckBatches()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=2, val_check_interval=3, callbacks=[check],
        default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False, logger=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(MemoryDecoderModule(config=DECODER), datamodule=data)
    assert check.seen == 5
