"""Plug-and-play inference: mix a base LM with a Memory Decoder, no retrieval at inference time.

The Memory Decoder was trained to imitate a kNN-LM distribution, so at inference it takes the datastore's
place in the kNN-LM mixture (Cao et al., 2025):

    p(y | x) = (1 - λ) · p_base(y | x) + λ · p_mem(y | x)

computed in log space. :class:`InterpolatedLM` is a Hugging Face ``PreTrainedModel`` + ``GenerationMixin``
whose ``logits`` are these mixed log-probabilities, so ``generate()`` (greedy, sampling, beam search) works
unchanged: ``log_softmax`` of a log-distribution is the identity. Each model keeps its own KV cache inside a
:class:`PairCache`, which beam search reorders as one. This module deliberately does not import Lightning.

:class:`KNNLM` is the paper's baseline: the same mixture with p_kNN from live datastore retrieval in place of the
decoder.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from lightning_memdec.artifacts import describe_tokenizer, tokenizer_info

__all__ = ["InterpolatedLM", "InterpolatedLMConfig", "KNNLM", "PairCache", "interpolate_log_probs", "check_lmbda"]


def check_lmbda(lmbda: float) -> float:
    """λ is a mixture weight; anything outside [0, 1] (or NaN) is not a distribution, so refuse it early."""
    try:
        value = float(lmbda)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lmbda must be a number in [0, 1] (the Memory Decoder's weight), got {lmbda!r}.") from err
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"lmbda must be in [0, 1] (the Memory Decoder's weight in the mixture; 0 = base only, 1 = decoder only), "
            f"got {lmbda!r}."
        )
    return value


def interpolate_log_probs(base_log_probs: torch.Tensor, memdec_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``log((1-λ)·p_base + λ·p_mem)`` from two log-distributions.

    λ = 0 and λ = 1 return the corresponding input unchanged: going through ``log(0) = -inf`` would be exact in
    principle but is special-cased so the endpoints are bit-identical to the single models.
    """
    lmbda = check_lmbda(lmbda)
    if lmbda == 0.0:
        return base_log_probs
    if lmbda == 1.0:
        return memdec_log_probs
    log_base_w, log_mem_w = math.log1p(-lmbda), math.log(lmbda)
    needs_grad = torch.is_grad_enabled() and (base_log_probs.requires_grad or memdec_log_probs.requires_grad)
    if needs_grad or base_log_probs.shape != memdec_log_probs.shape or base_log_probs.dtype != memdec_log_probs.dtype:
        return torch.logaddexp(base_log_probs + log_base_w, memdec_log_probs + log_mem_w)
    # Same value, one [.., V] allocation instead of three: logaddexp(a + c1, b + c2) = c1 + logaddexp(a, b + c2 - c1).
    # At vocabulary width, allocating (page-faulting) fresh tensors costs more than the arithmetic.
    out = memdec_log_probs + (log_mem_w - log_base_w)
    torch.logaddexp(base_log_probs, out, out=out)
    return out.add_(log_base_w)


class InterpolatedLMConfig(PreTrainedConfig):
    """Enough of a config for ``generate()``; the real architectures live in ``base.config`` / ``memdec.config``."""

    model_type = "memdec_interpolated"

    vocab_size: int = 0
    lmbda: float = 0.0
    base_name_or_path: str | None = None
    memdec_name_or_path: str | None = None


class PairCache(Cache):
    """The base model's and the Memory Decoder's KV caches, moved together.

    ``generate()`` only sees one cache object; beam search calls :meth:`reorder_cache` on it, which must reorder
    both models' states identically or the decoder would condition on another beam's prefix.
    """

    def __init__(self, base: Cache | None = None, memdec: Cache | None = None):
        # Cache.__init__ wants per-layer objects; the layers belong to the two sub-caches instead.
        self.base = base if base is not None else DynamicCache()
        self.memdec = memdec if memdec is not None else DynamicCache()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r}, memdec={self.memdec!r})"

    def __len__(self) -> int:
        return len(self.base)

    @property
    def caches(self) -> tuple[Cache, Cache]:
        return self.base, self.memdec

    @property
    def layers(self) -> list:
        return list(self.base.layers) + list(self.memdec.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.base.get_max_length(layer_idx)

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for cache in self.caches:
            cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.caches:
            cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(indices)

    def activate_past_recording(self) -> None:
        for cache in self.caches:
            cache.activate_past_recording()

    @property
    def batch_size(self) -> int:
        return self.base.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # keeps generate() from building a static 4-D mask meant for a single model

    @property
    def is_initialized(self) -> bool:
        return self.base.is_initialized and self.memdec.is_initialized

    @property
    def is_croppable(self) -> bool:
        return self.base.is_croppable and self.memdec.is_croppable

    # Per-layer flags cover both models' layers, in the same order as `layers`.
    @property
    def is_sliding(self) -> list[bool]:
        return self.base.is_sliding + self.memdec.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.base.is_linear + self.memdec.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.base.is_dummy + self.memdec.is_dummy


def _output_rows(model: PreTrainedModel) -> int:
    """Rows of the LM head, i.e. the width of the logits (may exceed the tokenizer when padded, as Qwen's are)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def _load_model(ref, what: str, **kwargs) -> PreTrainedModel:
    if isinstance(ref, (str, Path)):
        return AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    if not isinstance(ref, PreTrainedModel):
        raise TypeError(
            f"{what} must be a Hugging Face causal LM (PreTrainedModel) or a name/path, got {type(ref).__name__}."
        )
    return ref


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _find_tokenizer(ref, model: PreTrainedModel):
    """The tokenizer stored next to a model (its directory or hub repo), or None when there is none."""
    from transformers import AutoTokenizer

    candidates = []
    if isinstance(ref, (str, Path)):
        candidates.append(str(ref))
    name = getattr(model, "name_or_path", None) or ""
    if name and Path(name).is_dir() and name not in candidates:
        candidates.append(name)  # in-memory model loaded from a local dir: look there, never on the hub
    for candidate in candidates:
        path = Path(candidate)
        # transformers 5 builds an empty 1-token tokenizer from a directory without tokenizer files: don't let it in
        if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
        except Exception:  # no tokenizer there; errors differ by version and source
            continue
        if len(tokenizer) > 1:
            return tokenizer
    return None


def _tokenizer_name(tokenizer, fallback: str) -> str:
    name = getattr(tokenizer, "name_or_path", None) or fallback
    return Path(name).name or name


class InterpolatedLM(PreTrainedModel, GenerationMixin):
    """A base causal LM mixed with a Memory Decoder that shares its tokenizer: ``logits`` are mixed log-probs.

    Args:
        base: the (large) base LM, a ``PreTrainedModel`` or a name/path for ``AutoModelForCausalLM``.
        memdec: the Memory Decoder, same forms; any architecture, as long as the tokenizer is the same.
        lmbda: the decoder's weight λ ∈ [0, 1]; settable later through ``.lmbda``.
        tokenizer: the tokenizer both share; used for both sides unless a side-specific one is given.
        base_tokenizer / memdec_tokenizer: per-side tokenizers; otherwise looked up in the model directories.
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
        **load_kwargs,
    ):
        lmbda = check_lmbda(lmbda)
        base_ref, memdec_ref = base, memdec
        base = _load_model(base_ref, "base", **load_kwargs)
        memdec = _load_model(memdec_ref, "memdec", **load_kwargs)
        # A side's own tokenizer (given, or found next to the model) wins over the shared one, so that a shared
        # tokenizer= is checked against what the model directories say rather than trusted blindly.
        base_tokenizer = _first_not_none(base_tokenizer, _find_tokenizer(base_ref, base), tokenizer)
        memdec_tokenizer = _first_not_none(memdec_tokenizer, _find_tokenizer(memdec_ref, memdec), tokenizer)
        vocab = self._shared_vocab(base, memdec, base_tokenizer, memdec_tokenizer, tokenizer)

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
        self._cache_arg = {"base": _cache_arg_name(base), "memdec": _cache_arg_name(memdec)}
        self._takes_logits_to_keep = {
            "base": "logits_to_keep" in _forward_params(base),
            "memdec": "logits_to_keep" in _forward_params(memdec),
        }
        self.eval()  # an inference-time mixture: dropout in either model would make generation non-deterministic

    @classmethod
    def from_pretrained(  # type: ignore[override]  # two models, not one checkpoint
        cls,
        base: PreTrainedModel | str | Path,
        memdec: PreTrainedModel | str | Path,
        lmbda: float,
        tokenizer=None,
        **kwargs,
    ) -> "InterpolatedLM":
        """Load both models (names or paths) and mix them; see the class docstring for the arguments."""
        return cls(base, memdec, lmbda, tokenizer, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Not a checkpoint: the two models are released and loaded separately (plug-and-play)."""
        raise NotImplementedError(
            "InterpolatedLM is not saved as one checkpoint: save .base and .memdec separately and mix them again "
            "with InterpolatedLM.from_pretrained(base, memdec, lmbda)."
        )

    # -- λ -------------------------------------------------------------------------------------------------------

    @property
    def lmbda(self) -> float:
        return self.config.lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self.config.lmbda = check_lmbda(value)

    # -- vocabulary ----------------------------------------------------------------------------------------------

    @staticmethod
    def _shared_vocab(base, memdec, base_tokenizer, memdec_tokenizer, shared_tokenizer=None) -> int:
        """Ids the mixture runs over; refuses pairs whose ids mean different tokens."""
        base_rows, memdec_rows = _output_rows(base), _output_rows(memdec)
        if base_tokenizer is not None and memdec_tokenizer is not None:
            b = tokenizer_info(base_tokenizer, _tokenizer_name(base_tokenizer, "base"))
            m = tokenizer_info(memdec_tokenizer, _tokenizer_name(memdec_tokenizer, "memdec"))
            if b["fingerprint"] != m["fingerprint"]:
                raise ValueError(
                    "the Memory Decoder must use the base model's tokenizer, but they differ: "
                    f"base {describe_tokenizer(b)} vs decoder {describe_tokenizer(m)}; "
                    "train a Memory Decoder with the base model's tokenizer."
                )
            if shared_tokenizer is not None:
                t = tokenizer_info(shared_tokenizer, _tokenizer_name(shared_tokenizer, "tokenizer"))
                if t["fingerprint"] != b["fingerprint"]:
                    raise ValueError(
                        f"tokenizer= is {describe_tokenizer(t)}, but the models use {describe_tokenizer(b)}."
                    )
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
        for what, rows in (("base", base_rows), ("decoder", memdec_rows)):
            if rows < vocab:
                raise ValueError(
                    f"the {what} model's LM head has {rows} rows but the tokenizer has {vocab} tokens "
                    f"(base {base_rows}, decoder {memdec_rows}): they cannot share this vocabulary."
                )
        return vocab

    # -- forward -------------------------------------------------------------------------------------------------

    def _run(self, side: str, tensors: dict, cache, use_cache, logits_to_keep, kwargs):
        """One model's forward, as log-probs over the shared ids, and its updated cache."""
        model = self.base if side == "base" else self.memdec
        inputs = {name: None if t is None else t.to(model.device) for name, t in tensors.items()}
        inputs["use_cache"] = use_cache
        inputs[self._cache_arg[side]] = cache
        if self._takes_logits_to_keep[side]:
            inputs["logits_to_keep"] = logits_to_keep
        out = model(**inputs, **kwargs, return_dict=True)
        logits = out.logits
        if not self._takes_logits_to_keep[side] and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        # Slice a padded head to the shared ids *before* normalising, so padding rows get no probability mass.
        log_probs = F.log_softmax(logits[..., : self.config.vocab_size].float(), dim=-1)
        return log_probs, getattr(out, self._cache_arg[side], None)

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
        ``labels`` (shifted inside, -100 ignored) gives ``.loss``, the mixture's mean NLL.
        """
        if cache is not None and not isinstance(cache, PairCache):
            raise TypeError(f"InterpolatedLM needs a PairCache (one cache per model), got {type(cache).__name__}.")
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 0)[:, -input_ids.shape[1] :]
        if use_cache is None:
            use_cache = cache is not None
        if labels is not None:
            logits_to_keep = 0
        base_cache, memdec_cache = (cache.base, cache.memdec) if cache is not None else (None, None)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        base_lp, base_cache = self._run("base", tensors, base_cache, use_cache, logits_to_keep, kwargs)
        memdec_lp, memdec_cache = self._run("memdec", tensors, memdec_cache, use_cache, logits_to_keep, kwargs)
        mixed = interpolate_log_probs(base_lp, memdec_lp.to(base_lp.device), self.lmbda)

        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1).to(mixed.device)
            loss = F.nll_loss(mixed[:, :-1].reshape(-1, mixed.shape[-1]), targets, ignore_index=-100)
        new_cache = None
        if use_cache and base_cache is not None and memdec_cache is not None:
            new_cache = cache if cache is not None else PairCache(base_cache, memdec_cache)
        return CausalLMOutputWithPast(loss=loss, logits=mixed, cache=new_cache)

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed next-token log-probabilities ``[B, T, V]`` for every position (no cache, no gradients)."""
        return self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # -- generation ----------------------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """One dynamic cache per model, wrapped so generate() (and beam reordering) treats them as one."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, PairCache):
                raise TypeError(f"pass a PairCache to InterpolatedLM.generate, got {type(user_cache).__name__}.")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"InterpolatedLM supports only the dynamic cache, got cache_implementation="
                f"{generation_config.cache_implementation!r}."
            )
        model_kwargs["cache"] = PairCache(
            DynamicCache(config=self.base.config), DynamicCache(config=self.memdec.config)
        )

    def _valid_auto_compile_criteria(self, *args, **kwargs) -> bool:
        return False  # two models and a composite cache: nothing for generate()'s auto-compile to gain


def _first_not_none(*items):
    return next((item for item in items if item is not None), None)


def _first_id(token_id):
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_arg_name(model) -> str:
    """transformers 5 calls the cache ``cache``; older/remote-code models still say ``past_key_values``."""
    params = _forward_params(model)
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


# -- kNN-LM baseline ---------------------------------------------------------------------------------------------------

def _key_dim(model: PreTrainedModel, capture) -> int:
    """Width of the key layer's output, from a two-token forward pass of the transformer body."""
    from lightning_memdec.keys import body

    with torch.no_grad(), capture.capturing() as cap:
        body(model)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=False)
    return int(cap.value.shape[-1])


def _positions(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Position ids counted over real tokens, so left-padded rows are scored as if unpadded (as InterpolatedLM)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)[:, -length:]


class KNNLM(torch.nn.Module):
    """The kNN-LM baseline (Khandelwal et al., 2020) as the paper evaluates it: base LM + live datastore retrieval.

    p(y | x) = (1 − λ)·p_base(y | x) + λ·p_kNN(y | x), with p_kNN(y) = Σ_{j: v_j = y} softmax_j(−d_j / T) over the
    k nearest datastore keys (squared L2), queried with the base's own hidden state at the datastore's key layer.

    Args:
        base: the base LM that built the datastore (``PreTrainedModel`` or name/path).
        datastore: datastore directory (or an opened ``Datastore``).
        index: index directory over that datastore (or an opened ``KeyIndex``).
        k: neighbours per query (paper: 1024); capped at the datastore size.
        temperature: T of the softmax over −distances (paper: 16).
        lmbda: the kNN weight λ ∈ [0, 1].
        exact_distances: recompute fp32 distances from the stored keys (IVF-PQ distances are approximate).
        tokenizer: the base's tokenizer, when its directory has none (checked against the datastore's).
        nprobe: IVF lists visited per query (default: the index's meta.json).
        **load_kwargs: ``from_pretrained`` arguments for a base given by name/path.
    """

    def __init__(
        self,
        base: PreTrainedModel | str | Path,
        datastore,
        index,
        k: int = 1024,
        temperature: float = 16.0,
        lmbda: float = 0.25,
        exact_distances: bool = False,
        tokenizer=None,
        nprobe: int | None = None,
        **load_kwargs,
    ):
        super().__init__()
        from lightning_memdec.keys import KeyCapture

        self._lmbda = check_lmbda(lmbda)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k (neighbours per query) must be a positive integer, got {k!r}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        base_ref = base
        base = _load_model(base_ref, "base", **load_kwargs)
        from lightning_memdec.index import KeyIndex
        from lightning_memdec.store import Datastore

        self.store = Datastore(datastore) if isinstance(datastore, (str, Path)) else datastore
        self.key_index = KeyIndex(index, nprobe=nprobe) if isinstance(index, (str, Path)) else index
        meta = self.store.meta
        where = f"datastore {self.store.dir}"
        if self.key_index.meta.get("datastore_identity") != self.store.identity():
            raise ValueError(
                f"index {self.key_index.dir} was built over datastore {self.key_index.meta.get('datastore')}, not over "
                f"{self.store.dir} (their corpus/model/layer/size differ); pass the index built for this datastore."
            )
        self.vocab = self._check_tokenizer(base_ref, base, tokenizer, meta, where)
        base_type = getattr(base.config, "model_type", None)
        if meta.get("model_type") is not None and base_type != meta["model_type"]:
            raise ValueError(
                f"{where} was built with a {meta['model_type']!r} model ({meta['model']}), but the base LM "
                f"{base.name_or_path or type(base).__name__} is a {base_type!r}; kNN-LM queries must come from the "
                "model that built the datastore."
            )
        self.capture = KeyCapture(base, meta["layer"])
        dim = _key_dim(base, self.capture)
        if dim != meta["dim"]:
            raise ValueError(
                f"{where} holds {meta['dim']}-dim keys from layer {meta['layer']} of {meta['model']}, but that layer of "
                f"the base LM {base.name_or_path or type(base).__name__} gives {dim}-dim keys; use the base that "
                "built the datastore (or build a datastore with this base)."
            )
        name = str(getattr(base, "name_or_path", "") or "")
        if name and Path(name).name != Path(str(meta["model"])).name:
            warnings.warn(
                f"{where} was built with {meta['model']}, but the base LM is {name}: keys only match when the weights do.",
                stacklevel=2,
            )
        self.base = base.eval()
        self.k = int(min(k, meta["num_entries"]))
        self.temperature = float(temperature)
        self.exact_distances = bool(exact_distances)
        self.values = np.asarray(self.store.values)  # int32, 4 bytes an entry: read once, gathered per query

    @staticmethod
    def _check_tokenizer(base_ref, base, tokenizer, meta: dict, where: str) -> int:
        """The base must number tokens like the datastore's values do; returns the shared vocabulary size."""
        expected = meta["tokenizer"]
        tok = tokenizer if tokenizer is not None else _find_tokenizer(base_ref, base)
        rows = _output_rows(base)
        if tok is not None:
            info = tokenizer_info(tok, _tokenizer_name(tok, "base"))
            if info["fingerprint"] != expected["fingerprint"]:
                raise ValueError(
                    f"{where} was built with tokenizer {describe_tokenizer(expected)}, but the base LM uses "
                    f"{describe_tokenizer(info)}; use the base (and tokenizer) that built the datastore."
                )
        else:
            warnings.warn(
                f"the base LM has no tokenizer to check against {where}'s ({describe_tokenizer(expected)}); "
                "pass tokenizer= to verify.",
                stacklevel=3,
            )
        if rows < expected["vocab_size"]:
            raise ValueError(
                f"the base LM's head has {rows} rows, but {where} uses tokenizer {describe_tokenizer(expected)}."
            )
        return int(expected["vocab_size"])

    @property
    def lmbda(self) -> float:
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = check_lmbda(value)

    @property
    def device(self) -> torch.device:
        return self.base.device

    # -- pieces ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def base_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Base logits ``[B, T, V]`` (sliced to the shared vocabulary) and query keys ``[B, T, d]`` in one pass."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        with self.capture.capturing() as cap:
            out = self.base(
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=_positions(attention_mask, input_ids.shape[1]), use_cache=False, return_dict=True,
            )
        return out.logits[..., : self.vocab].float(), cap.value

    def neighbours(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-weights ``log softmax_j(−d_j/T)`` ``[n, k]`` float64 (−inf for missing) and their tokens ``[n, k]``."""
        queries = keys.detach().reshape(-1, keys.shape[-1]).float().cpu().numpy()
        dist, ids = self.key_index.search(queries, self.k)
        if self.exact_distances:
            from lightning_memdec.index import exact_squared_l2

            dist = exact_squared_l2(queries, self.store.keys, ids)
        dist = np.where(ids >= 0, dist, np.inf)
        tokens = np.take(self.values, ids, mode="clip").astype(np.int64)
        scores = torch.from_numpy(-dist.astype(np.float64) / self.temperature)
        return torch.log_softmax(scores, dim=-1), torch.from_numpy(tokens)

    def knn_gold_log_probs(self, keys: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """log p_kNN(gold) ``[n]`` float64: the weight of the neighbours whose value is the gold token (no [n, V])."""
        log_w, tokens = self.neighbours(keys)
        match = tokens == gold.reshape(-1, 1).cpu().long()
        return torch.logsumexp(log_w.masked_fill(~match, -math.inf), dim=-1)

    def knn_log_probs(self, keys: torch.Tensor) -> torch.Tensor:
        """Dense log p_kNN ``[n, V]`` float32 (−inf off the neighbours' tokens)."""
        log_w, tokens = self.neighbours(keys)
        probs = torch.zeros(tokens.shape[0], self.vocab, dtype=torch.float32)
        probs.scatter_add_(1, tokens, log_w.exp().float())
        return probs.log_()

    # -- the mixture -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed next-token log-probabilities ``[B, T, V]`` (float32); padded positions keep the base's."""
        logits, keys = self.base_forward(input_ids, attention_mask)
        base_lp = F.log_softmax(logits, dim=-1)
        if self.lmbda == 0.0:
            return base_lp
        if attention_mask is None:  # every position is real: no masked copies of [B, T, V] tensors
            knn = self.knn_log_probs(keys.reshape(-1, keys.shape[-1])).to(base_lp.device)
            return interpolate_log_probs(base_lp, knn.view_as(base_lp), self.lmbda)
        real = attention_mask.to(base_lp.device).bool()
        knn = self.knn_log_probs(keys[real]).to(base_lp.device)
        out = base_lp.clone()
        out[real] = interpolate_log_probs(base_lp[real], knn, self.lmbda)
        return out

    forward = log_probs

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
        """Greedy decoding from the mixture with the base's KV cache: one base step and one retrieval per token.

        Rows are continued independently (no padding, no early stop), as a latency baseline; λ = 0 skips retrieval.
        """
        cache_arg = _cache_arg_name(self.base)
        ids = input_ids.to(self.device)
        step, cache = ids, None
        for _ in range(max_new_tokens):
            with self.capture.capturing() as cap:
                out = self.base(input_ids=step, use_cache=True, return_dict=True, **{cache_arg: cache})
            cache = getattr(out, cache_arg)
            log_probs = F.log_softmax(out.logits[:, -1, : self.vocab].float(), dim=-1)
            if self.lmbda > 0.0:
                knn = self.knn_log_probs(cap.value[:, -1]).to(log_probs.device)
                log_probs = interpolate_log_probs(log_probs, knn, self.lmbda)
            step = log_probs.argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
        return ids

    @torch.no_grad()
    def gold_log_probs(
        self, input_ids: torch.LongTensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-position log-probabilities of the gold next tokens, for perplexity, without any dense kNN tensor.

        ``labels[b, t]`` is the token that follows position ``t`` (already shifted); −100 (or a padded position)
        skips it: no retrieval, 0 in every output. Returns float64 ``[B, T]`` tensors on the CPU: ``base``,
        ``knn`` (p_kNN alone, may be −inf) and ``mix`` (at the current λ).
        """
        logits, keys = self.base_forward(input_ids, attention_mask)
        labels = labels.to(logits.device)
        scored = labels != -100
        if attention_mask is not None:
            scored &= attention_mask.to(logits.device).bool()
        gold = labels.clamp(min=0)
        base = (logits.gather(-1, gold[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)).double().cpu()
        scored = scored.cpu()
        knn = torch.zeros_like(base)
        if scored.any():
            knn[scored] = self.knn_gold_log_probs(keys[scored.to(keys.device)], gold.cpu()[scored])
        base = base.masked_fill(~scored, 0.0)
        mix = interpolate_log_probs(base, knn, self.lmbda).masked_fill(~scored, 0.0)
        return {"base": base, "knn": knn, "mix": mix}
