"""Training throughput (tokens/s) and model FLOPs utilisation of the steady state, as a Lightning callback.

Why not Lightning's ``ThroughputMonitor``: it synchronises the device after every batch (which hides the overlap of
the loader and the next step's launch that a real run has) and its table of peaks gives the H200's sparse bf16 figure.
Here the device is synchronised only where a timed span starts and ends, the first optimizer steps (torch.compile's
compilation, the allocator's growth, the loader's start) are left out, and the peak is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch

__all__ = ["TrainingThroughput", "forward_flops_per_token", "model_params", "training_flops_per_token"]


def forward_flops_per_token(params: int, layers: int, context: int, width: int) -> float:
    """Forward FLOPs a token, as the PaLM paper's MFU counts them: 2 per weight, plus attention's 4·L·T·d (scores and
    their weighted sum over a context of T)."""
    return 2 * params + 4 * layers * context * width


def training_flops_per_token(params: int, layers: int, context: int, width: int) -> float:
    """Forward and backward: 3 × the forward's (the backward costs two forwards), PaLM's 6N + 12·L·T·d."""
    return 3 * forward_flops_per_token(params, layers, context, width)


def model_params(model: torch.nn.Module, vocab_size: int | None = None) -> int:
    """The parameters model FLOPs count: all but the rows an embedding or LM head holds past ``vocab_size``
    (``pad_vocab_multiple``'s padding: computed, but no token of the tokenizer uses them)."""
    params = sum(p.numel() for p in model.parameters())
    if vocab_size is None:
        return params
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    weights = {id(layer.weight): layer.weight for layer in layers if layer is not None}  # a tied pair counts once
    return params - sum((w.shape[0] - vocab_size) * w.shape[1] for w in weights.values() if w.shape[0] > vocab_size)


class TrainingThroughput(L.Callback):
    """Logs ``train/tokens_per_s`` (this device's) and, given ``peak_flops``, ``train/mfu`` every
    ``log_every_n_steps`` optimizer steps after ``warmup_steps``; at the end of fit :attr:`tokens_per_s` and
    :attr:`mfu` hold the whole steady state's figures (None if no step was timed).

    Tokens are the batches' ``input_ids`` elements (a batch's masked filler windows, ``start`` −1, left out: they
    are computed but train nothing), loader time included (a loader that cannot keep up shows), the validation
    loops inside fit left out (their time is not training's; a checkpoint written at a batch's end stays in).
    FLOPs a token (:attr:`flops_per_token`): :func:`training_flops_per_token` from the decoder's parameters
    (:func:`model_params`: a padded vocabulary's extra rows left out), config and the batch's sequence length.

    Args:
        warmup_steps: optimizer steps not timed (≥ 1: the first step's end is where timing can start).
        log_every_n_steps: steps per logged span (default: the Trainer's ``log_every_n_steps``).
        peak_flops: the device's dense peak FLOP/s in the training precision (e.g. 989e12 for bf16 on an H100/H200).
        params: the decoder's parameter count (default: counted on this rank, which under FSDP holds a shard only).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        log_every_n_steps: int | None = None,
        peak_flops: float | None = None,
        params: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if warmup_steps < 1 or (log_every_n_steps is not None and log_every_n_steps < 1):
            raise ValueError(
                f"warmup_steps and log_every_n_steps must be ≥ 1, got {warmup_steps} and {log_every_n_steps}."
            )
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be positive (FLOP/s), got {peak_flops}.")
        self.warmup_steps, self.every, self.peak_flops, self.clock = warmup_steps, log_every_n_steps, peak_flops, clock
        self.params = params
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None
        self.logged: dict[str, float] = {}  # the last span's figures, as logged
        self._start = self._span_start = None
        self._tokens = self._span_tokens = 0
        self.flops_per_token: float | None = None  # model FLOPs a trained token, from the first timed batch
        self._logged_step = self._first_step = 0
        self._paused_at: float | None = None

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # queued work belongs to the span it was launched in
        return self.clock()

    def _flops(self, pl_module: L.LightningModule, context: int) -> float:
        model = getattr(pl_module, "decoder", pl_module)
        config = model.config
        params = self.params or model_params(model, getattr(pl_module, "vocab_size", None))
        return training_flops_per_token(params, config.num_hidden_layers, context, config.hidden_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens_per_s = self.mfu = self._start = self._span_start = None
        self._tokens = self._span_tokens = 0
        self._first_step = trainer.global_step  # a resumed run warms up (compiles) again: count from its start

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and not trainer.sanity_checking:
            self._paused_at = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is not None:  # the timed spans resume where they were: shifted by the validation's time
            paused = self._now(pl_module) - self._paused_at
            self._start, self._span_start, self._paused_at = self._start + paused, self._span_start + paused, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._start is None:
            if step - self._first_step >= self.warmup_steps:  # timed from after this batch: the steady state
                self._start = self._span_start = self._now(pl_module)
                self._logged_step = step
            return
        ids = batch["input_ids"]
        # a device count where fillers may be (no host sync here); read where the span ends, after a sync
        tokens = ids.shape[-1] * (batch["start"] >= 0).sum() if "start" in batch else ids.numel()
        self._tokens += tokens
        self._span_tokens += tokens
        if self.flops_per_token is None:
            self.flops_per_token = self._flops(pl_module, ids.shape[-1])
        every = self.every or trainer.log_every_n_steps
        if step - self._logged_step >= every:
            now = self._now(pl_module)
            rate = float(self._span_tokens) / (now - self._span_start)
            self.logged = {"train/tokens_per_s": rate}
            if self.peak_flops is not None:
                self.logged["train/mfu"] = rate * self.flops_per_token / self.peak_flops
            # to the loggers, at the span's end only: pl_module.log's on-step value would be logged again at every
            # trainer logging step until the next span (with log_every_n_steps above the trainer's); on the x-axis
            # of this batch's own scalars (train/loss), the batches stepped before it, as Lightning's
            # LearningRateMonitor logs (global_step is one more here, past the run's last step at its end)
            for logger in trainer.loggers:
                logger.log_metrics(self.logged, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
            self._span_start, self._span_tokens, self._logged_step = now, 0, step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._tokens == 0:
            return
        self.tokens_per_s = float(self._tokens) / (self._now(pl_module) - self._start)
        if self.peak_flops is not None:
            self.mfu = self.tokens_per_s * self.flops_per_token / self.peak_flops
