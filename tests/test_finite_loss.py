"""A non-finite training loss stops the run: at once on the CPU, one step later on a GPU (FiniteLossCheck(defer=True),
run here on the CPU), and in every case before a checkpoint or the export."""

from __future__ import annotations

import pytest
import torch

from lightning_memdec.training.datamodule import WindowTargetsDataset, collate
from lightning_memdec.training.finite_loss import FiniteLossCheck
from lightning_memdec.training.lightning_module import MemoryDecoderModule

TINY = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}


def test_an_immediate_check_raises_at_the_loss_itself():
    check = FiniteLossCheck()
    check.record(torch.tensor(1.5), lambda: "unused")
    with pytest.raises(FloatingPointError, match="step 3"):
        check.record(torch.tensor(float("inf")), lambda: "step 3")


def test_a_deferred_check_raises_at_the_next_record_or_when_asked():
    check = FiniteLossCheck(defer=True)
    check.record(torch.tensor(float("nan")), lambda: "step 3")  # not read yet
    with pytest.raises(FloatingPointError, match="step 3"):
        check.record(torch.tensor(2.0), lambda: "step 4")
    check.raise_pending()  # step 4 was finite; nothing left
    check.record(torch.tensor(float("nan")), lambda: "step 5")
    with pytest.raises(FloatingPointError, match="step 5"):
        check.raise_pending()
    check.raise_pending()  # reported once


def nan_module_and_batches(biomed_targets_pair):
    module = MemoryDecoderModule(config=TINY)
    module.configure_model()
    ds = WindowTargetsDataset(biomed_targets_pair["train_corpus"], biomed_targets_pair["train_targets"], 64, 64)
    return module, collate([ds[2], ds[5]]), collate([ds[3], ds[4]])


def test_the_module_deferring_names_the_batch_of_the_bad_step_at_the_next(biomed_targets_pair):
    module, bad, good = nan_module_and_batches(biomed_targets_pair)
    module.finite_check = FiniteLossCheck(defer=True)  # as on a GPU
    module.training_step(good, 6)
    with torch.no_grad():
        module.decoder.lm_head.weight.fill_(float("nan"))
    module.training_step(bad, 7)  # returns: its loss is read at the next step
    with pytest.raises(FloatingPointError, match=r"batch 7, windows starting at corpus positions \[128, 320\]"):
        module.training_step(good, 8)


@pytest.mark.parametrize("hook", ["on_save_checkpoint", "on_train_end"])
def test_a_pending_non_finite_loss_stops_checkpoints_and_the_export(biomed_targets_pair, hook):
    module, bad, _ = nan_module_and_batches(biomed_targets_pair)
    module.finite_check = FiniteLossCheck(defer=True)
    with torch.no_grad():
        module.decoder.lm_head.weight.fill_(float("nan"))
    module.training_step(bad, 7)
    args = ({},) if hook == "on_save_checkpoint" else ()
    with pytest.raises(FloatingPointError, match="batch 7"):
        getattr(module, hook)(*args)


def test_on_the_cpu_the_module_checks_at_once(biomed_targets_pair):
    module, bad, _ = nan_module_and_batches(biomed_targets_pair)
    module.on_fit_start()  # a CPU module: no deferral
    assert not module.finite_check.defer
    with torch.no_grad():
        module.decoder.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="batch 7"):
        module.training_step(bad, 7)
