"""Plug-and-play inference: mix a base LM with a Memory Decoder, no retrieval at inference time.

The Memory Decoder was trained to imitate a kNN-LM distribution, so at inference it takes the datastore's
place in the kNN-LM mixture (Cao et al., 2025):

    p(y | x) = (1 - λ) · p_base(y | x) + λ · p_mem(y | x)

computed in log space. :class:`InterpolatedLM` is a Hugging Face ``PreTrainedModel`` + ``GenerationMixin``
whose ``logits`` are these mixed log-probabilities, so ``generate()`` (greedy, sampling, beam search) works
unchanged: ``log_softmax`` of a log-distribution is the identity. Each model keeps its own KV cache inside a
:class:`PairCache`, which beam search reorders as one. This module deliberately does not import Lightning.

The paper's kNN-LM baseline (the same mixture with live retrieval in place of the decoder) is
:class:`lightning_memdec.inference.knnlm.KNNLM`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lightning_memdec.hf.loading import (
    cache_arg_name,
    causal_lm,
    check_fits_context,
    check_token_ids,
    context_length,
    find_tokenizer,
    forward_params,
    output_rows,
    position_ids_from_mask,
    tokenizer_name,
)
from lightning_memdec.hf.paired_generation import PairCache, PairCacheGeneration
from lightning_memdec.inference.router import Router
from lightning_memdec.inference.router_artifact import load_router
from lightning_memdec.io.tokenizer_identity import check_head_covers_vocab, check_same_tokenizer, tokenizer_info
from lightning_memdec.kernels.scoring import check_lmbda, mix_log_probs, vocab_log_probs

__all__ = ["InterpolatedLM", "InterpolatedLMConfig", "PairCache", "mixture_vocab"]


class InterpolatedLMConfig(PreTrainedConfig):
    """Enough of a config for ``generate()``; the real architectures live in ``base.config`` / ``memdec.config``."""

    model_type = "memdec_interpolated"

    vocab_size: int = 0
    lmbda: float = 0.0
    base_name_or_path: str | None = None
    memdec_name_or_path: str | None = None
    max_position_embeddings: int | None = None  # the shorter context: generate()'s default length stops there


class InterpolatedLM(PairCacheGeneration, PreTrainedModel, GenerationMixin):
    """A base causal LM mixed with a Memory Decoder that shares its tokenizer: ``logits`` are mixed log-probs.

    Args:
        base: the (large) base LM, a ``PreTrainedModel`` or a name/path for ``AutoModelForCausalLM``.
        memdec: the Memory Decoder, same forms; any architecture, as long as the tokenizer is the same.
        lmbda: the decoder's weight λ ∈ [0, 1]; settable later through ``.lmbda``.
        tokenizer: the tokenizer both share; used for both sides unless a side-specific one is given.
        base_tokenizer / memdec_tokenizer: per-side tokenizers; otherwise looked up in the model directories.
        router: a learned per-token λ (:class:`Router`, or the directory ``memdec fit-router`` wrote, checked to
            belong to this base and decoder): λ then comes from it at every position and ``lmbda`` is unused;
            where it routes λ = 0 (under its threshold) at every row the decoder is not run.
        **load_kwargs: passed to ``from_pretrained`` for models given as names/paths (``dtype``, ``device_map``…).

    The mixture is taken over the tokenizer's ids only (``len(tokenizer)``): LM heads padded beyond the tokenizer
    (e.g. Qwen: 151936 rows for 151665 tokens) are sliced, and each side is renormalised over the real ids.
    """

    config_class = InterpolatedLMConfig
    base_model_prefix = "interpolated"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        base: PreTrainedModel | str | Path,
        memdec: PreTrainedModel | str | Path,
        lmbda: float,
        tokenizer=None,
        *,
        base_tokenizer=None,
        memdec_tokenizer=None,
        router: Router | str | Path | None = None,
        **load_kwargs,
    ):
        lmbda = check_lmbda(lmbda)
        base_ref, memdec_ref = base, memdec
        base = causal_lm(base_ref, "base", **load_kwargs)
        memdec = causal_lm(memdec_ref, "memdec", **load_kwargs)
        # A side's own tokenizer (given, or found next to the model) wins over the shared one, so that a shared
        # tokenizer= is checked against what the model directories say rather than trusted blindly.
        if base_tokenizer is None:  # looked up only when not given: the files there are then not read at all
            base_tokenizer = _first_not_none(find_tokenizer(base_ref, base), tokenizer)
        if memdec_tokenizer is None:
            memdec_tokenizer = _first_not_none(find_tokenizer(memdec_ref, memdec), tokenizer)
        vocab = mixture_vocab(base, memdec, base_tokenizer, memdec_tokenizer, tokenizer)

        base_gen = getattr(base, "generation_config", None) or GenerationConfig.from_model_config(base.config)
        generation_config = copy.deepcopy(base_gen)
        shared_tokenizer = _first_not_none(tokenizer, base_tokenizer, memdec_tokenizer)
        if generation_config.eos_token_id is None and shared_tokenizer is not None:
            generation_config.eos_token_id = shared_tokenizer.eos_token_id
        if generation_config.pad_token_id is None:
            pad = getattr(shared_tokenizer, "pad_token_id", None)
            generation_config.pad_token_id = pad if pad is not None else _first_id(generation_config.eos_token_id)

        config = InterpolatedLMConfig(
            vocab_size=vocab,
            lmbda=lmbda,
            base_name_or_path=str(getattr(base, "name_or_path", "") or ""),
            memdec_name_or_path=str(getattr(memdec, "name_or_path", "") or ""),
            max_position_embeddings=min((c for c in map(context_length, (base, memdec)) if c), default=None),
            bos_token_id=generation_config.bos_token_id,
            eos_token_id=generation_config.eos_token_id,
            pad_token_id=generation_config.pad_token_id,
        )
        super().__init__(config)
        # No post_init(): it would (re)initialise weights, and the two sub-models arrive trained.
        self.base = base
        self.memdec = memdec
        self.tokenizer = shared_tokenizer
        self.generation_config = generation_config
        self._cache_arg = {"base": cache_arg_name(base), "memdec": cache_arg_name(memdec)}
        self._takes_logits_to_keep = {
            "base": "logits_to_keep" in forward_params(base),
            "memdec": "logits_to_keep" in forward_params(memdec),
        }
        self.router = _checked_router(router, base, memdec, shared_tokenizer)
        self.eval()  # an inference-time mixture: dropout in either model would make generation non-deterministic

    @classmethod
    def from_pretrained(  # type: ignore[override]  # two models, not one checkpoint
        cls,
        base: PreTrainedModel | str | Path,
        memdec: PreTrainedModel | str | Path,
        lmbda: float,
        tokenizer=None,
        **kwargs,
    ) -> InterpolatedLM:
        """Load both models (names or paths) and mix them; see the class docstring for the arguments."""
        return cls(base, memdec, lmbda, tokenizer, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Not a checkpoint: the two models are released and loaded separately (plug-and-play)."""
        raise NotImplementedError(
            "InterpolatedLM is not saved as one checkpoint: save .base and .memdec separately and mix them again "
            "with InterpolatedLM.from_pretrained(base, memdec, lmbda)."
        )

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """``GenerationMixin.generate``, refused up front when prompt + new tokens exceed either model's context."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("InterpolatedLM mixes two models, each with its own embeddings: pass token ids, not "
                             "inputs_embeds.")  # fmt: skip
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is not None:
            check_token_ids(prompt, self.config.vocab_size)
        config = generation_config or self.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        length = 1 if prompt is None else prompt.shape[-1]  # no prompt: generate() starts from the BOS token
        total, setting = (kwargs.get("max_length", config.max_length), "max_length") if new is None else (
            length + new, "prompt + max_new_tokens"
        )  # fmt: skip
        if total is not None:
            check_fits_context(total, self.base, "the base LM", setting)
            check_fits_context(total, self.memdec, "the Memory Decoder", setting)
        return super().generate(inputs, generation_config, **kwargs)

    # -- λ -------------------------------------------------------------------------------------------------------

    @property
    def lmbda(self) -> float:
        return self.config.lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self.config.lmbda = check_lmbda(value)

    # -- forward -------------------------------------------------------------------------------------------------

    def _run(self, side: str, tensors: dict, cache, use_cache, logits_to_keep, kwargs, hidden: bool = False):
        """One model's forward, as log-probs over the shared ids, its updated cache and (``hidden``) its last
        hidden states at the same positions as the log-probs."""
        model = self.base if side == "base" else self.memdec
        inputs = {name: None if t is None else t.to(model.device) for name, t in tensors.items()}
        inputs["use_cache"] = use_cache
        inputs[self._cache_arg[side]] = cache
        if self._takes_logits_to_keep[side]:
            inputs["logits_to_keep"] = logits_to_keep
        out = model(**inputs, **kwargs, output_hidden_states=hidden, return_dict=True)
        logits = out.logits
        if not self._takes_logits_to_keep[side] and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        log_probs = vocab_log_probs(logits, self.config.vocab_size)  # a padded head's extra rows get no mass
        last_hidden = out.hidden_states[-1][:, -log_probs.shape[1] :] if hidden else None
        return log_probs, getattr(out, self._cache_arg[side], None), last_hidden

    def _routed(self, tensors: dict, cache: PairCache | None, use_cache, logits_to_keep, kwargs):
        """The router's mixture: the base first, λ from its state, then the decoder only if some λ is not 0.

        A skipped step leaves its tokens pending in the cache; the decoder's next call takes them all at once, so
        its KV cache catches up (the attention mask already spans them; positions are cached beside the ids).
        """
        base_cache, memdec_cache = (cache.base, cache.memdec) if cache is not None else (None, None)
        base_lp, base_cache, hidden = self._run("base", tensors, base_cache, use_cache, logits_to_keep, kwargs, True)
        lmbda = self.router.route(hidden, base_lp).to(base_lp.device)[..., None]
        cache = cache if cache is not None or not use_cache else PairCache(base_cache, None)
        if not bool(lmbda.any()):  # every row under the threshold: the decoder is skipped
            if use_cache:
                cache.defer(tensors["input_ids"], tensors["position_ids"])
            return base_lp, cache
        memdec_tensors = dict(tensors)
        if cache is not None and cache.pending_ids is not None:
            pending_ids, pending_positions = cache.take_pending()
            memdec_tensors["input_ids"] = torch.cat([pending_ids, tensors["input_ids"].to(pending_ids.device)], 1)
            length = memdec_tensors["input_ids"].shape[1]
            positions = position_ids_from_mask(tensors["attention_mask"], length)
            if positions is None and pending_positions is not None:
                positions = torch.cat([pending_positions, tensors["position_ids"].to(pending_positions.device)], 1)
            memdec_tensors["position_ids"] = positions
        memdec_cache = cache.memdec if cache is not None else None
        memdec_lp = self._run("memdec", memdec_tensors, memdec_cache, use_cache, logits_to_keep, kwargs)[0]
        mixed = mix_log_probs(base_lp, memdec_lp[:, -base_lp.shape[1] :].to(base_lp.device), lmbda)
        return mixed, cache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: PairCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Mixed log-probabilities ``[B, T, V]`` in ``.logits`` (float32); both models see the same inputs.

        Positions are derived from a 2-D ``attention_mask`` when not given, because some architectures (GPT-2)
        count positions from the start of the row and would otherwise shift left-padded prompts.
        ``labels`` (shifted inside, -100 ignored) gives ``.loss``, the mixture's mean NLL. ``return_dict=False``:
        the output's fields as a tuple (``(loss, logits, cache)`` without the ones that are None).
        """
        check_token_ids(input_ids)
        if cache is not None and not isinstance(cache, PairCache):
            raise TypeError(f"InterpolatedLM needs a PairCache (one cache per model), got {type(cache).__name__}.")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, input_ids.shape[1])
        if use_cache is None:
            use_cache = cache is not None
        if labels is not None:
            logits_to_keep = 0
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.router is not None:
            mixed, new_cache = self._routed(tensors, cache, use_cache, logits_to_keep, kwargs)
        else:
            mixed, new_cache = self._mixed(tensors, cache, use_cache, logits_to_keep, kwargs)
        out = CausalLMOutputWithPast(loss=_mixture_loss(mixed, labels), logits=mixed, cache=new_cache)
        return out if return_dict is not False else out.to_tuple()  # a tuple, as a Hugging Face model gives

    def _mixed(self, tensors: dict, cache: PairCache | None, use_cache, logits_to_keep, kwargs):
        """The fixed-λ mixture: both models on the same inputs, and the pair's cache."""
        base_cache, memdec_cache = (cache.base, cache.memdec) if cache is not None else (None, None)
        base_lp, base_cache, _ = self._run("base", tensors, base_cache, use_cache, logits_to_keep, kwargs)
        memdec_lp, memdec_cache, _ = self._run("memdec", tensors, memdec_cache, use_cache, logits_to_keep, kwargs)
        mixed = mix_log_probs(base_lp, memdec_lp.to(base_lp.device), self.lmbda)

        new_cache = None
        if use_cache and base_cache is not None and memdec_cache is not None:
            new_cache = cache if cache is not None else PairCache(base_cache, memdec_cache)
        return mixed, new_cache

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed next-token log-probabilities ``[B, T, V]`` for every position (no cache, no gradients)."""
        return self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def mixture_vocab(base, memdec, base_tokenizer=None, memdec_tokenizer=None, shared_tokenizer=None) -> int:
    """The ids a base and a Memory Decoder can be mixed over (the tokenizer's size); refuses pairs whose ids mean
    different tokens or whose heads are too narrow. Validates a pair without building an :class:`InterpolatedLM`.
    """
    base_rows, memdec_rows = output_rows(base), output_rows(memdec)
    if base_tokenizer is not None and memdec_tokenizer is not None:
        b = tokenizer_info(base_tokenizer, tokenizer_name(base_tokenizer, "base"))
        m = tokenizer_info(memdec_tokenizer, tokenizer_name(memdec_tokenizer, "memdec"))
        fix = "the Memory Decoder must use the base model's tokenizer: train one with it"
        check_same_tokenizer(b, "the base model", m, "the Memory Decoder", fix)
        if shared_tokenizer is not None:
            t = tokenizer_info(shared_tokenizer, tokenizer_name(shared_tokenizer, "tokenizer"))
            check_same_tokenizer(t, "tokenizer=", b, "each model", "pass the models' tokenizer, or none")
        vocab = b["vocab_size"]
    elif base_tokenizer is not None or memdec_tokenizer is not None:
        known = base_tokenizer if base_tokenizer is not None else memdec_tokenizer
        side, other = ("base", "decoder") if base_tokenizer is not None else ("decoder", "base")
        warnings.warn(
            f"only the {side}'s tokenizer is known, so the {other}'s vocabulary cannot be checked against it; "
            "pass tokenizer= (shared) or base_tokenizer=/memdec_tokenizer= to verify.",
            stacklevel=3,
        )
        vocab = len(known)
    elif base_rows == memdec_rows:
        vocab = base_rows
    else:
        raise ValueError(
            f"the base model has {base_rows} output ids and the decoder {memdec_rows}, and no tokenizer was found "
            "to tell a padded LM head from a different vocabulary; pass tokenizer= (the tokenizer both share)."
        )
    for what, rows in (("the base model", base_rows), ("the decoder model", memdec_rows)):
        fix = f"they cannot share this vocabulary (base {base_rows} rows, decoder {memdec_rows})"
        check_head_covers_vocab(rows, what, vocab, "the tokenizer", fix)
    return vocab


def _mixture_loss(mixed: torch.Tensor, labels: torch.LongTensor | None) -> torch.Tensor | None:
    """The mixture's mean NLL of the next tokens (``labels`` shifted inside, −100 ignored); None without labels."""
    if labels is None:
        return None
    targets = labels[:, 1:].reshape(-1).to(mixed.device)
    return F.nll_loss(mixed[:, :-1].reshape(-1, mixed.shape[-1]), targets, ignore_index=-100)


def _checked_router(router, base, memdec, tokenizer) -> Router | None:
    """The router as a module (loaded from its directory), refused when it was fitted for other models."""
    if router is None:
        return None
    fingerprint = None if tokenizer is None else tokenizer_info(tokenizer, tokenizer_name(tokenizer))["fingerprint"]
    if not isinstance(router, Router):
        router = load_router(router, base, memdec, fingerprint)
    hidden = base.config.get_text_config().hidden_size
    if router.hidden_size != hidden:
        raise ValueError(
            f"the router reads hidden states of size {router.hidden_size}, the base's are {hidden}: it was fitted "
            "for another base; fit one for this base with `memdec fit-router`."
        )
    return router.to(base.device).eval()


def _first_not_none(*items):
    return next((item for item in items if item is not None), None)


def _first_id(token_id):
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id
