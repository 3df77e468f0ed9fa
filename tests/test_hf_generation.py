"""Guards on the transformers internals that InterpolatedLM's generation relies on (hf.paired_generation).

These fail loudly, naming what changed, when a transformers release renames a generate() hook or adds a Cache
method that PairCache would silently inherit instead of forwarding to both sub-caches.
"""

import inspect

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache

from lightning_memdec.hf.paired_generation import GENERATION_HOOKS, PairCache

# Per-layer operations: each model calls them on its own sub-cache (InterpolatedLM hands the sub-caches to the
# models), never on the PairCache; and offloading/static-cache set-up, which PairCache refuses (dynamic only).
NOT_FORWARDED = {
    "update", "get_mask_sizes", "get_query_offset", "update_conv_state", "update_recurrent_state", "update_indexer",
    "get_conv_state", "get_recurrent_state", "has_previous_state", "is_recording_past",
    "offload", "prefetch", "early_initialization", "increase_count",
}  # fmt: skip


def test_generation_hooks_still_exist_with_the_same_leading_parameters():
    for name, leading in GENERATION_HOOKS.items():
        hook = getattr(GenerationMixin, name, None)
        assert hook is not None, f"transformers' GenerationMixin no longer has {name}: update hf_generation.py"
        params = tuple(inspect.signature(hook).parameters)[: len(leading)]
        assert params == leading, f"GenerationMixin.{name} now takes {params}, hf_generation expects {leading}"


def test_pair_cache_forwards_every_cache_method_generate_may_call():
    public = {name for name in dir(Cache) if not name.startswith("_")}
    unhandled = public - set(PairCache.__dict__) - NOT_FORWARDED
    assert not unhandled, f"Cache gained {sorted(unhandled)}: forward them in PairCache or list them as per-layer"


def test_pair_cache_moves_both_caches_together():
    pair = PairCache(DynamicCache(), DynamicCache())
    for cache, heads in ((pair.base, 2), (pair.memdec, 3)):
        keys = torch.arange(3.0)[:, None, None, None].expand(3, heads, 4, 5).contiguous()
        cache.update(keys, keys.clone(), layer_idx=0)
    pair.reorder_cache(torch.tensor([2, 0, 1]))
    for cache in pair.caches:
        assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    pair.crop(-1)  # drop the last position of both
    assert pair.get_seq_length() == 3 and pair.memdec.get_seq_length() == 3
    assert not pair.is_compileable and len(pair.layers) == 2


def test_model_outputs_carry_the_cache_under_the_name_interpolated_lm_uses():
    """transformers 5.17 (seen on a GPU machine) still called this field past_key_values; InterpolatedLM needs cache."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert "cache" in CausalLMOutputWithPast.__dataclass_fields__, "transformers renamed the output's cache field"


def test_pair_cache_forwards_past_recording_to_both_caches():
    """generate() (transformers >= 5.25) calls cache.activate_past_recording(recurrent_states_to_keep=
    max(1, cache.get_recurrent_states_to_keep())) on a returned cache: both sub-caches get the call, and the count is
    the larger of theirs, or one layer's (the base's layers first, then the decoder's, as in ``layers``)."""
    seen = []

    class Recording(DynamicCache):
        def __init__(self, keep: int):
            super().__init__()
            self.keep = keep

        def activate_past_recording(self, **kwargs):
            seen.append((self.keep, kwargs))

        def get_recurrent_states_to_keep(self, layer_idx=None):
            return self.keep if layer_idx in (None, 0) else -1

    pair = PairCache(Recording(1), Recording(3))
    keys = torch.zeros(1, 2, 4, 5)
    pair.base.update(keys, keys.clone(), layer_idx=0)  # the base has one layer: layer 1 of the pair is the decoder's 0
    pair.activate_past_recording(recurrent_states_to_keep=2)
    assert seen == [(1, {"recurrent_states_to_keep": 2}), (3, {"recurrent_states_to_keep": 2})]
    assert pair.get_recurrent_states_to_keep() == 3
    assert [pair.get_recurrent_states_to_keep(i) for i in (0, 1)] == [1, 3]
