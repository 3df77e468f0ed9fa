"""lightning_memdec: the Memory Decoder (Cao et al., 2025) as a PyTorch Lightning package.

The public API is importable from here (``from lightning_memdec import InterpolatedLM, fit``); each name is
loaded on first use, so ``import lightning_memdec`` stays cheap and the ``memdec`` command starts fast.
The layers, bottom to top, and what each may import, are in docs/module-map.md (checked by tests/test_structure.py).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING

from lightning_memdec import legacy_paths

__version__ = "0.1.0"

# PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when THP_MEM_ALLOC_ENABLE is set before its
# first allocation: every fresh [B, T, V] logits or loss buffer then takes 512x fewer page faults (training steps and
# scoring 1.12x faster on 2 cores: benchmarks/cpu_allocator.py). A value already in the environment wins; importing
# torch before lightning_memdec leaves torch as it started.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# public name -> the module that defines it
PUBLIC_API = {
    "InterpolatedLM": "lightning_memdec.inference.interpolated_lm",
    "KNNLM": "lightning_memdec.inference.knnlm",
    "StaticGenerator": "lightning_memdec.inference.static_generation",
    "MemoryDecoderModule": "lightning_memdec.training.lightning_module",
    "MemDecDataModule": "lightning_memdec.training.datamodule",
    "CrossModelEval": "lightning_memdec.training.callbacks",
    "ExportHuggingFace": "lightning_memdec.training.callbacks",
    "TrainingThroughput": "lightning_memdec.training.throughput",
    "fit": "lightning_memdec.training.fit",
    "transfer_vocab": "lightning_memdec.training.vocab_transfer",
    "tokenize": "lightning_memdec.io.token_corpus",
    "build_datastore": "lightning_memdec.stages.datastore",
    "build_index": "lightning_memdec.retrieval.faiss_index",
    "build_targets": "lightning_memdec.stages.targets",
    "evaluate": "lightning_memdec.evaluation.evaluate",
    "downstream": "lightning_memdec.evaluation.downstream",
    "quickstart": "lightning_memdec.apps.quickstart",
    "load_causal_lm": "lightning_memdec.hf.loading",
}
__all__ = [  # the public API; PUBLIC_API says where each name lives
    "__version__",
    "InterpolatedLM",
    "KNNLM",
    "StaticGenerator",
    "MemoryDecoderModule",
    "MemDecDataModule",
    "CrossModelEval",
    "ExportHuggingFace",
    "TrainingThroughput",
    "fit",
    "transfer_vocab",
    "tokenize",
    "build_datastore",
    "build_index",
    "build_targets",
    "evaluate",
    "downstream",
    "quickstart",
    "load_causal_lm",
]

legacy_paths.install()

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name loads lazily in __getattr__
    from lightning_memdec.apps.quickstart import quickstart
    from lightning_memdec.evaluation.downstream import downstream
    from lightning_memdec.evaluation.evaluate import evaluate
    from lightning_memdec.hf.loading import load_causal_lm
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM
    from lightning_memdec.inference.knnlm import KNNLM
    from lightning_memdec.inference.static_generation import StaticGenerator
    from lightning_memdec.io.token_corpus import tokenize
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.targets import build_targets
    from lightning_memdec.training.callbacks import CrossModelEval, ExportHuggingFace
    from lightning_memdec.training.datamodule import MemDecDataModule
    from lightning_memdec.training.fit import fit
    from lightning_memdec.training.lightning_module import MemoryDecoderModule
    from lightning_memdec.training.throughput import TrainingThroughput
    from lightning_memdec.training.vocab_transfer import transfer_vocab


def __getattr__(name: str):
    if name in PUBLIC_API:
        value = getattr(importlib.import_module(PUBLIC_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_memdec' has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package's module object. Three public functions share their names with 0.1 module paths (``evaluate``,
    ``quickstart``, ``downstream``: :mod:`legacy_paths`); importing such a path makes the import system set the
    package's attribute to the module, after which ``lightning_memdec.evaluate`` was a module, not the function.
    The public name wins (``from lightning_memdec.evaluate import X`` still works: it reads ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in PUBLIC_API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
