"""Benchmark: scoring a split for the kNN-LM rows, two passes (full logits, then a query datastore) vs one.

Run: ``python benchmarks/scoring.py [--model embedded:base-large --text embedded:biomed/test --tokens 30000]``.

What the quickstart did before 2026-12-03 for every base and split, and what it does now, on the same model, text,
window and stride (the quickstart's: 256, 192), each timed once, one after the other, in one process:

- ``two_pass``: a sliding-window forward with the LM head over every column (``model(...).logits``, then the gold
  log-probs), then ``build_datastore`` over the same windows for the kNN-LM's query keys (a second forward);
- ``one_pass``: ``inference.sliding_window.corpus_scores(keys=True)``: the head only from each batch's first scored
  column (``logits_to_keep``), the keys captured by a hook during the same forward.

Both must give the same log-probs and keys (checked before any figure is printed). Prints ``name: value`` lines, the
headline ``scoring_speedup`` = seconds(two_pass) / seconds(one_pass) last.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import report, timed
from jsonargparse import CLI

from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.sliding_window import corpus_scores, sliding_gold_log_probs
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.kernels.scoring import gold_log_probs
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, Windows


def two_pass(model_ref: str, corpus: Path, window: int, stride: int, batch: int, work: Path) -> dict[str, np.ndarray]:
    """The earlier quickstart's way: full-width logits while scoring, then a query datastore (a second forward)."""
    model = load_causal_lm(model_ref).eval()
    vocab = Corpus(corpus).tokenizer["vocab_size"]

    def full_head(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lm": gold_log_probs(model(input_ids=input_ids, use_cache=False).logits, labels, vocab)}

    tokens = np.asarray(Corpus(corpus).tokens)
    lm = sliding_gold_log_probs(tokens, window, stride, batch, full_head, desc="two-pass scoring")["lm"]
    store = build_datastore(corpus, model_ref, work / "queries", windows=Windows(window=window, stride=stride,
                            batch_size=16), hardware=Hardware(accelerator="cpu"))  # fmt: skip
    return {"lm": lm, "keys": np.asarray(Datastore(store).keys)}


def main(
    model: str = "embedded:base-large",
    text: str = "embedded:biomed/test",
    tokenizer: str = "gpt2",
    tokens: int = 30_000,
    window: int = 256,
    stride: int = 192,
    batch: int = 8,
) -> None:
    """Time both ways on the first ``tokens`` tokens of ``text`` with ``model`` (name or directory).

    Args:
        model: causal LM whose log-probs and keys are computed.
        text: text to score (a file, directory or ``embedded:`` split).
        tokenizer: the model's tokenizer (name or directory), to tokenize ``text``.
        tokens: tokens of ``text`` scored.
        window: sliding-window length.
        stride: new positions per window.
        batch: windows per forward.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = tokenize([text], work / "corpus", tokenizer, max_tokens=tokens)
        old, old_s = timed(lambda: two_pass(model, corpus, window, stride, batch, work))
        new, new_s = timed(lambda: corpus_scores(model, corpus, window, stride, batch, keys=True))
        np.testing.assert_allclose(new["lm"], old["lm"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(new["keys"].astype(np.float32), old["keys"].astype(np.float32), atol=2e-2)
        report("model", model)
        report("positions", Corpus(corpus).num_positions)
        report("window", window)
        report("stride", stride)
        report("torch_threads", torch.get_num_threads())
        report("max_abs_log_prob_difference", float(np.abs(new["lm"] - old["lm"]).max()))
        report("two_pass_seconds", old_s)
        report("one_pass_seconds", new_s)
        report("scoring_speedup", old_s / new_s)


if __name__ == "__main__":
    CLI(main)
