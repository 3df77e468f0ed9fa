"""One sliding-window pass gives the gold log-probs and the kNN-LM queries: against the direct computations."""

from __future__ import annotations

import functools

import numpy as np
import torch

from lightning_memdec.inference.sliding_window import corpus_scores, first_scored_column, lm_scorer
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.token_corpus import Corpus, position_windows


def test_scoring_projects_only_scored_columns_and_matches_full_logits(tiny_gpt2):
    """The head runs from the batch's first scored column on (logits_to_keep); the gold log-probs equal a full
    forward's log_softmax gathered at the labels, and unscored columns stay 0."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (3, 24))
    labels = torch.randint(0, 50257, (3, 24))
    labels[:, :10] = -100
    labels[1, :14] = -100  # rows may start later; the union is kept
    seen = {}
    forward = model.forward

    @functools.wraps(forward)  # keeps forward's signature, which says that it takes logits_to_keep
    def spy(*args, **kwargs):
        seen["keep"] = kwargs.get("logits_to_keep")
        return forward(*args, **kwargs)

    model.forward = spy
    score = lm_scorer(model, 50257)
    got = score(ids, labels)["lm"]
    assert first_scored_column(labels) == 10 and seen["keep"].tolist() == list(range(10, 24))
    with torch.no_grad():
        full = torch.log_softmax(forward(input_ids=ids).logits.float(), -1)
    want = full.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_pass_keys_equal_the_datastore_over_the_same_windows(tmp_path, biomed_corpus, biomed_datastore, tiny_gpt2):
    """corpus_scores(keys=True) at the datastore's window and stride returns, for every position, the key the
    datastore stored there (float16 both) and the same log-probs as scoring without keys (at the default stride,
    half the window); the caches round-trip."""
    corpus, store = Corpus(biomed_corpus), Datastore(biomed_datastore)
    caches = {"lm": tmp_path / "lm.npy", "keys": tmp_path / "keys.npy"}
    got = corpus_scores(str(tiny_gpt2), biomed_corpus, window=64, stride=32, batch_size=3, caches=caches, keys=True)
    again = corpus_scores("no-such-model", biomed_corpus, window=64, stride=32, caches=caches, keys=True)  # loaded
    assert all(np.array_equal(again[n], got[n]) for n in caches) and not list(tmp_path.glob("*.tmp*"))
    assert got["keys"].dtype == np.float16 and got["keys"].shape == (corpus.num_positions, store.keys.shape[1])
    np.testing.assert_allclose(got["keys"].astype(np.float32), np.asarray(store.keys, np.float32), atol=2e-3, rtol=2e-3)
    assert position_windows(corpus.num_positions, 64, 32).score_from.max() > 0  # windows overlap: keep is exercised
    plain = corpus_scores(str(tiny_gpt2), biomed_corpus, window=64, batch_size=3)  # stride: half the window
    np.testing.assert_allclose(got["lm"], plain["lm"], rtol=0, atol=1e-6)
    assert set(plain) == {"lm"}
