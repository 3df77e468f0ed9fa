"""Datastore keys: which layer of a causal LM they come from and how to capture it.

The paper's code keys the datastore with the input of the last block's MLP: GPT-2's ``h[-1].ln_2``
output, GPT-NeoX's ``layers[-1].post_attention_layernorm`` output, Llama/Qwen/Mistral's
``layers[-1].post_attention_layernorm`` output. Any other decoder is keyed the same way without a table of its norms:
the input of its last block's MLP module, captured by a pre-hook (a path ending in ``:input``), which is right for
pre-norm blocks (Gemma 2/3's ``pre_feedforward_layernorm``), parallel ones (Phi, Falcon, GPT-J: the MLP reads the
block's input norm), post-norm ones (OLMo 2: the MLP reads the residual stream) and mixtures of experts alike. Blocks
whose MLP is inline (OPT, XGLM, BioGPT: ``fc1`` -> activation -> ``fc2``) are keyed by their first projection's input;
OPT feeds it flattened rows ``[B*T, d]``, viewed back as the block's ``[B, T, d]``. The same layer must serve the
datastore and live kNN-LM queries, so both go through :class:`KeyCapture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# The families whose datastores have recorded their pre-MLP norm's output since the first version (the same tensor
# as their MLP's input); every other family: :func:`last_mlp_path` + INPUT.
DEFAULT_KEY_LAYERS = {
    "gpt2": "transformer.h.-1.ln_2",
    "gpt_neox": "gpt_neox.layers.-1.post_attention_layernorm",
    "llama": "model.layers.-1.post_attention_layernorm",
    "qwen2": "model.layers.-1.post_attention_layernorm",
    "qwen3": "model.layers.-1.post_attention_layernorm",
    "mistral": "model.layers.-1.post_attention_layernorm",
}
INPUT = ":input"  # a layer path ending so names the module's input, not its output
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "mlp_block")  # a block's MLP, as families name it
INLINE_MLP_NAMES = ("fc1",)  # a block without an MLP module: its MLP's first projection (OPT, XGLM, BioGPT)


def default_key_layer(model: nn.Module) -> str:
    """The key layer of ``model`` (weights or a meta-device skeleton): its family's entry in the table, else the input
    of its last block's MLP."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_KEY_LAYERS:
        return DEFAULT_KEY_LAYERS[model_type]
    mlp = last_mlp_path(model)
    if mlp is None:
        raise ValueError(
            f"no default key layer for model type {model_type!r}: no list of blocks with an MLP child named one of "
            f"{MLP_NAMES + INLINE_MLP_NAMES}; pass --layer with a module path (its output is the key; end it in "
            f"{INPUT!r} for its input, e.g. 'model.layers.-1.mlp:input')."
        )
    return mlp + INPUT


def default_key_layer_of_config(config) -> str:
    """:func:`default_key_layer` from a config alone, on a weightless (meta-device) skeleton: no weights are read."""
    if config.model_type in DEFAULT_KEY_LAYERS:
        return DEFAULT_KEY_LAYERS[config.model_type]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return default_key_layer(AutoModelForCausalLM.from_config(config))


def last_mlp_path(model: nn.Module) -> str | None:
    """``<blocks>.-1.<mlp>``: in the text decoder (``get_decoder()``: an image-text model's language model, not its
    vision tower, which a text forward never runs), the first module list (in module order, so the blocks, not a
    block's experts) whose last block has an MLP child, else (an inline MLP) its first projection; None if there is
    none."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    # some models' get_decoder() is their LM head (ModernBERT's decoder): then the blocks are the whole model's
    for root in (decoder, model):
        for names in (MLP_NAMES, INLINE_MLP_NAMES):
            found = _last_block_child(model, root, names)
            if found is not None:
                return found
    return None


def _last_block_child(model: nn.Module, root: nn.Module, names: tuple[str, ...]) -> str | None:
    prefix = next((f"{name}." if name else "" for name, module in model.named_modules() if module is root), "")
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            children = dict(module[-1].named_children())
            found = next((child for child in names if isinstance(children.get(child), nn.Module)), None)
            if found is not None:
                return f"{prefix}{name}.-1.{found}"
    return None


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted ``path`` (its input: a path ending in ``:input``); integer parts index module lists
    and may be negative."""
    module, path = model, path.removesuffix(INPUT)
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
    """Captures the output of one module during a forward pass, or its input for a layer path ending in ``:input``
    (hooks, removed on exit). A module fed flattened rows (OPT's ``fc1``: ``[B*T, d]``) yields its value in the shape
    of its parent block's hidden states, ``[B, T, d]``, as every consumer indexes keys by batch and position."""

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.layer = layer or default_key_layer(model)
        self.module = resolve_layer(model, self.layer)
        path = self.layer.removesuffix(INPUT)
        self.block = resolve_layer(model, path.rsplit(".", 1)[0]) if "." in path else None
        self.value: torch.Tensor | None = None
        self._block_shape: torch.Size | None = None

    def _keep(self, value: torch.Tensor) -> None:
        shape = self._block_shape
        if value.dim() == 2 and shape is not None and len(shape) == 3 and value.shape[0] == shape[0] * shape[1]:
            value = value.view(shape[0], shape[1], value.shape[-1])  # [B*T, d] -> [B, T, d]
        self.value = value

    def _hook(self, _module, _inputs, output):
        self._keep(output[0] if isinstance(output, tuple) else output)

    def _input_hook(self, _module, args, kwargs):
        self._keep(first_tensor(args, kwargs))

    def _block_hook(self, _module, args, kwargs):
        self._block_shape = first_tensor(args, kwargs).shape

    @contextmanager
    def capturing(self) -> Iterator[KeyCapture]:
        if self.layer.endswith(INPUT):
            handles = [self.module.register_forward_pre_hook(self._input_hook, with_kwargs=True)]
        else:
            handles = [self.module.register_forward_hook(self._hook)]
        if self.block is not None:
            handles.append(self.block.register_forward_pre_hook(self._block_hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's hidden states: its first positional argument, or (called by keyword) its first tensor argument."""
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head: computing keys needs no vocabulary projection."""
    return getattr(model, "base_model", model)
