"""The general perplexity of every model and mixture a ``memdec downstream`` run uses, on one general text split.

A downstream gain means little if the mixture is a worse language model: each model is scored once over sliding
windows (log p(gold) per position), and each mixture is then array arithmetic at every λ its tasks chose
(``log((1 − λ)·p_base(gold) + λ·p_other(gold))``, :func:`kernels.scoring.mix_log_probs`), so adding λs costs no model
call; a kNN-LM is scored at every temperature its tasks may choose, from one search. Intervals are the package's
bootstrap over documents (:mod:`evaluation.intervals`), all figures on the same draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_memdec.evaluation.intervals import bootstrap_perplexities, document_sums, interval
from lightning_memdec.evaluation.knn_temperature import knn_key, knn_temperatures_scorer
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

__all__ = ["GeneralText", "knn_model_name", "mixture_label"]


def knn_model_name(base: str, temperature: float) -> str:
    """The name p_kNN of ``base``'s datastore at one temperature is kept (and reported) under."""
    return f"kNN-LM of {base} at T={float(temperature):g}"


def mixture_label(lmbda: float, temperature: float | None = None) -> str:
    """A mixture's label in the report: its λ, and a kNN-LM's temperature (two tasks may choose one λ at two T)."""
    return f"{lmbda:g}" if temperature is None else f"{lmbda:g} at T={float(temperature):g}"


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

    def score_knn(self, base: str, knnlm: KNNLM, temperatures: list[float]) -> None:
        """The base's and p_kNN's log p(gold) at each temperature from one pass with retrieval, kept as ``base`` and
        :func:`knn_model_name`."""
        got = self._run(knn_temperatures_scorer(knnlm, temperatures), f"general: {base} + kNN")
        self.log_probs[base] = got["base"]
        for t in temperatures:
            self.log_probs[knn_model_name(base, t)] = got[knn_key(t)]

    def summary(self, alone: list[str], mixtures: list[tuple], resamples: int, seed: int) -> dict[str, Any]:
        """Perplexity and 95 % interval of each model in ``alone`` and each ``(system, base, other, λ, kNN T or
        None)`` mixture (labelled by :func:`mixture_label`), all on the same ``resamples`` draws of documents."""
        arrays = {("model", name): self.log_probs[name] for name in alone}
        for system, base, other, lmbda, temperature in mixtures:
            mixed = mix_log_probs(torch.as_tensor(self.log_probs[base]), torch.as_tensor(self.log_probs[other]), lmbda)
            arrays[(system, mixture_label(lmbda, temperature))] = mixed.numpy()
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
