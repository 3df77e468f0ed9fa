"""Datastore keys: which layer of a causal LM they come from and how to capture it.

The paper's code keys the datastore with the input of the last block's MLP: GPT-2's ``h[-1].ln_2``
output, GPT-NeoX's ``layers[-1].post_attention_layernorm`` output, Llama/Qwen/Mistral's
``layers[-1].post_attention_layernorm`` output. The same layer must serve the datastore and live kNN-LM
queries, so both go through :class:`KeyCapture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_KEY_LAYERS = {
    "gpt2": "transformer.h.-1.ln_2",
    "gpt_neox": "gpt_neox.layers.-1.post_attention_layernorm",
    "llama": "model.layers.-1.post_attention_layernorm",
    "qwen2": "model.layers.-1.post_attention_layernorm",
    "qwen3": "model.layers.-1.post_attention_layernorm",
    "mistral": "model.layers.-1.post_attention_layernorm",
}


def default_key_layer(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_KEY_LAYERS:
        raise ValueError(
            f"no default key layer for model type {model_type!r}; pass --layer with a module path "
            f"(e.g. 'model.layers.-1.post_attention_layernorm'). Known types: {sorted(DEFAULT_KEY_LAYERS)}."
        )
    return DEFAULT_KEY_LAYERS[model_type]


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted ``path``; integer parts index module lists and may be negative."""
    module = model
    for i, part in enumerate(path.split(".")):
        try:
            if part.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
                module = module[int(part)]
            else:
                module = getattr(module, part)
                if not isinstance(module, nn.Module):
                    raise AttributeError(part)
        except (AttributeError, IndexError):
            prefix = ".".join(path.split(".")[:i])
            children = [name for name, _ in module.named_children()]
            raise ValueError(
                f"unknown layer path {path!r}: {prefix or 'the model'} has no child {part!r}; "
                f"its children are {children[:20]}."
            ) from None
    return module


class KeyCapture:
    """Captures the output of one module during a forward pass (a forward hook, removed on exit)."""

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.layer = layer or default_key_layer(model)
        self.module = resolve_layer(model, self.layer)
        self.value: torch.Tensor | None = None

    def _hook(self, _module, _inputs, output):
        self.value = output[0] if isinstance(output, tuple) else output

    @contextmanager
    def capturing(self) -> Iterator[KeyCapture]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


def body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: computing keys needs no vocabulary projection."""
    return getattr(model, "base_model", model)
