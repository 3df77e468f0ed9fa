"""Lightning callbacks: export the trained decoder as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_memdec.artifacts import base_meta, write_json_atomic
from lightning_memdec.assets import load_tokenizer


class ExportHuggingFace(L.Callback):
    """At the end of fit, save the decoder with ``save_pretrained`` + its tokenizer + meta.json.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and plugs into any base LM of the
    same tokenizer (``InterpolatedLM``). meta.json records which targets it was trained on.

    Args:
        dirpath: output directory; default ``<log_dir>/hf_model``.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank joins the state-dict gather (FSDP shards); rank 0 writes
        state = trainer.strategy.lightning_module_state_dict()
        out = self.resolve_dir(trainer)  # log_dir is a collective call too
        if not trainer.is_global_zero:
            return
        prefix = "decoder."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        out.mkdir(parents=True, exist_ok=True)
        pl_module.decoder.save_pretrained(out, state_dict=state)
        datamodule = trainer.datamodule
        provenance = datamodule.provenance() if hasattr(datamodule, "provenance") else {}
        if hasattr(datamodule, "tokenizer_name"):
            load_tokenizer(datamodule.tokenizer_name).save_pretrained(out)
        meta = base_meta(
            "memory_decoder",
            global_step=trainer.global_step,
            beta=pl_module.hparams.beta,
            initialised_from=pl_module.hparams.model or "config",
            **provenance,
        )
        write_json_atomic(out / "meta.json", meta)
