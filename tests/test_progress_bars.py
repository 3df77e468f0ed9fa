"""Every Trainer the package builds shows tqdm's progress bar unless the user configures one: Lightning would pick
rich's wherever rich is installed (transformers brings it), and rich's console proxy recurses in a Jupyter kernel."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Windows
from lightning_memdec.training.fit import lightning_cli

pytest.importorskip("rich", reason="Lightning picks rich's bar only where rich is installed")

FIT = ["--config", "experiments/embedded-base-small", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
RICH = ["--trainer.callbacks+", "lightning.pytorch.callbacks.RichProgressBar"]


def bars(trainer: L.Trainer) -> list[type]:
    return [type(c) for c in trainer.callbacks if isinstance(c, ProgressBar)]


def test_rich_is_what_lightning_would_pick_here():
    """The premise: without our default, this environment's Trainer shows rich's bar."""
    assert bars(L.Trainer(accelerator="cpu", logger=False)) == [RichProgressBar]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], [TQDMProgressBar]), (RICH, [RichProgressBar]), (["--trainer.enable_progress_bar", "false"], [])],
    ids=["default", "configured", "disabled"],
)
def test_fit_shows_tqdm_unless_a_bar_is_configured(extra, expected, tmp_path):
    cli = lightning_cli([*FIT, "--trainer.default_root_dir", str(tmp_path), *extra], run=False)
    assert bars(cli.trainer) == expected


class BarRecorder(L.Callback):
    def __init__(self) -> None:
        self.bars: list[type] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self.bars = bars(trainer)


@pytest.mark.parametrize("given", [[], [RichProgressBar()]], ids=["default", "given"])
def test_a_stage_shows_tqdm_unless_its_callbacks_hold_a_bar(given, tmp_path, biomed_corpus, tiny_gpt2):
    recorder = BarRecorder()
    windows = Windows(window=64, stride=32, batch_size=8)
    build_datastore(biomed_corpus, str(tiny_gpt2), tmp_path / "ds", windows=windows, callbacks=[recorder, *given])
    assert recorder.bars == ([RichProgressBar] if given else [TQDMProgressBar])
