"""Lightning callbacks: export the trained decoder as a Hugging Face model directory; cross-model validation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_memdec.io.artifact_dirs import (
    ArtifactError,
    base_meta,
    check_writable_dir,
    finish_interrupted_publish,
    partial_dir,
    publish,
    read_meta,
)
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.output_lock import OutputLock

EXPORT_KINDS = ("memory_decoder", "base_lm")  # fit's export, and one `memdec pretrain-bases` has completed


class ExportHuggingFace(L.Callback):
    """At the end of fit, save the decoder with ``save_pretrained`` + its tokenizer + meta.json.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and plugs into any base LM of the
    same tokenizer (``InterpolatedLM``). meta.json records which targets it was trained on, and the run root
    that trained it. The export is written to ``<dirpath>.partial`` and renamed into place, so a kill leaves the
    previous export whole; one exported by another run root is refused before training unless ``overwrite``.

    Args:
        dirpath: output directory; default ``<log_dir>/hf_model``.
        dtype: store the weights in this dtype (``float16`` halves a shipped model); config.json keeps the
            training dtype, so ``from_pretrained`` still loads float32 weights by default.
        overwrite: replace a decoder another run (another ``trainer.default_root_dir``) exported to ``dirpath``;
            this run's own export (a resume, a later fit of the same root) is replaced without it.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        dtype: Literal["float32", "float16", "bfloat16"] | None = None,
        overwrite: bool = False,
    ):
        self.dirpath = dirpath
        self.dtype = dtype
        self.overwrite = overwrite
        self.lock: OutputLock | None = None

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the model loads and the first step: an export dir the run could not (or must not) write is refused
        here, not after the whole training; a given one is locked, so two runs cannot export into it at once."""
        if stage != "fit":
            return
        out = self.resolve_dir(trainer)  # log_dir is a collective call
        root = export_run_root(trainer.default_root_dir)
        problem = self.prepare(out, root) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)  # every rank stops, not rank 0 alone
        if problem is not None:
            raise ArtifactError(problem)

    def prepare(self, out: Path, run_root: str) -> str | None:
        """On rank 0: lock a given export dir, finish an export stopped while it was renamed into place (the package's
        ``publish`` convention), then check the dir; what is wrong with it, or None."""
        try:
            check_writable_dir(out, "--export.dirpath")
            if self.dirpath is not None and self.lock is None:
                self.lock = OutputLock(out).acquire()
            finish_interrupted_publish(partial_dir(out), out)
            check_export_dir(out, run_root, self.overwrite)
        except ArtifactError as err:
            return str(err)
        return None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank joins the state-dict gather (FSDP shards); rank 0 writes
        state = trainer.strategy.lightning_module_state_dict()
        out = self.resolve_dir(trainer)  # log_dir is a collective call too
        if not trainer.is_global_zero:
            return
        prefix = "decoder."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if self.dtype is not None:
            state = cast_state_dict(state, getattr(torch, self.dtype))
        work = partial_dir(out)  # a killed export's leftovers are discarded: the export is redone whole
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        config = pl_module.decoder.config
        padded_vocab, config.vocab_size = config.vocab_size, pl_module.vocab_size  # export without the padding ids
        try:
            pl_module.decoder.save_pretrained(work, state_dict=pl_module.unpadded(state))
        finally:
            config.vocab_size = padded_vocab
        datamodule = trainer.datamodule
        provenance = datamodule.provenance() if hasattr(datamodule, "provenance") else {}
        if hasattr(datamodule, "tokenizer_name"):
            load_tokenizer(datamodule.tokenizer_name).save_pretrained(work)
        meta = base_meta(
            "memory_decoder",
            global_step=trainer.global_step,
            tokens_seen=self.tokens_seen(trainer),
            beta=pl_module.hparams.beta,
            initialised_from=pl_module.hparams.model or "config",
            run_root=export_run_root(trainer.default_root_dir),  # whose export this is (check_export_dir)
            **provenance,
        )
        publish(work, out, meta)  # meta.json last, then renamed into place: the old export or the new, never a mix

    @staticmethod
    def tokens_seen(trainer: L.Trainer) -> int | None:
        """Input tokens of every optimiser step so far, over all ranks (windows × window × steps)."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "hparams") or "window" not in dm.hparams:
            return None
        per_step = dm.hparams.batch_size * dm.hparams.window * trainer.world_size * trainer.accumulate_grad_batches
        return int(per_step * trainer.global_step)


def export_run_root(root_dir: str | Path | None) -> str:
    """The run an export belongs to, as its meta.json records it: the absolute ``trainer.default_root_dir``."""
    return str(Path(root_dir if root_dir is not None else Path.cwd()).resolve())


def check_export_dir(out: str | Path, run_root: str, overwrite: bool) -> None:
    """``out`` may take this run's export: absent or empty, or a decoder this run root exported (a resume, a later
    fit of the same root), or another run's with ``overwrite``; anything else is refused, naming the fix."""
    out = Path(out)
    check_writable_dir(out, "--export.dirpath")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        meta = read_meta(out)
    except ArtifactError:
        meta = {}
    if meta.get("kind") not in EXPORT_KINDS:
        raise ArtifactError(
            f"--export.dirpath {out} holds files that are not a decoder `memdec fit` exported (no meta.json of kind "
            "memory_decoder), and the export replaces the whole directory: choose another --export.dirpath."
        )
    if meta.get("run_root") == run_root or overwrite:
        return
    owner = meta.get("run_root") or "unknown (an export of an earlier lightning_memdec)"
    raise ArtifactError(
        f"--export.dirpath {out} holds a decoder exported by another run (trainer.default_root_dir {owner}, global "
        f"step {meta.get('global_step')}), and this run ({run_root}) would replace it at its end: choose another "
        "--export.dirpath, or pass --export.overwrite true to replace it."
    )


class LearningRateLog(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (every ``memdec fit`` has one), idle when the trainer has no logger
    (``--trainer.logger false``), where Lightning's own stops the run before its first step."""

    def on_train_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``; tensors shared in memory (tied embeddings) stay shared, so saved once."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            tensor = cast.setdefault(tensor.data_ptr(), tensor.to(dtype))
        out[name] = tensor
    return out


class CrossModelEval(L.Callback):
    """During validation, the perplexity of each configured base LM alone and mixed with the decoder being trained.

    The Memory Decoder is meant to plug into any base LM of its tokenizer, so this tracks the quantity that matters
    (base + decoder at λ) for several bases while training. The first ``max_batches`` validation batches of each
    epoch (per rank) are run through every base; sums are reduced over ranks before logging:
    ``val/ppl_base/<base>``, ``val/ppl_mix/<base>`` (at the first λ) and, with several λ, ``val/ppl_mix/<base>@<λ>``.

    Args:
        bases: base LMs (names or directories), loaded once onto the training device (eval mode, no gradients).
        lambdas: the decoder's weight(s) λ in the mixture.
        max_batches: validation batches per epoch and rank used for these metrics.
    """

    def __init__(self, bases: list[str], lambdas: list[float] | float = 0.25, max_batches: int = 8):
        from lightning_memdec.kernels.scoring import check_lmbda

        bases = [bases] if isinstance(bases, str) else list(bases)
        if not bases:
            raise ValueError("CrossModelEval needs at least one base LM in bases.")
        self.names = [Path(str(b).rstrip("/")).name or str(b) for b in bases]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"CrossModelEval bases must have distinct names (last path components), got {self.names}.")
        lambdas = [lambdas] if isinstance(lambdas, (int, float)) else list(lambdas)
        if not lambdas:
            raise ValueError("CrossModelEval needs at least one λ in lambdas.")
        if max_batches <= 0:
            raise ValueError(f"max_batches must be positive, got {max_batches}.")
        self.bases, self.lambdas, self.max_batches = bases, [check_lmbda(x) for x in lambdas], max_batches
        self.models = None
        self.vocab = None
        self._nll = self._count = None

    # -- models ------------------------------------------------------------------------------------------------
    def load_bases(self, decoder, data_tokenizer: dict | None) -> None:
        """Load every base once; refuse one whose tokenizer (or vocabulary) is not the decoder's."""
        from lightning_memdec.hf.loading import find_tokenizer, load_causal_lm, output_rows
        from lightning_memdec.io.tokenizer_identity import check_head_covers_vocab, check_same_tokenizer, tokenizer_info

        decoder_rows = output_rows(decoder)
        fix = "CrossModelEval needs bases of the decoder's tokenizer"
        vocab = data_tokenizer["vocab_size"] if data_tokenizer is not None else decoder_rows
        models = []
        for ref in self.bases:
            model = load_causal_lm(ref).eval().requires_grad_(False)
            tok = find_tokenizer(ref, model)
            if tok is not None and data_tokenizer is not None:
                info = tokenizer_info(tok, Path(str(ref).rstrip("/")).name or str(ref))
                check_same_tokenizer(info, f"base LM {ref}", data_tokenizer, "the decoder's training data", fix)
            rows = output_rows(model)
            check_head_covers_vocab(rows, f"base LM {ref}", vocab, "the decoder's vocabulary", fix)
            if data_tokenizer is None and rows != decoder_rows:  # no tokenizer: a padded head cannot be told apart
                raise ValueError(
                    f"base LM {ref} has {rows} output ids but the decoder has {decoder_rows} (data "
                    f"vocabulary {vocab}); "
                    "CrossModelEval needs bases of the decoder's tokenizer."
                )
            models.append(model)
        self.models, self.vocab = models, vocab

    def _ensure_loaded(self, trainer, pl_module) -> None:
        if self.models is None:
            datamodule = getattr(trainer, "datamodule", None)
            train = getattr(datamodule, "train", None)
            meta = getattr(train, "meta", None) or {}
            self.load_bases(pl_module.decoder, meta.get("corpus", {}).get("tokenizer"))
        for i, model in enumerate(self.models):
            if model.device != pl_module.device:
                self.models[i] = model.to(pl_module.device)

    # -- hooks -------------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        self._ensure_loaded(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        import torch

        self._nll = torch.zeros(len(self.bases), 1 + len(self.lambdas), dtype=torch.float64, device=pl_module.device)
        self._count = torch.zeros((), dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import torch

        from lightning_memdec.kernels.scoring import gold_log_probs, mix_log_probs

        if trainer.sanity_checking or dataloader_idx != 0 or batch_idx >= self.max_batches:
            return
        mask = batch["loss_mask"].bool()
        if not mask.any():
            return
        gold = batch["labels"][mask]

        def scored(model):  # [n] float64 at the loss-masked positions
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[mask]
            return gold_log_probs(logits, gold, self.vocab).double()

        with torch.no_grad(), trainer.precision_plugin.forward_context():
            decoder = scored(pl_module.decoder)
            for i, model in enumerate(self.models):
                base = scored(model)
                self._nll[i, 0] -= base.sum()
                for j, lmbda in enumerate(self.lambdas, start=1):
                    self._nll[i, j] -= mix_log_probs(base, decoder, lmbda).sum()
        self._count += mask.sum()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._nll is None:
            return
        nll = trainer.strategy.reduce(self._nll, reduce_op="sum")
        count = trainer.strategy.reduce(self._count, reduce_op="sum")
        if count <= 0:
            return
        ppl = (nll / count).exp().float()
        metrics = {}
        for i, name in enumerate(self.names):
            metrics[f"val/ppl_base/{name}"] = ppl[i, 0]
            metrics[f"val/ppl_mix/{name}"] = ppl[i, 1]
            if len(self.lambdas) > 1:
                for j, lmbda in enumerate(self.lambdas, start=1):
                    metrics[f"val/ppl_mix/{name}@{lmbda:g}"] = ppl[i, j]
        pl_module.log_dict(metrics, sync_dist=False)
