"""The flat module paths of release 0.1 (``lightning_memdec.scoring`` …), kept importable for one release.

Each old name is an alias of the module that now holds its code, found by a meta-path finder, so old imports,
old YAML ``class_path`` values and old checkpoints' hyper-parameters still resolve, with a DeprecationWarning
naming the new path. Names that moved to a second module (e.g. ``scoring.sliding_gold_log_probs``, now in
``inference.sliding_window``) are reachable from their new module only. Three old paths share their names with
public functions (``evaluate``, ``quickstart``, ``downstream``): ``from lightning_memdec.evaluate import X`` works,
but ``import lightning_memdec.evaluate as m`` binds the public function (the package attribute wins). Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD_TO_NEW = {
    "artifacts": "io.artifact_dirs",
    "assets": "io.embedded",
    "callbacks": "training.callbacks",
    "configs": "io.packaged_configs",
    "corpus": "io.token_corpus",
    "corpus_sources": "io.text_sources",
    "data": "training.datamodule",
    "datastore": "stages.datastore",
    "downstream": "evaluation.downstream",
    "downstream_report": "evaluation.downstream_report",
    "downstream_tasks": "evaluation.downstream_tasks",
    "evaluate": "evaluation.evaluate",
    "exact_search": "retrieval.exact_search",
    "hf_generation": "hf.paired_generation",
    "index": "retrieval.faiss_index",
    "index_plan": "retrieval.index_plan",
    "interpolate": "inference.interpolated_lm",
    "keys": "hf.key_capture",
    "knnlm": "inference.knnlm",
    "lm_eval_bridge": "evaluation.lm_eval_bridge",
    "losses": "kernels.memdec_loss",
    "models": "hf.loading",
    "module": "training.lightning_module",
    "npy_rows": "io.npy_rows",
    "pretrain": "apps.pretrain_bases",
    "quickstart": "apps.quickstart",
    "quickstart_report": "apps.quickstart_report",
    "quickstart_stages": "apps.quickstart_stages",
    "report": "evaluation.report",
    "resources": "io.capacity",
    "scoring": "kernels.scoring",
    "sharded": "stages.chunked_predict",
    "sparse": "kernels.sparse_targets",
    "sparse_torch": "kernels.sparse_targets_torch",
    "store": "io.readers",
    "target_chunks": "stages.target_chunks",
    "targets": "stages.targets",
    "timing": "evaluation.latency",
    "train": "training.fit",
    "vocab": "training.vocab_transfer",
}
PREFIX = "lightning_memdec."


class LegacyPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``lightning_memdec.<old>`` to the module it moved to (the very same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(PREFIX) if fullname.startswith(PREFIX) else None
        if old not in OLD_TO_NEW:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = PREFIX + OLD_TO_NEW[spec.name.removeprefix(PREFIX)]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in 0.3", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):  # the module it aliases is already executed
        pass


def install() -> None:
    if not any(isinstance(f, LegacyPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LegacyPathFinder())  # before the path finder: `assets` is also a data folder
