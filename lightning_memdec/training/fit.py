"""Training entry points: the LightningCLI behind ``memdec fit|validate|test`` and :func:`fit` for Python.

Both build the same :class:`MemDecCLI` — the Memory Decoder module and DataModule, with checkpointing,
Hugging Face export and a learning-rate monitor always present — so a run started from Python and one
started from YAML on the command line are the same run.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_memdec.io.artifact_dirs import ArtifactError, Interrupted, check_writable_dir, read_meta
from lightning_memdec.io.output_lock import OutputLock
from lightning_memdec.io.packaged_configs import config_args
from lightning_memdec.training.callbacks import (
    ExportHuggingFace,
    LearningRateLog,
    check_export_dir,
    export_run_root,
)
from lightning_memdec.training.checkpoint_files import RESUME, AtomicCheckpointIO, RunCheckpoint, resolve_resume
from lightning_memdec.training.datamodule import MemDecDataModule
from lightning_memdec.training.lightning_module import MemoryDecoderModule
from lightning_memdec.training.resume_state import (
    ExclusiveRunRoot,
    LoggerVersionCheckpoint,
    RandomStateCheckpoint,
    default_checkpoint_dir,
    resumed_logger,
)
from lightning_memdec.training.vocab_transfer import budget_steps


class MemDecCLI(LightningCLI):
    """LightningCLI for the Memory Decoder, with checkpointing and Hugging Face export built in.

    ``ckpt_path``: the checkpoint :func:`fit` resumes from (``--ckpt_path`` exists only under a subcommand); resolved
    before the classes are built, as ``--ckpt_path`` is, into :attr:`resume_from`.
    """

    def __init__(self, *args, ckpt_path: str | Path | None = None, **kwargs) -> None:
        self.resume_from = ckpt_path
        self.run_root_lock: OutputLock | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self.release_run_root()  # a notebook's next fit into this root must not find it locked
            raise

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: the decoder has no predict step, and ``memdec`` offers no predict command."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
                # Lightning's own default (the working directory), stated so that configs can interpolate it
                # (logger/tensorboard.yaml: save_dir: ${trainer.default_root_dir})
                "trainer.default_root_dir": ".",
            }
        )
        parser.add_lightning_class_args(ExportHuggingFace, "export")
        parser.add_lightning_class_args(LearningRateLog, "lr_monitor")
        parser.add_argument(
            "--budget_fraction",
            type=float,
            default=0.1,
            help="a decoder from `memdec transfer-vocab` trains this fraction of its source run's "
            "steps when trainer.max_steps is unset (-1)",
        )

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):  # from Python: interpolations of settings left at their defaults resolved here
            args = resolved_with_defaults(args, parser.get_defaults())
        super().parse_arguments(parser, args)
        asked = self.config.get(f"{self.config.get('subcommand')}.ckpt_path")
        if asked is not None and str(asked) != "last":  # before LightningCLI reads the file's hyperparameters
            resolve_resume(asked, ".")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.checkpoint.dirpath is None:  # README: checkpoints in <root>/checkpoints, found again by a resume
            cfg.checkpoint.dirpath = str(default_checkpoint_dir(cfg.trainer.default_root_dir))
        if self.subcommand in (None, "fit"):  # a second run into this root is refused before any model loads
            check_writable_dir(cfg.trainer.default_root_dir, "--trainer.default_root_dir")
            if cfg.export.dirpath is not None:  # and an export dir it could not, or must not, replace at its end
                check_export_dir(
                    cfg.export.dirpath, export_run_root(cfg.trainer.default_root_dir), cfg.export.overwrite
                )
            if self.subcommand == "fit":  # `memdec fit`; from Python (run=False) the callback locks at setup, as
                # a lock taken here would outlive a CLI object that is never fitted
                self.run_root_lock = OutputLock(cfg.trainer.default_root_dir).acquire()
        asked = cfg.get("ckpt_path") if self.subcommand else self.resume_from
        resume = resolve_resume(asked, cfg.checkpoint.dirpath)  # "last": the newest whole checkpoint, or an error
        if resume is not None:
            self.resume_from = str(resume)
            if self.subcommand:
                cfg.ckpt_path = self.resume_from
            if self.subcommand in (None, "fit"):
                cfg.trainer.logger = resumed_logger(cfg.trainer.logger, resume, cfg.trainer.default_root_dir)
        if self.subcommand in ("validate", "test") and resume is None:
            warn_if_untrained(self.subcommand, cfg.model.model)
        if self.subcommand in (None, "fit") and cfg.trainer.max_steps == -1:
            steps = budget_steps(cfg.model.model, cfg.budget_fraction)
            if steps is not None:
                rank_zero_info(
                    f"transferred decoder: trainer.max_steps = {steps} ({cfg.budget_fraction} of its source run)"
                )
                cfg.trainer.max_steps = steps

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's refusal of a trainer setting (FSDP1 on a CPU, no GPU for ``accelerator: gpu``) as one error
        line naming the settings, not a traceback.

        Without a progress bar in the config, tqdm's: Lightning picks rich's wherever rich is installed (transformers
        brings it), and rich's console proxy recurses inside a Jupyter kernel (RecursionError)."""
        trainer = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer
        configured = trainer.callbacks or []
        configured = configured if isinstance(configured, list) else [configured]  # YAML allows one callback alone
        if trainer.enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in configured):
            kwargs.setdefault("callbacks", [*configured, TQDMProgressBar()])
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:
            raise ValueError(f"the trainer settings (--trainer.*, the hardware config) do not run here: {err}") from err
        for callback in trainer.callbacks:
            if isinstance(callback, ExclusiveRunRoot) and self.run_root_lock is not None:
                callback.lock = self.run_root_lock  # held since before the models loaded; released when fit ends
        return trainer

    def release_run_root(self) -> None:
        """Let go of the run root's lock (idempotent; the ExclusiveRunRoot callback shares it)."""
        if self.run_root_lock is not None:
            self.run_root_lock.release()

    def before_fit(self) -> None:
        """Run by LightningCLI before ``trainer.fit`` (and by :func:`fit`)."""
        check_monitored_metrics(self.trainer, self.datamodule)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit`` (LightningCLI runs this method for ``fit``), where a stop by SIGTERM is an exit 143 that
        names the checkpoint to resume from: Lightning's own stop raises a SystemExit with no code, an exit 0 that
        tells a scheduler, a shell's ``&&`` or ``memdec quickstart``'s caller that the training finished."""
        try:
            self.trainer.fit(**kwargs)
        except SIGTERMException:
            raise training_interrupted(self.trainer) from None

    def checkpoint_dir(self) -> Path:
        """Where ModelCheckpoint writes (``<trainer.default_root_dir>/checkpoints`` unless checkpoint.dirpath)."""
        return Path(next(c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)).dirpath)

    def export_dir(self) -> Path:
        """Where the ExportHuggingFace callback writes the trained model."""
        export = next(c for c in self.trainer.callbacks if isinstance(c, ExportHuggingFace))
        return export.resolve_dir(self.trainer)


def training_interrupted(trainer: L.Trainer) -> Interrupted:
    """The error a training stopped by SIGTERM raises (:meth:`Interrupted.said`: its message printed too)."""
    checkpoint = trainer.checkpoint_callback
    newest = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
    if getattr(checkpoint, "saved_at_sigterm", False):
        kept = f"step {trainer.global_step} is saved in {newest}"
    else:
        kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved"
    message = f"training interrupted (SIGTERM) at step {trainer.global_step}; {kept}: {RESUME}."
    return Interrupted.said(message, trainer.global_rank, trainer.world_size)


def check_monitored_metrics(trainer: L.Trainer, datamodule: MemDecDataModule) -> None:
    """A callback that monitors a validation metric (EarlyStopping, a ModelCheckpoint's top-k) in a run without
    validation data failed after the first epoch, with nothing saved: refused before any work instead."""
    validates = datamodule.hparams.val_corpus is not None and trainer.limit_val_batches != 0
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith("val/") and not validates:
            raise ValueError(
                f"{type(callback).__name__} monitors {monitor}, but this run has no validation data (data.val_corpus, "
                "trainer.limit_val_batches): give a validation split or leave the callback out."
            )


def warn_if_untrained(subcommand: str, model: str | None) -> None:
    """``memdec test`` without ``--ckpt_path`` scores ``model.model`` as it loads: a decoder ``fit`` exported, or,
    easy to miss, the starting weights a run began from."""
    if model is not None:
        try:
            read_meta(model, kind="memory_decoder")
            return
        except ArtifactError:
            pass
    rank_zero_warn(
        f"memdec {subcommand} without --ckpt_path scores the decoder as model.model/model.config give it "
        f"({model or 'built from model.config'}), which is not a decoder `memdec fit` exported: add --ckpt_path last "
        "(the run's newest checkpoint) or --ckpt_path FILE.ckpt to score the trained decoder."
    )


INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")  # ${section.key}, as the shipped configs interpolate settings


def resolved_with_defaults(config: dict[str, Any], defaults) -> dict[str, Any]:
    """``config`` with its interpolations resolved, those naming a setting it leaves out taking the parser's
    ``defaults`` (``${data.window}``: the DataModule's window); as the command line's YAML, where the parser
    resolves them after its defaults. A config without interpolations is returned as it is."""
    from omegaconf import OmegaConf

    named = set(INTERPOLATION.findall(repr(config)))
    if not named:
        return config
    merged = OmegaConf.create(config)
    for key in sorted(named):
        if OmegaConf.select(merged, key, default=None) is None and defaults.get(key) is not None:
            OmegaConf.update(merged, key, defaults.get(key), force_add=True)
    return OmegaConf.to_container(merged, resolve=True)


def lightning_cli(
    args: list[str] | dict[str, Any] | None = None, run: bool = True, ckpt_path: str | Path | None = None
) -> MemDecCLI:
    """The ``memdec fit|validate|test`` command line (``args`` None: LightningCLI reads ``sys.argv``).

    ``--config`` takes files or packaged config names, and expands an experiment's ``compose:`` groups.
    """
    if run:  # the command line: configs say ${data.window}, and under the fit/validate/test subcommands that path is
        # relative; a process-wide setting, so not made for a parse without subcommands (fit() from Python)
        from jsonargparse import set_parsing_settings

        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with warnings.catch_warnings():
        # args are passed on purpose (packaged configs resolved, or a dict from Python), not by mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MemDecCLI(
            MemoryDecoderModule,
            MemDecDataModule,
            args=args if isinstance(args, dict) else config_args(sys.argv[1:] if args is None else args),
            run=run,
            # from Python (a dict) a config mistake raises (see fit) instead of printing the usage and exiting
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": not isinstance(args, dict)},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            trainer_defaults={
                "callbacks": [ExclusiveRunRoot(), RandomStateCheckpoint(), LoggerVersionCheckpoint()],
                "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
            },
            ckpt_path=ckpt_path,
        )


def fit(config: dict[str, Any], ckpt_path: str | Path | None = None, callbacks: Sequence[Callback] = ()) -> Path:
    """Train the Memory Decoder (or any causal LM: ``model.beta: 0``) from a config dict; returns the export dir.

    ``config`` has the sections of a ``memdec fit`` YAML (``model``, ``data``, ``trainer``, and optionally
    ``checkpoint``, ``export``, ``lr_monitor``, ``budget_fraction``, ``seed_everything``); build it with
    :func:`lightning_memdec.io.packaged_configs.load_config` to start from shipped YAML files.
    ``ckpt_path`` resumes (``"last"``: ``last.ckpt`` of ``checkpoint.dirpath``, default
    ``<trainer.default_root_dir>/checkpoints``; an error when there is none). ``callbacks``: instances added to the
    Trainer's (a config names classes; these are objects the caller reads afterwards, e.g. a
    :class:`~lightning_memdec.training.throughput.TrainingThroughput`).
    """
    config = copy.deepcopy(config)  # the parser turns nested dicts into Namespaces in place
    if "model" not in config or "data" not in config:
        raise ValueError(f"a fit config needs 'model' and 'data' sections, got {sorted(config)}.")
    try:
        cli = lightning_cli(config, run=False, ckpt_path=ckpt_path)
    except argparse.ArgumentError as err:  # a misspelled key or a bad value, named by the parser
        raise ValueError(f"the fit config: {err}") from None
    cli.trainer.callbacks.extend(callbacks)
    cli.before_fit()
    cli.fit(model=cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)  # its callback locks the root
    return cli.export_dir()
