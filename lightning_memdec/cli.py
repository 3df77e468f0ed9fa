"""The ``memdec`` console script: pipeline stages as typed functions, training through LightningCLI.

``memdec fit|validate|test --config …`` is a LightningCLI over :class:`MemoryDecoderModule` and
:class:`MemDecDataModule` (OmegaConf interpolation on, configs composed by repeated ``--config``);
every other subcommand is a pipeline stage whose flags come from its function signature.
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def stage_functions() -> dict:
    from lightning_memdec.corpus import tokenize
    from lightning_memdec.datastore import build_datastore
    from lightning_memdec.index import build_index
    from lightning_memdec.targets import build_targets

    return {
        "tokenize": tokenize,
        "build-datastore": build_datastore,
        "build-index": build_index,
        "build-targets": build_targets,
    }


def lightning_cli(args: list[str], run: bool = True):
    """LightningCLI for the Memory Decoder, with checkpointing and Hugging Face export built in."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from lightning_memdec.callbacks import ExportHuggingFace
    from lightning_memdec.data import MemDecDataModule
    from lightning_memdec.module import MemoryDecoderModule

    class MemDecCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step}", "checkpoint.auto_insert_metric_name": False})
            parser.add_lightning_class_args(ExportHuggingFace, "export")
            parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")

    # configs say ${data.window}; under the fit/validate/test subcommands that path is relative
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return MemDecCLI(
        MemoryDecoderModule,
        MemDecDataModule,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else list(args)
    if args and args[0] in LIGHTNING_COMMANDS:
        lightning_cli(args)
        return
    from jsonargparse import CLI

    CLI(stage_functions(), args=args, as_positional=False)


if __name__ == "__main__":
    main()
