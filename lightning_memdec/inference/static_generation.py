"""Fast decoding of base + Memory Decoder: static KV caches and one compiled step per token.

``InterpolatedLM.generate`` goes through ``generate()`` with two dynamic caches, eagerly: at batch 1 on a GPU a
step is a few hundred small kernel launches, so it is launch-bound, not bandwidth-bound (issue 20: 20 ms a token
where reading the weights takes 0.5 ms). Here both models write into transformers' ``StaticCache`` (fixed shapes,
fixed addresses), and the per-token step — both forwards and the log-space mixture — is one function that
``torch.compile`` turns into one graph; with ``mode="reduce-overhead"`` on CUDA that graph is replayed as a CUDA
graph. The prompt is prefilled eagerly (its length varies).

Scope, by design: greedy decoding and sampling (temperature, top-k, top-p, as transformers' warpers) at a fixed
λ, for prompts of one length (batch 1, or equal-length rows: no padding). Beam search, padded batches and a router
(whose skips are data-dependent) stay with ``InterpolatedLM.generate``. ``tests/test_static_generation.py`` checks
greedy and sampled tokens against ``generate()``, and that the step traces into one graph (``fullgraph=True``).
"""

from __future__ import annotations

import torch
from transformers import StaticCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lightning_memdec.hf.loading import cache_arg_name, check_fits_context, context_length, output_rows
from lightning_memdec.kernels.scoring import check_lmbda, mix_log_probs, vocab_log_probs

__all__ = ["StaticGenerator", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 2048  #: cache positions when max_length is not given (a 128k-context model would need GBs)


class StaticGenerator:
    """Greedy or sampled decoding of ``base`` (+ ``memdec`` at ``lmbda``) with static caches and a compiled step.

    Args:
        base: the base causal LM (a loaded ``PreTrainedModel``).
        memdec: the Memory Decoder, or None for the base alone (the same machinery: a fair baseline).
        lmbda: the decoder's weight in the mixture.
        max_length: prompt + new tokens the caches hold (default: the smaller context of the two models, at most
            :data:`DEFAULT_MAX_LENGTH`).
        vocab_size: the shared ids the mixture covers (default: the smaller head of the two models).
        compile: compile the per-token step (default: on CUDA only; on CPU compiling costs more than it saves).
        backend, mode, fullgraph: passed to ``torch.compile`` (default mode: ``reduce-overhead`` on CUDA, the CUDA
            graph replay that removes the launch overhead).
    """

    def __init__(
        self,
        base,
        memdec=None,
        lmbda: float = 0.0,
        max_length: int | None = None,
        vocab_size: int | None = None,
        compile: bool | None = None,
        backend: str = "inductor",
        mode: str | None = None,
        fullgraph: bool = True,
    ):
        self.models = [m.eval() for m in (base, memdec) if m is not None]
        self.lmbda = check_lmbda(lmbda)
        contexts = [c for c in (context_length(m) for m in self.models) if c is not None]
        self.max_length = int(max_length or min([*contexts, DEFAULT_MAX_LENGTH]))
        self.vocab_size = int(vocab_size or min(output_rows(m) for m in self.models))
        self.device = base.device
        self._cache_args = [cache_arg_name(m) for m in self.models]
        self._caches: list[StaticCache] | None = None
        self._batch = None
        if compile is None:
            compile = self.device.type == "cuda"
        if mode is None and self.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        # the per-token step (one token [B, 1] at one position [1] -> log-probs [B, V]) is the compiled part;
        # the prompt's forward runs eagerly through the same _log_probs
        step = torch.compile(self._log_probs, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False)
        self._compiled_step = step if compile else self._log_probs

    @classmethod
    def from_interpolated(cls, lm, **kwargs) -> StaticGenerator:
        """The same mixture as an ``InterpolatedLM`` (its models, λ and shared vocabulary); fixed λ only."""
        if getattr(lm, "router", None) is not None:
            raise ValueError(
                "StaticGenerator decodes at a fixed λ; a router skips the decoder at data-dependent steps: generate "
                "with InterpolatedLM.generate instead."
            )
        return cls(lm.base, lm.memdec, lm.lmbda, vocab_size=lm.config.vocab_size, **kwargs)

    # -- one forward ---------------------------------------------------------------------------------------------

    def _log_probs(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs ``[B, V]`` (float32) of the mixture after ``ids`` ``[B, T]`` at cache ``positions``
        ``[T]``, each model writing its keys and values into its static cache."""
        log_probs = []
        for model, cache, arg in zip(self.models, self._caches, self._cache_args):
            out = model(input_ids=ids, cache_position=positions, use_cache=True, **{arg: cache})
            log_probs.append(vocab_log_probs(out.logits[:, -1], self.vocab_size))  # [B, V]
        if len(log_probs) == 1:
            return log_probs[0]
        return mix_log_probs(log_probs[0], log_probs[1].to(log_probs[0].device), self.lmbda)

    def _ready_caches(self, batch: int) -> None:
        """Static caches for ``batch`` rows, reused (same tensors, so a captured CUDA graph stays valid) and
        zeroed while the batch size is unchanged."""
        if self._caches is not None and self._batch == batch:
            for cache in self._caches:
                cache.reset()
            return
        self._caches = [StaticCache(config=m.config, max_cache_len=self.max_length) for m in self.models]
        self._batch = batch

    # -- decoding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` + up to ``max_new_tokens`` tokens ``[B, T + n]``, as ``generate()`` returns them:
        rows that reached EOS are padded with ``pad_token_id`` until every row has, then decoding stops."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = list(input_ids.shape)
            raise ValueError(f"input_ids must be [batch, prompt length ≥ 1] token ids, got shape {shape}.")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
        batch, prompt = input_ids.shape
        total = prompt + max_new_tokens
        if total > self.max_length:
            raise ValueError(
                f"prompt + max_new_tokens = {total} exceeds the static caches' {self.max_length} positions; "
                "build the StaticGenerator with a larger max_length (within the models' context)."
            )
        for model in self.models:
            check_fits_context(total, model, model.name_or_path or type(model).__name__, "prompt + max_new_tokens")
        eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=self.device).reshape(-1)
        if eos.numel() and pad_token_id is None:
            raise ValueError("pass pad_token_id with eos_token_id: finished rows are padded with it.")
        warpers = _warpers(temperature, top_k, top_p) if do_sample else None
        self._ready_caches(batch)
        ids = input_ids.to(self.device)
        log_probs = self._log_probs(ids, torch.arange(prompt, device=self.device))  # the prompt, eagerly
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = _next_token(ids, log_probs, warpers)  # [B]
            if eos.numel():
                token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
                unfinished &= ~torch.isin(token, eos)
            ids = torch.cat([ids, token[:, None]], 1)
            if step == max_new_tokens - 1 or (eos.numel() and not bool(unfinished.any())):
                break
            _mark_cudagraph_step()
            position = torch.tensor([prompt + step], device=self.device)
            log_probs = self._compiled_step(token[:, None], position).clone()  # a replayed graph reuses its output
        return ids


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> list:
    """transformers' sampling warpers, in generate()'s order (temperature, top-k, top-p)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}; use do_sample=False.")
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _next_token(ids: torch.Tensor, log_probs: torch.Tensor, warpers: list | None) -> torch.Tensor:
    """Greedy (no warpers given and not sampling) or sampled next token ``[B]`` from log-probs ``[B, V]``."""
    if warpers is None:
        return log_probs.argmax(-1)
    scores = log_probs.float()
    for warp in warpers:
        scores = warp(ids, scores)
    return torch.multinomial(torch.softmax(scores, -1), num_samples=1)[:, 0]


def _mark_cudagraph_step() -> None:
    """Tell torch.compile's CUDA-graph trees a new step begins (the previous outputs may be overwritten)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()
