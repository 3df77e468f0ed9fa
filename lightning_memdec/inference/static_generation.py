"""Fast decoding of base + Memory Decoder: static KV caches and one compiled step per token.

``InterpolatedLM.generate`` goes through ``generate()`` with two dynamic caches, eagerly: at batch 1 on a GPU a
step is a few hundred small kernel launches, so it is launch-bound, not bandwidth-bound (issue 20: 20 ms a token
where reading the weights takes 0.5 ms). Here both models write into transformers' ``StaticCache`` (fixed shapes,
fixed addresses), and the per-token step — both forwards and the log-space mixture — is one function that
``torch.compile`` turns into one graph; with ``mode="reduce-overhead"`` on CUDA that graph is replayed as a CUDA
graph. The prompt is prefilled eagerly (its length varies).

Scope, by design: greedy decoding, sampling (temperature, top-k, top-p, as transformers' warpers) and beam search
(``generate()``'s rules, :mod:`~lightning_memdec.inference.beam_search`) at a fixed λ, for equal-length or
left-padded prompts (``attention_mask``: the mask stays one fixed-shape tensor, positions count real tokens), with
``stopping_criteria`` and a ``streamer`` as ``generate()`` takes them. Beam search reorders the static caches in
place, inside the compiled step, so their addresses (and a captured graph) stay valid. Beam sampling, other logits
processors and a router (whose skips are data-dependent) stay with ``InterpolatedLM.generate``.
``tests/test_static_generation.py`` checks greedy, sampled and beam tokens against ``generate()``, padded or not,
and that the steps trace into one graph (``fullgraph=True``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from transformers import GenerationConfig, StaticCache, StoppingCriteriaList
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
from transformers.generation.streamers import BaseStreamer

from lightning_memdec.hf.loading import (
    cache_arg_name,
    check_fits_context,
    check_token_ids,
    context_length,
    find_tokenizer,
    output_rows,
)
from lightning_memdec.inference.beam_search import beam_search
from lightning_memdec.inference.captured_step import CapturedStep
from lightning_memdec.inference.decoding_settings import decoding_settings, next_token, positive_count, sampling_warpers
from lightning_memdec.inference.interpolated_lm import mixture_vocab
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.overlapped_step import OverlappedStep
from lightning_memdec.kernels.scoring import check_lmbda, mix_log_probs, vocab_log_probs

__all__ = ["StaticGenerator", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 2048  #: cache positions when max_length is not given (a 128k-context model would need GBs)


class StaticGenerator:
    """Greedy, sampled or beam decoding of ``base`` (+ ``memdec`` at ``lmbda``) with static caches, compiled steps.

    Args:
        base: the base causal LM (a loaded ``PreTrainedModel``).
        memdec: the Memory Decoder, or None for the base alone (the same machinery: a fair baseline).
        lmbda: the decoder's weight in the mixture.
        max_length: prompt + new tokens the caches hold (default: the smaller context of the two models, at most
            :data:`DEFAULT_MAX_LENGTH`; at most that context).
        vocab_size: the shared ids the mixture covers (default: the tokenizer's size, the pair checked as
            ``InterpolatedLM`` checks it: the tokenizers found next to the models must be the same).
        compile: compile the per-token step (default: on CUDA only; on CPU compiling costs more than it saves),
            as one graph (``fullgraph=True``: a graph break would split the CUDA-graph replay).
        backend, mode: passed to ``torch.compile`` (default mode: ``reduce-overhead`` on CUDA, the CUDA graph replay
            that removes the launch overhead).
        batch_rows: decode every greedy or sampled batch of up to this many prompts as this many rows (the extra
            rows are dropped from the output), so that one compiled graph serves them all, as a server wants;
            default: each batch size compiles its own.
        overlap: run the decoder's forward on a second CUDA stream beside the base's, both captured in one CUDA
            graph (:class:`~lightning_memdec.inference.overlapped_step.OverlappedStep`; each forward compiled
            alone); greedy and sampled decoding (beam search keeps the one-stream step). Not yet measured on a GPU.
        retrieval: a kNN-LM (:class:`~lightning_memdec.inference.knnlm.KNNLM`, see :meth:`from_knnlm`) mixed in at
            ``lmbda`` instead of a decoder: each step captures the base's key at its key layer and adds p_kNN of its
            neighbours, so kNN-LM decodes on the same static, compiled base as the Memory Decoder. With exact search
            (keys resident on the base's device, no host synchronisation) the whole step, search included, is one
            replayed CUDA graph (:class:`~lightning_memdec.inference.captured_step.CapturedStep`; the base's
            forward compiled alone); a FAISS or cuVS search runs after the base's forward each step. Greedy and
            sampled decoding.

    Unset settings of :meth:`generate` come from the base's ``generation_config`` (``from_interpolated``: the
    mixture's), then ``generate()``'s defaults, as in ``generate()``.
    """

    def __init__(
        self,
        base,
        memdec=None,
        lmbda: float = 0.0,
        max_length: int | None = None,
        vocab_size: int | None = None,
        compile: bool | None = None,
        backend: str | Callable = "inductor",
        mode: str | None = None,
        batch_rows: int | None = None,
        overlap: bool = False,
        retrieval=None,
    ):
        self.models = [m.eval() for m in (base, memdec) if m is not None]
        if overlap and (memdec is None or memdec.device != base.device):
            raise ValueError(
                "overlap runs the decoder's forward beside the base's: give a memdec on the base's device."
            )
        if retrieval is not None and (memdec is not None or retrieval.base is not base):
            raise ValueError("retrieval mixes a kNN-LM's p_kNN into its own base: give its base and no memdec.")
        self.retrieval = retrieval
        self.lmbda = check_lmbda(lmbda)
        contexts = [c for c in (context_length(m) for m in self.models) if c is not None]
        if max_length is None:
            self.max_length = min([*contexts, DEFAULT_MAX_LENGTH])
        else:
            self.max_length = positive_count(max_length, "max_length")
            if contexts and self.max_length > min(contexts):
                raise ValueError(
                    f"max_length={self.max_length} exceeds the models' context of {min(contexts)} positions; the "
                    "static caches need not hold more than the models can attend to."
                )
        if vocab_size is None:
            vocab_size = output_rows(base) if memdec is None else _shared_vocab(base, memdec)
        self.vocab_size = int(vocab_size)
        self.device = base.device
        self.generation_config = copy.deepcopy(base.generation_config)
        if batch_rows is not None and batch_rows < 1:
            raise ValueError(f"batch_rows must be ≥ 1 (or None), got {batch_rows}.")
        self.batch_rows = batch_rows
        self._cache_args = [cache_arg_name(m) for m in self.models]
        self._caches: list[StaticCache] | None = None
        self._batch = None
        if compile is None:
            compile = self.device.type == "cuda"
        if mode is None and self.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        self._build_steps(compile, backend, mode, overlap)

    def _build_steps(self, compile: bool, backend, mode: str | None, overlap: bool) -> None:
        """The per-token steps (one token [B, 1] at one position [1] -> log-probs [B, V]), compiled as one graph
        each; the prompt's forward runs eagerly through the same :meth:`_log_probs`. Steps captured here as a CUDA
        graph (overlap, exact retrieval) compile each forward alone, without compile's own CUDA graphs."""

        def compiled(fn):
            return torch.compile(fn, backend=backend, mode=mode, fullgraph=True, dynamic=False) if compile else fn

        def alone(fn):
            no_graphs = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
            return torch.compile(fn, backend=backend, mode=no_graphs, fullgraph=True, dynamic=False) if compile else fn

        self._compiled_step = compiled(self._log_probs)
        self._compiled_beam_step = compiled(self._reordered_log_probs)  # compiled on first use only
        if overlap:
            first, second = (alone(functools.partial(self._model_log_probs, i)) for i in range(2))
            combine = functools.partial(mix_log_probs, lmbda=self.lmbda)
            self._compiled_step = OverlappedStep(first, second, combine, self.device, self._write_counters)
        if self.retrieval is not None:  # the search is no traceable graph: the base's forward compiled alone
            step = functools.partial(self._retrieved_log_probs, alone(functools.partial(self._model_log_probs, 0)))
            # a graph holds device work only: exact search over keys resident on the base's device, not a search
            # streaming keys from the host, nor FAISS's on the host
            capturable = self.retrieval.search == "exact" and self.retrieval.place_keys(self.device)
            self._compiled_step = CapturedStep(step, self.device, self._write_counters) if capturable else step

    @classmethod
    def from_interpolated(cls, lm, **kwargs) -> StaticGenerator:
        """The same mixture as an ``InterpolatedLM`` (its models, λ and shared vocabulary); fixed λ only."""
        if getattr(lm, "router", None) is not None:
            raise ValueError(
                "StaticGenerator decodes at a fixed λ; a router skips the decoder at data-dependent steps: generate "
                "with InterpolatedLM.generate instead."
            )
        generator = cls(lm.base, lm.memdec, lm.lmbda, vocab_size=lm.config.vocab_size, **kwargs)
        generator.generation_config = copy.deepcopy(lm.generation_config)  # its pad and EOS ids, as generate() uses
        return generator

    @classmethod
    def from_knnlm(cls, knnlm, **kwargs) -> StaticGenerator:
        """kNN-LM decoding (a :class:`~lightning_memdec.inference.knnlm.KNNLM`: its base, datastore, k, T and λ) with
        a static cache for the base and, with exact search, the whole step replayed as one CUDA graph: kNN-LM's
        fastest decoding, on the same machinery as base + MemDec's (``retrieval`` above); fixed λ only."""
        if not isinstance(knnlm, KNNLM):
            raise TypeError(
                f"from_knnlm takes a KNNLM, got {type(knnlm).__name__}; an InterpolatedLM goes to from_interpolated."
            )
        if kwargs.get("overlap"):
            raise ValueError("overlap runs a Memory Decoder beside the base; a kNN-LM has none: leave overlap off.")
        return cls(knnlm.base, None, knnlm.lmbda, vocab_size=knnlm.vocab, retrieval=knnlm, **kwargs)

    def warm_up(self) -> None:
        """Compile (and on CUDA capture) the per-token step now, by decoding two tokens after a one-token prompt,
        so that the first real request does not wait for it (with ``batch_rows`` one graph serves every batch)."""
        prompt = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.generate(prompt, min(2, self.max_length - 1), eos_token_id=None, do_sample=False, num_beams=1)

    # -- one forward ---------------------------------------------------------------------------------------------

    def _log_probs(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Next-token log-probs ``[B, V]`` (float32) of the mixture after ``ids`` ``[B, T]`` at cache ``positions``
        ``[T]``, each model writing its keys and values into its static cache. ``mask`` ``[B, max_length]``: 0 on
        left padding, else 1 (None: no padding); positions then count real tokens only, as ``generate()`` does."""
        if self.retrieval is not None:
            return self._retrieved_log_probs(functools.partial(self._model_log_probs, 0), ids, positions, mask)
        log_probs = [self._model_log_probs(i, ids, positions, mask) for i in range(len(self.models))]
        if len(log_probs) == 1:
            return log_probs[0]
        return mix_log_probs(log_probs[0], log_probs[1].to(log_probs[0].device), self.lmbda)

    def _model_log_probs(self, index: int, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        """Model ``index``'s (0: the base, 1: the decoder) next-token log-probs ``[B, V]``, as :meth:`_log_probs`."""
        padding = {}
        if mask is not None:
            pads = mask.shape[1] - mask.sum(-1, keepdim=True)  # [B, 1]: every 0 is left padding
            padding = {"attention_mask": mask, "position_ids": (positions[None, :] - pads).clamp(min=0)}  # [B, T]
        model, cache, arg = self.models[index], self._caches[index], self._cache_args[index]
        out = model(input_ids=ids, cache_position=positions, use_cache=True, **padding, **{arg: cache})
        return vocab_log_probs(out.logits[:, -1], self.vocab_size)  # [B, V]

    def _retrieved_log_probs(self, forward, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
        """The base's next-token log-probs (``forward``: :meth:`_model_log_probs` of the base, maybe compiled) mixed
        with the kNN-LM's p_kNN of the base's key at the last position, ``[B, V]``."""
        with self.retrieval.capture.capturing() as cap:
            base = forward(ids, positions, mask)
        knn = self.retrieval.knn_log_probs(cap.value[:, -1])  # [B, d] keys -> [B, V]
        return mix_log_probs(base, knn.to(base.device), self.lmbda)

    def _write_counters(self) -> list[torch.Tensor]:
        """The static caches' per-layer counts of written positions (tensors each step advances in place). Only
        full-attention layers: a sliding-window layer also counts in a Python int, which a replayed graph cannot
        advance."""
        layers = [layer for cache in self._caches for layer in cache.layers]
        if any(type(layer) is not StaticLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers} - {"StaticLayer"})
            raise ValueError(
                f"a captured step (overlap, or a kNN-LM's exact search) replays full-attention static caches only, "
                f"not {kinds}: use overlap=False, or a kNN-LM over a FAISS index."
            )
        return [layer.cumulative_length for layer in layers]

    def _reordered_log_probs(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, parents: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_log_probs` after cache row ``r`` takes row ``parents[r]``'s states (``parents`` ``[B·K]``: the
        beams each new beam extends), copied in place so the caches keep their addresses."""
        for cache in self._caches:
            for layer in cache.layers:
                layer.keys.copy_(layer.keys.index_select(0, parents))  # [B·K, heads, positions, head dim]
                layer.values.copy_(layer.values.index_select(0, parents))
        return self._log_probs(ids, positions, mask)

    def _ready_caches(self, batch: int) -> None:
        """Static caches for ``batch`` rows, reused (same tensors, so a captured CUDA graph stays valid) and
        zeroed while the batch size is unchanged."""
        if self._caches is not None and self._batch == batch:
            for cache in self._caches:
                cache.reset()
            return
        self._caches = [StaticCache(config=m.config, max_cache_len=self.max_length) for m in self.models]
        self._batch = batch
        if isinstance(self._compiled_step, CapturedStep):  # its graphs write the replaced caches
            self._compiled_step.forget()

    # -- decoding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        generation_config: GenerationConfig | None = None,
        attention_mask: torch.Tensor | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        **fields,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` + up to ``max_new_tokens`` tokens ``[B, T + n]``, as ``generate()`` returns them.

        Settings come as in ``generate()``: a ``GenerationConfig`` and/or its fields as keywords (these win):
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``num_beams``, ``length_penalty``, ``early_stopping``,
        ``eos_token_id``, ``pad_token_id``; and ``attention_mask`` (0 on left padding), ``stopping_criteria``
        (each row stops where one says so) and a ``streamer`` (given the prompt, then each step's tokens), as
        there. Rows that reached EOS are padded with ``pad_token_id`` until every row has stopped, then decoding
        stops; with ``num_beams`` > 1 each row's best beam is returned. The length is ``max_new_tokens``'s: a
        config's ``max_length`` / ``max_new_tokens`` give way to it, as to an explicit one in ``generate()``.
        """
        config = decoding_settings(self.generation_config, fields, requested=generation_config)
        check_token_ids(input_ids, self.vocab_size)
        max_new_tokens = positive_count(max_new_tokens, "max_new_tokens")
        do_sample, num_beams = config.do_sample, config.num_beams
        self._check_beams(num_beams, do_sample, streamer, stopping_criteria)
        prompt = input_ids.shape[1]
        total = prompt + max_new_tokens
        if total > self.max_length:
            raise ValueError(
                f"prompt + max_new_tokens = {total} exceeds the static caches' {self.max_length} positions; "
                "build the StaticGenerator with a larger max_length (within the models' context)."
            )
        for model in self.models:
            check_fits_context(total, model, model.name_or_path or type(model).__name__, "prompt + max_new_tokens")
        eos = torch.as_tensor([] if config.eos_token_id is None else config.eos_token_id, device=self.device)
        eos = eos.reshape(-1)
        if eos.numel() and config.pad_token_id is None:
            config.pad_token_id = int(eos[0])  # as generate() pads finished rows
        warpers = sampling_warpers(config) if do_sample else None
        batch, rows = len(input_ids), len(input_ids) * num_beams
        if num_beams == 1 and self.batch_rows is not None:
            if batch > self.batch_rows:
                raise ValueError(f"{batch} prompts exceed the generator's batch_rows={self.batch_rows}.")
            rows = self.batch_rows
        mask = self._padding_mask(input_ids, attention_mask, num_beams, rows)  # [rows, max_length] or None
        ids = input_ids.to(self.device).repeat_interleave(num_beams, 0)  # [B·K, T]
        ids = torch.cat([ids, ids[:1].expand(rows - len(ids), -1)])  # [rows, T]: spare rows repeat the first
        self._ready_caches(len(ids))
        if num_beams > 1:
            self._check_reorderable()
        log_probs = self._log_probs(ids, torch.arange(prompt, device=self.device), mask)  # the prompt, eagerly
        if num_beams > 1:
            step = functools.partial(self._beam_step, mask=mask)
            return beam_search(input_ids.to(self.device), log_probs, step, num_beams, max_new_tokens, eos,
                               config.pad_token_id, config.length_penalty, config.early_stopping)  # fmt: skip
        if stopping_criteria is not None and not isinstance(stopping_criteria, StoppingCriteriaList):
            stopping_criteria = StoppingCriteriaList(stopping_criteria)  # generate() takes a plain list too
        stops = _Stops(eos, config.pad_token_id, stopping_criteria, batch, rows, self.device)
        if streamer is not None:
            streamer.put(ids[:batch].cpu())
        for step in range(max_new_tokens):
            token = next_token(ids[:batch], log_probs[:batch], warpers)  # [B]: spare rows draw no random numbers
            token = stops.pad_finished(torch.cat([token, token[:1].expand(rows - batch)]))  # [rows], spares as row 0
            ids = torch.cat([ids, token[:, None]], 1)
            if streamer is not None:
                streamer.put(token[:batch].cpu())
            if stops.all_stopped(ids, log_probs) or step == max_new_tokens - 1:  # the criteria see every token
                break
            _mark_cudagraph_step()
            position = torch.tensor([prompt + step], device=self.device)
            log_probs = self._compiled_step(token[:, None], position, mask).clone()  # a replayed graph reuses it
        if streamer is not None:
            streamer.end()
        return ids[:batch]

    def _check_beams(self, num_beams: int, do_sample: bool, streamer, stopping_criteria) -> None:
        """Beam search here neither samples, streams nor stops on criteria, and decodes no kNN-LM."""
        if num_beams < 1 or (num_beams > 1 and (do_sample or streamer is not None or stopping_criteria)):
            raise ValueError(
                f"num_beams must be ≥ 1, and beam search here neither samples, streams nor takes stopping_criteria "
                f"(got num_beams={num_beams}, do_sample={do_sample}): use InterpolatedLM.generate for those."
            )
        if num_beams > 1 and self.retrieval is not None:
            raise ValueError(
                f"a kNN-LM decodes greedily or by sampling here, not by beam search (num_beams={num_beams})."
            )

    def _padding_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, beams: int, rows: int):
        """``attention_mask`` ``[B, T]`` widened to the caches' ``[rows, max_length]`` (each row K times for beams,
        spare rows as the first; 1 past the prompt: later positions are masked by causality), or None when
        nothing is padded and ``batch_rows`` is unset (with it, always a mask: one graph). Only left padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            shape, want = list(attention_mask.shape), list(input_ids.shape)
            raise ValueError(f"attention_mask must have input_ids' shape {want}, got {shape}.")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (left padding) and 1 (tokens) only.")
        if bool(attention_mask.all()) and self.batch_rows is None:
            return None
        mask = attention_mask.to(self.device, torch.long)
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be 0 on left padding and 1 on every token after it (no gaps).")
        if not bool(mask[:, -1].all()):
            raise ValueError("attention_mask has a row of padding only: every row needs a prompt token.")
        wide = torch.ones(len(mask), self.max_length, dtype=torch.long, device=self.device)
        wide[:, : mask.shape[1]] = mask
        wide = wide.repeat_interleave(beams, 0)
        return torch.cat([wide, wide[:1].expand(rows - len(wide), -1)])

    def _beam_step(self, tokens: torch.Tensor, position: int, parents: torch.Tensor, mask) -> torch.Tensor:
        """beam_search's step: the caches reordered to ``parents`` and the next log-probs, in one compiled call."""
        _mark_cudagraph_step()
        positions = torch.tensor([position], device=self.device)
        return self._compiled_beam_step(tokens, positions, mask, parents).clone()  # a replayed graph reuses it

    def _check_reorderable(self) -> None:
        """Beam search reorders keys and values in place: refuse cache layers holding other per-row state."""
        for cache in self._caches:
            for layer in cache.layers:
                if type(layer) not in (StaticLayer, StaticSlidingWindowLayer):
                    raise ValueError(
                        f"StaticGenerator's beam search reorders attention caches only; this model's cache has a "
                        f"{type(layer).__name__}: use InterpolatedLM.generate(num_beams=...)."
                    )


class _Stops:
    """Which rows still run, by ``generate()``'s rules: a row stops at an EOS id or where ``stopping_criteria``
    says; once stopped, its tokens become ``pad_token_id`` when EOS ids are given (else, as there, it goes on).
    Rows past the ``batch`` prompts (``batch_rows``' spares) never count as running."""

    def __init__(self, eos: torch.Tensor, pad_token_id: int | None, criteria, batch: int, rows: int, device):
        self.eos, self.pad_token_id, self.criteria, self.batch = eos, pad_token_id, criteria, batch
        self.running = torch.arange(rows, device=device) < batch  # [rows]

    def pad_finished(self, token: torch.Tensor) -> torch.Tensor:
        if not self.eos.numel():
            return token
        return torch.where(self.running, token, torch.full_like(token, self.pad_token_id))

    def all_stopped(self, ids: torch.Tensor, scores: torch.Tensor) -> bool:
        """Update with the tokens just chosen (the last column of ``ids``); True once no row runs."""
        if not self.eos.numel() and not self.criteria:  # nothing can stop a row
            return False
        if self.eos.numel():
            self.running &= ~torch.isin(ids[:, -1], self.eos)
        if self.criteria:
            self.running[: self.batch] &= ~self.criteria(ids[: self.batch], scores[: self.batch]).to(
                self.running.device
            )
        return not bool(self.running.any())


def _shared_vocab(base, memdec) -> int:
    """The ids ``base`` and ``memdec`` can be mixed over, checked as ``InterpolatedLM`` checks a pair (the
    tokenizers found next to the models must be the same one)."""
    tokenizers = find_tokenizer(base, base), find_tokenizer(memdec, memdec)
    try:
        return mixture_vocab(base, memdec, *tokenizers)
    except ValueError as err:
        where = "" if any(t is not None for t in tokenizers) else (
            " (here: as InterpolatedLM(base, memdec, lmbda, tokenizer=...), then StaticGenerator.from_interpolated)"
        )  # fmt: skip
        raise ValueError(f"StaticGenerator(base, memdec): {err}{where}") from None


def _mark_cudagraph_step() -> None:
    """Tell torch.compile's CUDA-graph trees a new step begins (the previous outputs may be overwritten)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()
