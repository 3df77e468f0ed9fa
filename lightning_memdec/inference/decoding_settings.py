"""Decoding settings as ``generate()`` applies them, for ``StaticGenerator``: which ``GenerationConfig`` fields it
honours (the rest refused, not silently ignored), transformers' sampling warpers in ``generate()``'s order, and the
next token from a step's log-probs."""

from __future__ import annotations

import copy
import operator

import torch
from transformers import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["decoding_settings", "next_token", "positive_count", "sampling_warpers"]

# GenerationConfig fields generate() here applies; and those that change nothing here (ids and flags a model's own
# generation_config.json often carries)
_APPLIED = {"do_sample", "temperature", "top_k", "top_p", "num_beams", "length_penalty", "early_stopping",
            "eos_token_id", "pad_token_id"}  # fmt: skip
_INERT = {"transformers_version", "_from_model_config", "bos_token_id", "use_cache"}
# lengths: the max_new_tokens argument decides, as an explicit max_new_tokens wins over both in generate() (Llama's
# generation_config.json carries max_length)
_OVERRIDDEN = {"max_length", "max_new_tokens"}


def decoding_settings(
    model_config: GenerationConfig | None, fields: dict, requested: GenerationConfig | None = None
) -> GenerationConfig:
    """The settings ``generate()`` decodes with, in its order: the ``requested`` config (copied), its unset
    settings taken from the model's ``model_config``, then ``fields`` over both, and what is still unset from
    ``generate()``'s defaults (e.g. sampling keeps the top 50 tokens there). Refuses settings this generator does
    not apply (a repetition penalty silently ignored would give other tokens than ``generate()``)."""
    config = copy.deepcopy(requested) if requested is not None else GenerationConfig()
    if model_config is not None:  # the model's end-of-sequence id and top-k hold unless the request sets its own
        config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    unknown = config.update(**fields)
    if unknown:
        raise ValueError(f"not GenerationConfig fields: {sorted(unknown)}.")
    defaults = _generate_defaults()
    other = {
        k: v
        for k, v in config.to_diff_dict().items()
        # kept: set, on, and not generate()'s own default
        if k not in _APPLIED | _INERT | _OVERRIDDEN and v and v != defaults.get(k)
    }
    if other:
        raise ValueError(
            f"StaticGenerator applies {sorted(_APPLIED)}; got {other}: generate with InterpolatedLM.generate for those."
        )
    for name in _APPLIED:
        if getattr(config, name) is None and name in defaults:
            setattr(config, name, defaults[name])
    return config


def _generate_defaults() -> dict:
    """``generate()``'s values for settings neither the model's config nor the caller sets (transformers fills
    them in before decoding; every decoding test calls this private transformers method, so a rename fails them)."""
    return GenerationConfig._get_default_generation_params()


def sampling_warpers(config: GenerationConfig) -> list:
    """transformers' sampling warpers, in generate()'s order (temperature, top-k, top-p)."""
    temperature = config.temperature
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}; use do_sample=False.")
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


def next_token(ids: torch.Tensor, log_probs: torch.Tensor, warpers: list | None) -> torch.Tensor:
    """Greedy (no warpers given and not sampling) or sampled next token ``[B]`` from log-probs ``[B, V]``."""
    if warpers is None:
        return log_probs.argmax(-1)
    scores = log_probs.float()
    for warp in warpers:
        scores = warp(ids, scores)
    return torch.multinomial(torch.softmax(scores, -1), num_samples=1)[:, 0]


def positive_count(value, name: str) -> int:
    """``value`` as an int ≥ 1 (a Python, numpy or 0-d torch integer), else a ValueError naming ``name``."""
    try:
        count = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return count
