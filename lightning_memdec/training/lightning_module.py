"""`MemoryDecoderModule`: a small causal LM trained to imitate kNN-LM distributions.

loss = β·KL(p_kNN ‖ p_mem) + (1 − β)·CE(next token), computed sparsely (see :mod:`kernels.memdec_loss`).
The decoder is any Hugging Face causal LM, continued from a checkpoint (as the paper does from GPT-2
small / Qwen2.5-0.5B) or built from a config. Works under any Lightning strategy: the model is created
in ``configure_model`` so FSDP can shard it as it is built.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric, SumMetric

from lightning_memdec.io.artifact_dirs import jsonable
from lightning_memdec.io.tokenizer_identity import check_head_covers_vocab
from lightning_memdec.kernels.memdec_loss import LOSS_KERNELS, LossKernel, memdec_loss
from lightning_memdec.training.datamodule import MemDecDataModule, pad_targets
from lightning_memdec.training.finite_loss import FiniteLossCheck

LRSchedule = Literal["cosine", "linear", "constant"]  # decay after warm-up
LR_SCHEDULES = get_args(LRSchedule)


# what the loss and the optimiser's steps depend on (the decoder's shape is checked against the checkpoint's; where
# its weights first came from does not matter once they are the checkpoint's)
RESUMED_SETTINGS = ("beta", "learning_rate", "weight_decay", "betas", "warmup_steps", "lr_schedule", "min_lr_ratio")


def check_resume_settings(saved: dict, current: dict) -> None:
    """A resumed fit continues the checkpoint's run: a loss weight changed there trains the rest with another
    objective, and a learning rate or schedule changed there is not even applied (the optimiser's and the
    schedule's states come back from the checkpoint), while the export would record the new values. Settings the
    steps do not depend on (compile, the loss kernel, fused AdamW) may change."""
    differs = [n for n in RESUMED_SETTINGS if n in saved and jsonable(saved[n]) != jsonable(current.get(n))]
    if differs:
        named = "; ".join(f"model.{name}: {saved[name]!r} there, {current.get(name)!r} here" for name in differs)
        raise ValueError(
            f"the checkpoint was trained with other model settings ({named}); resume with its settings, or start a "
            "new run from its exported decoder (--model.model <the export>) to train on with new ones."
        )


class MemoryDecoderModule(L.LightningModule):
    """The Memory Decoder and its training objective.

    Args:
        model: Hugging Face causal LM to continue training from (name, local directory, or a shipped base such
            as ``embedded:base-small``).
        config: instead of ``model``, a Hugging Face config to train from scratch: a ``config.json`` path,
            or a mapping with ``model_type`` and its fields (e.g. ``{model_type: gpt2, n_layer: 6}``).
        beta: weight of the KL term (1 − beta weights the next-token cross-entropy); paper: 0.5.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (or a fraction of all steps when < 1).
        lr_schedule: decay after warm-up: cosine, linear or constant.
        min_lr_ratio: the learning rate decays to this fraction of the peak.
        fused_adamw: AdamW's fused kernel (one launch for all parameters); ``None``: on when the decoder is on a
            GPU, where per-parameter launches are a measurable share of a small decoder's step.
        compile: ``torch.compile`` the decoder in place (``nn.Module.compile``: state-dict keys unchanged, so
            checkpoints and the exported model are the same); off by default, compilation takes minutes. Pair it
            with ``data.pad_last_batch`` (one batch shape, one compilation; a warning says so).
        pad_vocab_multiple: pad the decoder's output ids to a multiple of this (64 on GPUs: tensor-core tiles
            of the [tokens × vocab] products); the loss leaves the padded ids' logits out (``vocab_size``), so the
            loss and its gradient are unchanged, and they are removed again before export. 1: no padding.
        loss_kernel: how the loss is computed, same values and gradients (:data:`kernels.memdec_loss.LossKernel`):
            ``chunked`` (the default) or ``rows`` (two passes over the logits, Triton kernels on a
            GPU, no host synchronisation in the step).
    """

    def __init__(
        self,
        model: str | None = None,
        config: str | dict[str, Any] | None = None,
        beta: float = 0.5,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: float = 0.05,
        lr_schedule: LRSchedule = "cosine",
        min_lr_ratio: float = 0.1,
        fused_adamw: bool | None = None,
        compile: bool = False,
        pad_vocab_multiple: int = 1,
        loss_kernel: LossKernel = "chunked",
    ):
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError(
                "give exactly one of model (a name/path to continue from) or config (to train from scratch)."
            )
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        if pad_vocab_multiple < 1:
            raise ValueError(f"pad_vocab_multiple must be ≥ 1 (1: no padding), got {pad_vocab_multiple}.")
        check_lr_schedule(lr_schedule)
        if loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"loss_kernel must be one of {LOSS_KERNELS}, got {loss_kernel!r}.")
        if isinstance(config, dict) and "model_type" not in config:
            raise ValueError(
                f"config needs a model_type (e.g. 'gpt2') beside its fields, got keys {sorted(config)}; or give the "
                "path of a config.json."
            )
        self.save_hyperparameters()
        self.vocab_size: int | None = None  # the decoder's own output ids; the logits beyond are padding
        self.finite_check = FiniteLossCheck()  # at once; deferred on a GPU from on_fit_start
        self.decoder = None
        # one set per evaluation stage, so `memdec test` never mixes with validation during fit
        self.eval_metrics = torch.nn.ModuleDict(
            {
                split: torch.nn.ModuleDict(
                    {"ce": MeanMetric(), "kl": MeanMetric(), "loss": MeanMetric(), "target_entries": SumMetric()}
                )
                for split in ("val", "test")
            }
        )

    # -- model -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.decoder is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        from lightning_memdec.hf.loading import load_causal_lm

        h = self.hparams
        if h.model is not None:
            # from_pretrained returns eval mode; Lightning keeps sub-module modes, so switch dropout back on
            # float32 master weights whatever dtype the checkpoint was saved in (mixed precision casts per op)
            self.decoder = load_causal_lm(h.model, dtype=torch.float32).train()
        else:
            if isinstance(h.config, str):
                cfg = AutoConfig.from_pretrained(h.config)
            else:
                fields = dict(h.config)
                cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
            self.decoder = AutoModelForCausalLM.from_config(cfg)
        self.vocab_size = self.decoder.config.vocab_size
        if h.pad_vocab_multiple > 1 and self.vocab_size % h.pad_vocab_multiple:
            device = self.decoder.get_input_embeddings().weight.device
            # the new rows' random init leaves the stream dropout draws from as it was (a padded run is the same run)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.decoder.resize_token_embeddings(self.vocab_size, pad_to_multiple_of=h.pad_vocab_multiple)
        if self.device_mesh is not None:  # FSDP2Strategy (ModelParallelStrategy) shards here; FSDPStrategy wraps itself
            from lightning_memdec.training.fsdp2 import shard_decoder

            shard_decoder(self.decoder, self.device_mesh["data_parallel"])
        if h.compile:
            self.decoder.compile()

    def check_decoder_tokenizer(self, corpus_tokenizer: dict, corpus: str) -> None:
        """A decoder continued from a model must speak the corpus's tokenizer (same ids, not just as many)."""
        from lightning_memdec.hf.loading import find_tokenizer
        from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info

        tokenizer = None if self.hparams.model is None else find_tokenizer(self.hparams.model, self.decoder)
        if tokenizer is not None:
            decoder = tokenizer_info(tokenizer, str(self.hparams.model))
            check_same_tokenizer(decoder, f"decoder {self.hparams.model}", corpus_tokenizer, f"corpus {corpus}")

    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train", None) is None:
            return
        if datamodule.train.meta["targets"] is None and self.hparams.beta > 0:
            raise ValueError(
                f"beta={self.hparams.beta} needs kNN targets; set data.train_targets or use beta 0 "
                "(next-token loss only)."
            )
        vocab = datamodule.train.meta["corpus"]["tokenizer"]["vocab_size"]
        data_what = f"the data's tokenizer {datamodule.tokenizer_name}"
        fix = "use a decoder of the same tokenizer"
        check_head_covers_vocab(self.decoder.config.vocab_size, "the decoder", vocab, data_what, fix)
        self.check_decoder_tokenizer(datamodule.train.meta["corpus"]["tokenizer"], datamodule.hparams.train_corpus)
        max_pos = getattr(self.decoder.config, "max_position_embeddings", None) or getattr(
            self.decoder.config, "n_positions", None
        )
        if max_pos is not None and datamodule.hparams.window > max_pos:
            raise ValueError(
                f"data window {datamodule.hparams.window} exceeds the decoder's {max_pos} positions; lower data.window."
            )
        if stage == "fit" and self.hparams.compile and not datamodule.hparams.get("pad_last_batch", True):
            rank_zero_warn(
                "model.compile with data.pad_last_batch false: an epoch's last, partial batch compiles the decoder "
                "again for its shape (about 30 s of a GPT-2-small fit on an H200); set data.pad_last_batch true."
            )

    def unpadded(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's state dict (keys without the ``decoder.`` prefix) with the ``pad_vocab_multiple`` rows cut
        from its input and output embeddings, as exported: a model of the tokenizer's own vocabulary. Tied weights
        are one tensor again (an FSDP2 gather gives each name its own copy), so they are saved once."""
        first = {id(p): name for name, p in self.decoder.named_parameters()}
        tied = {n: first[id(p)] for n, p in self.decoder.named_parameters(remove_duplicate=False) if first[id(p)] != n}
        state = {k: state[tied[k]] if tied.get(k) in state else v for k, v in state.items()}
        heads = {id(self.decoder.get_input_embeddings()), id(self.decoder.get_output_embeddings())}
        cut = {
            f"{name}.{p}" for name, mod in self.decoder.named_modules() if id(mod) in heads for p in ("weight", "bias")
        }
        return {k: v[: self.vocab_size] if k in cut and v.shape[0] > self.vocab_size else v for k, v in state.items()}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits over the decoder's own ids: a view without the padding ids (the loss reads it without a copy)."""
        return self.decoder(input_ids=input_ids, use_cache=False).logits[..., : self.vocab_size]

    # -- steps -----------------------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor]):
        """The loss of a batch whose CSR targets are padded here, on the device the step runs on (each rank its own
        batch): only the kept entries crossed the host-to-device copy. Dense batches pass through."""
        batch = pad_targets(batch)
        logits = self.decoder(input_ids=batch["input_ids"], use_cache=False).logits  # the padding ids' columns too
        return memdec_loss(
            logits,
            batch["labels"],
            batch["target_ids"],
            batch["target_probs"],
            batch["loss_mask"],
            beta=self.hparams.beta,
            kernel=self.hparams.loss_kernel,
            vocab_size=self.vocab_size,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The step's loss is the mean over the positions of every rank's batch, as one process with all of them.

        Each rank's loss is a mean over its own positions, and DDP/FSDP average gradients over ranks. Ranks hold
        different numbers of positions (a filler window has none, a corpus's last window fewer), so the plain
        average of rank means would weigh a rank's positions by 1 / its count and let a filler-only rank halve the
        step. One all-reduce of (positions, loss sums) gives the global count N; returning
        ``loss · n · world / N`` makes the averaged gradient that of the global mean, and the logged values are the
        global means, the same on every rank.
        """
        out = self._loss(batch)
        tokens = batch["loss_mask"].sum()
        sums = torch.stack([tokens.float(), *(value.detach() * tokens for value in out)])
        sums = self._sum_over_ranks(sums)
        count = sums[0].clamp(min=1)
        loss, kl, ce = sums[1:] / count
        step, starts, rank_loss = self.global_step, batch.get("start", torch.tensor([])), out.loss.detach()
        self.finite_check.record(  # the same verdict on every rank, so none is left waiting in an all-reduce
            loss,
            lambda: (
                f"non-finite training loss ({loss.item()}: kl={kl.item()}, ce={ce.item()}; this rank's "
                f"{rank_loss.item()}) at global step {step}, batch {batch_idx}, windows starting at corpus positions "
                f"{starts.tolist()}; lower the learning rate or check the targets there."
            ),
        )
        n = batch["input_ids"].shape[0]
        logged = {"train/loss": loss, "train/kl": kl, "train/ce": ce}
        if not self.trains_on_targets:
            del logged["train/kl"]
        self.log_dict(logged, prog_bar=True, batch_size=n)
        world = self.trainer.world_size if self._trainer is not None else 1
        return out.loss * (tokens * world / count)

    def on_fit_start(self) -> None:
        # on a GPU the loss is checked one step late, so the host never waits for a forward pass to finish
        self.finite_check = FiniteLossCheck(defer=self.device.type == "cuda")

    @property
    def trains_on_targets(self) -> bool:
        """False when the DataModule has no training targets (``data.train_targets: null``, CE alone): then there is
        no KL to log (its 0 would read as perfect imitation). Other data sources are taken to have them."""
        datamodule = getattr(self._trainer, "datamodule", None)
        return getattr(datamodule, "hparams", {}).get("train_targets", True) is not None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.finite_check.raise_pending()  # no checkpoint of weights a non-finite step has updated

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another decoder (another width, depth or vocabulary padding) is refused with the
        mismatching shapes and the fix, not load_state_dict's "size mismatch" traceback; a resumed fit with other
        training settings is refused too (:func:`check_resume_settings`)."""
        source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        check_checkpoint_fits(checkpoint.get("state_dict"), self.decoder_shapes(), source)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            check_resume_settings(checkpoint.get("hyper_parameters") or {}, dict(self.hparams))

    def decoder_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """``decoder.*`` state-dict names and shapes, as a checkpoint of this decoder holds them; None where the
        strategy loads the weights itself, before ``on_load_checkpoint`` (FSDP's sharded parameters)."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if self.decoder is None or isinstance(
            getattr(self._trainer, "strategy", None), (FSDPStrategy, ModelParallelStrategy)
        ):
            return None
        named = [
            *self.decoder.named_parameters(remove_duplicate=False),
            *self.decoder.named_buffers(remove_duplicate=False),
        ]
        return {f"decoder.{name}": tuple(tensor.shape) for name, tensor in named}

    def on_train_end(self) -> None:
        self.finite_check.raise_pending()  # the last step's, before the decoder is exported

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is None:  # called outside a Trainer (a test, a script): one process
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", prog_bar=False)

    def _evaluation_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        out = self._loss(batch)
        tokens = batch["loss_mask"].sum()
        if tokens > 0:  # token-weighted means, so ranks and batches of different sizes count what they hold
            self.eval_metrics[split]["ce"].update(out.ce, weight=tokens)
            self.eval_metrics[split]["kl"].update(out.kl, weight=tokens)
            self.eval_metrics[split]["loss"].update(out.loss, weight=tokens)
            self.eval_metrics[split]["target_entries"].update(batch["target_counts"].sum())

    def _log_evaluation(self, split: str, prog_bar: bool) -> None:
        metrics = self.eval_metrics[split]
        ce = metrics["ce"].compute()
        # the metrics are already reduced over ranks; sync_dist only averages equal values (and tells Lightning so)
        values = {f"{split}/loss": metrics["loss"].compute(), f"{split}/kl": metrics["kl"].compute(),
                  f"{split}/ce": ce, f"{split}/ppl": torch.exp(ce)}  # fmt: skip
        # every rank computes every metric (each compute is a collective); a split without kNN targets (`memdec test`
        # without data.test_targets) has no KL term: its "loss" would be (1 − β)·CE, neither the objective nor
        # comparable to val/loss, so only its ce and ppl are logged
        if metrics["target_entries"].compute() == 0:
            del values[f"{split}/kl"]
            if self.hparams.beta > 0:
                del values[f"{split}/loss"]
        self.log_dict(values, prog_bar=prog_bar, sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        groups = parameter_groups(self.decoder, h.weight_decay)
        trained = [p for group in groups for p in group["params"]]
        fused = h.fused_adamw if h.fused_adamw is not None else all(p.is_cuda for p in trained)
        optimizer = torch.optim.AdamW(groups, lr=h.learning_rate, betas=tuple(h.betas), fused=fused)
        data, trainer = self.trainer.datamodule, self.trainer
        total = data.stepping_batches() if isinstance(data, MemDecDataModule) else trainer.estimated_stepping_batches
        total = max(1, int(total))
        schedule = lr_lambda(total, warmup_steps(h.warmup_steps, total), h.lr_schedule, h.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_checkpoint_fits(state: dict | None, shapes: dict[str, tuple[int, ...]] | None, source: str) -> None:
    """Refuse a checkpoint whose decoder weights are not this decoder's: the shapes that differ (or the names only
    one side has) are named, with the fix."""
    if not state or shapes is None:
        return
    saved = {name: tuple(value.shape) for name, value in state.items() if name.startswith("decoder.")}
    differ = [
        f"{n}: checkpoint {list(saved[n])}, model {list(shapes[n])}"
        for n in saved
        if n in shapes and saved[n] != shapes[n]
    ]
    differ += [f"{n}: only in the checkpoint" for n in saved if n not in shapes]
    differ += [f"{n}: only in the model" for n in shapes if n not in saved and n.endswith(".weight")]
    if differ:
        shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ValueError(
            f"{source} holds a decoder of another shape than this run's model ({shown}): resume with the model "
            "settings the run was started with (model.model / model.config / model.pad_vocab_multiple), or start "
            "a new run in another --trainer.default_root_dir."
        )


def parameter_groups(decoder: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on the matrices (≥ 2 dims), none on biases and norms."""
    decay, no_decay = [], []
    for _, p in decoder.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(setting: float, total: int) -> int:
    """``model.warmup_steps``: below 1, a fraction of the run's ``total`` steps; from 1 on, a count of steps."""
    return int(setting * total) if setting < 1 else int(setting)


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float):
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine/linear/constant decay."""
    check_lr_schedule(schedule)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor


def check_lr_schedule(schedule: str) -> None:
    """A misspelled schedule would otherwise train with the linear one."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")
