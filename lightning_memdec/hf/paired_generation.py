"""The one place that leans on transformers' generation internals: a paired KV cache and two generate() hooks.

``InterpolatedLM`` runs two models per step, so ``generate()`` must carry two KV caches as one object and
never try to compile or pre-allocate a single-model cache. transformers exposes no public hook for that, so
this module overrides ``GenerationMixin._prepare_cache_for_generation`` and
``GenerationMixin._valid_auto_compile_criteria`` and implements the ``Cache`` interface by delegation.
``tests/test_hf_generation.py`` fails loudly when a transformers release renames these hooks or adds a
``Cache`` method that :class:`PairCache` does not forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

__all__ = ["PairCache", "PairCacheGeneration", "GENERATION_HOOKS"]

# GenerationMixin methods overridden below; the test checks they still exist with these leading parameters
GENERATION_HOOKS = {
    "_prepare_cache_for_generation": ("self", "generation_config", "model_kwargs"),
    "_valid_auto_compile_criteria": ("self",),
}


class PairCache(Cache):
    """The base model's and the Memory Decoder's KV caches, moved together.

    ``generate()`` only sees one cache object; beam search calls :meth:`reorder_cache` on it, which must reorder
    both models' states identically or the decoder would condition on another beam's prefix.

    When a router skipped the decoder, the tokens it has not seen wait in ``pending_ids`` (with their
    ``pending_positions`` when positions were explicit) until the decoder next runs and takes them in one call.
    """

    def __init__(self, base: Cache | None = None, memdec: Cache | None = None):
        # Cache.__init__ wants per-layer objects; the layers belong to the two sub-caches instead.
        self.base = base if base is not None else DynamicCache()
        self.memdec = memdec if memdec is not None else DynamicCache()
        self.pending_ids: torch.Tensor | None = None
        self.pending_positions: torch.Tensor | None = None

    def defer(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Tokens the base took but the decoder skipped: kept for the decoder's next call."""
        self.pending_ids = _cat(self.pending_ids, input_ids)
        self.pending_positions = None if position_ids is None else _cat(self.pending_positions, position_ids)

    def take_pending(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The decoder's skipped tokens (and positions), handed over once: the decoder is about to run on them."""
        pending = (self.pending_ids, self.pending_positions)
        self.pending_ids = self.pending_positions = None
        return pending

    def _pending_apply(self, fn) -> None:
        self.pending_ids = None if self.pending_ids is None else fn(self.pending_ids)
        self.pending_positions = None if self.pending_positions is None else fn(self.pending_positions)

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
        self.take_pending()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(beam_idx)
        self._pending_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if self.pending_ids is not None:
            raise NotImplementedError("cropping a PairCache whose decoder skipped tokens (a router's) is unsupported.")
        for cache in self.caches:
            cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.caches:
            cache.batch_repeat_interleave(repeats)
        self._pending_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(indices)
        self._pending_apply(lambda t: t[indices])

    def activate_past_recording(self, **kwargs) -> None:
        for cache in self.caches:  # kwargs: recurrent_states_to_keep (transformers >= 5.25)
            cache.activate_past_recording(**kwargs)

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """The most recurrent states either model records (``layer_idx`` None), or those of one layer of ``layers``
        (the base's layers first, then the decoder's)."""
        if layer_idx is None:
            return max(cache.get_recurrent_states_to_keep() for cache in self.caches)
        first = len(self.base.layers)
        if layer_idx < first:
            return self.base.get_recurrent_states_to_keep(layer_idx)
        return self.memdec.get_recurrent_states_to_keep(layer_idx - first)

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


def _cat(first: torch.Tensor | None, second: torch.Tensor) -> torch.Tensor:
    return second if first is None else torch.cat([first, second.to(first.device)], dim=1)


class PairCacheGeneration:
    """Mixin for a ``PreTrainedModel`` with ``base`` and ``memdec`` sub-models: generate() gets a :class:`PairCache`."""

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
                f"{generation_config.cache_implementation!r} (a model's generation_config.json may set it); pass "
                "cache_implementation=None to generate(), or set lm.generation_config.cache_implementation = None."
            )
        model_kwargs["cache"] = PairCache(
            DynamicCache(config=self.base.config), DynamicCache(config=self.memdec.config)
        )

    def _valid_auto_compile_criteria(self, *args, **kwargs) -> bool:
        return False  # two models and a composite cache: nothing for generate()'s auto-compile to gain
