"""The ``memdec`` console script: pipeline stages as typed functions, training through LightningCLI.

``memdec fit|validate|test --config …`` is a LightningCLI over :class:`MemoryDecoderModule` and
:class:`MemDecDataModule` (OmegaConf interpolation on, configs composed by repeated ``--config``);
every other subcommand is a pipeline stage whose flags come from its function signature.
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# list-valued flags users repeat (`--base a --base b`); jsonargparse appends with `--base+ a`
REPEATABLE_FLAGS = ("--base", "--bases")


def repeatable(args: list[str]) -> list[str]:
    """Turn each `--flag value` of a repeatable list flag into jsonargparse's append form `--flag+ value`."""
    return [f"{a}+" if a in REPEATABLE_FLAGS and i + 1 < len(args) and not args[i + 1].startswith("[") else a
            for i, a in enumerate(args)]


def stage_functions() -> dict:
    from lightning_memdec.corpus import tokenize
    from lightning_memdec.datastore import build_datastore
    from lightning_memdec.evaluate import evaluate
    from lightning_memdec.index import build_index
    from lightning_memdec.quickstart import quickstart
    from lightning_memdec.targets import build_targets
    from lightning_memdec.vocab import transfer_vocab

    return {
        "tokenize": tokenize,
        "build-datastore": build_datastore,
        "build-index": build_index,
        "build-targets": build_targets,
        "quickstart": quickstart,
        "evaluate": evaluate,
        "transfer-vocab": transfer_vocab,
    }


def lightning_cli(args: list[str] | None = None, run: bool = True):
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
            parser.add_argument("--budget_fraction", type=float, default=0.1,
                                help="a decoder from `memdec transfer-vocab` trains this fraction of its source run's "
                                     "steps when trainer.max_steps is unset (-1)")

        def before_instantiate_classes(self):
            from lightning.pytorch.utilities import rank_zero_info

            from lightning_memdec.vocab import budget_steps

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if self.subcommand in (None, "fit") and cfg.trainer.max_steps == -1:
                steps = budget_steps(cfg.model.model, cfg.budget_fraction)
                if steps is not None:
                    rank_zero_info(f"transferred decoder: trainer.max_steps = {steps} ({cfg.budget_fraction} of its source run)")
                    cfg.trainer.max_steps = steps

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
    raw = sys.argv[1:] if args is None else list(args)
    if raw and raw[0] in LIGHTNING_COMMANDS:
        lightning_cli(args)  # None: LightningCLI reads sys.argv itself
        return
    from jsonargparse import CLI

    CLI(stage_functions(), args=repeatable(raw), as_positional=False)


if __name__ == "__main__":
    main()
