"""The general perplexity of every model and mixture a ``memdec downstream`` run uses, on one general text split.

A downstream gain means little if the mixture is a worse language model: each model is scored once over sliding
windows (log p(gold) per position), and each mixture is then array arithmetic at every λ its tasks chose
(``log((1 − λ)·p_base(gold) + λ·p_other(gold))``, :func:`kernels.scoring.mix_log_probs`), so adding λs costs no model
call. Intervals are the package's bootstrap over documents (:mod:`evaluation.intervals`), all figures on the same
draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_memdec.evaluation.intervals import bootstrap_perplexities, document_sums, interval
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.inference.knnlm import KNNLM, knnlm_scorer
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

__all__ = ["GeneralText"]


class GeneralText:
    """One general split, tokenized once; :meth:`score` / :meth:`score_knn` add models, :meth:`summary` reports."""

    def __init__(self, spec: str, tokenizer, max_tokens: int | None, window: int, batch_size: int):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"--general.text {spec}: the tokenizer has no EOS token to separate its documents.")
        self.spec, self.batch_size = spec, batch_size
        self.tokens = text_tokens(spec, tokenizer, max_tokens)
        self.offsets = split_document_offsets(spec, self.tokens, tokenizer.eos_token_id)
        self.window = min(window, len(self.tokens) - 1)
        self.stride = max(1, self.window // 2)
        self.log_probs: dict[str, np.ndarray] = {}

    def _run(self, scorer, desc: str) -> dict[str, np.ndarray]:
        return sliding_gold_log_probs(self.tokens, self.window, self.stride, self.batch_size, scorer, desc=desc)

    def score(self, name: str, model, vocab: int) -> None:
        """log p(gold) of one causal LM, kept as ``name`` (scored once, however many mixtures use it)."""
        if name not in self.log_probs:
            self.log_probs[name] = self._run(lm_scorer(model, vocab, "lm"), f"general: {name}")["lm"]

    def score_knn(self, base: str, knn: str, knnlm: KNNLM) -> None:
        """The base's and p_kNN's log p(gold) from one pass with retrieval, kept as ``base`` and ``knn``."""
        got = self._run(knnlm_scorer(knnlm), f"general: {base} + kNN")
        self.log_probs[base], self.log_probs[knn] = got["base"], got["knn"]

    def summary(self, alone: list[str], mixtures: list[tuple], resamples: int, seed: int) -> dict[str, Any]:
        """Perplexity and 95 % interval of each model in ``alone`` and each ``(system, base, other, λ)`` mixture,
        all on the same ``resamples`` draws of documents."""
        arrays = {("model", name): self.log_probs[name] for name in alone}
        for system, base, other, lmbda in mixtures:
            mixed = mix_log_probs(torch.as_tensor(self.log_probs[base]), torch.as_tensor(self.log_probs[other]), lmbda)
            arrays[(system, f"{lmbda:g}")] = mixed.numpy()
        keys = list(arrays)
        draws = bootstrap_perplexities([document_sums(arrays[k], self.offsets) for k in keys], resamples, seed)
        figures = {k: {"ppl": perplexity(arrays[k]), "ci95": interval(draws[i])} for i, k in enumerate(keys)}
        out: dict[str, Any] = {
            "split": str(self.spec), "tokens": int(len(self.tokens)), "documents": int(len(self.offsets) - 1),
            "window": self.window, "stride": self.stride, "models": {}, "mixtures": {},
        }  # fmt: skip
        for (owner, label), figure in figures.items():
            if owner == "model":
                out["models"][label] = figure
            else:
                out["mixtures"].setdefault(owner, {})[label] = figure
        return out
