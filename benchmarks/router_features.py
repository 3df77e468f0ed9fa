"""Benchmark: the router's scoring pass (``fit-router``, ``evaluate --router``), full-width vs one-pass features.

Run: ``python benchmarks/router_features.py [--model embedded:base-small --text embedded:law/valid --tokens 20000]``.

The same model, text, window and stride (the quickstart's: 256, 192), each way timed once, one after the other, in
one process:

- ``full_width``: what ``router_scorer`` did before 2026-12-04: the LM head over every column, a ``[B, W, V]``
  log-softmax, then the entropy from ``entr(exp(log p))`` (two more ``[B, W, V]`` tensors) and the gold log-probs
  from a second logsumexp;
- ``one_pass``: ``inference.router.router_scorer`` now: the head from each batch's first scored column on
  (``logits_to_keep``), entropy, max log-prob and logsumexp from one exp pass over row chunks
  (``kernels.scoring.log_softmax_summary``).

Both must give the same gold log-probs and features (checked before any figure is printed). Prints ``name: value``
lines, the headline ``router_scoring_speedup`` = seconds(full_width) / seconds(one_pass) last.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import report, timed
from jsonargparse import CLI

from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.router import router_scorer
from lightning_memdec.inference.sliding_window import sliding_gold_log_probs
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.kernels.scoring import gold_log_probs, vocab_log_probs


def full_width_scorer(base, vocab: int):
    """The earlier router scorer, written out: every column through the head, full log-probs."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = base(input_ids=input_ids, output_hidden_states=True, return_dict=True, use_cache=False)
        log_probs = vocab_log_probs(out.logits, vocab)  # [B, W, V]
        entropy = torch.special.entr(log_probs.exp()).sum(-1, keepdim=True)
        top = log_probs.max(-1, keepdim=True).values
        features = torch.cat([out.hidden_states[-1].float(), entropy, top], dim=-1)
        return {"base": gold_log_probs(out.logits, labels, vocab), "features": features}

    return score


def main(
    model: str = "embedded:base-small",
    text: str = "embedded:law/valid",
    tokenizer: str = "gpt2",
    tokens: int = 20_000,
    window: int = 256,
    stride: int = 192,
    batch: int = 8,
) -> None:
    """Time both ways on the first ``tokens`` tokens of ``text`` with ``model`` (name or directory).

    Args:
        model: the base LM the router reads.
        text: text to score (a file, directory or ``embedded:`` split).
        tokenizer: the model's tokenizer (name or directory), to tokenize ``text``.
        tokens: tokens of ``text`` scored.
        window: sliding-window length.
        stride: new positions per window.
        batch: windows per forward.
    """
    base = load_causal_lm(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Corpus(tokenize([text], Path(tmp) / "corpus", tokenizer, max_tokens=tokens))
        ids, vocab = np.asarray(corpus.tokens), corpus.tokenizer["vocab_size"]

        def run(scorer):
            return sliding_gold_log_probs(ids, window, stride, batch, scorer, desc="router scoring")

        old, old_s = timed(lambda: run(full_width_scorer(base, vocab)))
        new, new_s = timed(lambda: run(router_scorer(base, None, vocab, features=True)))
    np.testing.assert_allclose(new["base"], old["base"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(new["features"], old["features"], rtol=1e-5, atol=1e-4)
    report("model", model)
    report("positions", corpus.num_positions)
    report("window", window)
    report("stride", stride)
    report("torch_threads", torch.get_num_threads())
    report("max_abs_feature_difference", float(np.abs(new["features"] - old["features"]).max()))
    report("full_width_seconds", old_s)
    report("one_pass_seconds", new_s)
    report("router_scoring_speedup", old_s / new_s)


if __name__ == "__main__":
    CLI(main)
