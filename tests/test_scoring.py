"""The scoring core, each function once, against brute force: explicit sums with math.log, a loop over windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_memdec.inference.sliding_window import sliding_gold_log_probs
from lightning_memdec.kernels.scoring import (
    gold_log_probs,
    knn_gold_log_probs,
    knn_scores,
    mix_log_probs,
    perplexity,
    sweep_lambda,
    sweep_temperature,
    vocab_log_probs,
)


def test_knn_scores_softmax_is_the_knn_weight():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 50, (3, 6)).astype(np.float32)
    d[1, 2] = np.inf  # a missing neighbour weighs nothing
    for dtype in (np.float32, np.float64):
        w = np.exp(knn_scores(d.astype(dtype), 4.0))
        assert w.dtype == dtype
        w /= w.sum(1, keepdims=True)
        for i in range(3):
            total = sum(math.exp(-float(x) / 4.0) for x in d[i])
            expected = [math.exp(-float(x) / 4.0) / total for x in d[i]]
            np.testing.assert_allclose(w[i], expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_knn_gold_log_probs_is_log_of_the_gold_neighbours_weight():
    d = np.array([[1.0, 2.0, 4.0, np.inf], [3.0, 3.0, 9.0, 1.0], [0.5, 7.0, 8.0, 9.0]])
    is_gold = np.array([[True, False, True, True], [False, False, False, False], [False, True, True, False]])
    got = knn_gold_log_probs(d, is_gold, 2.0)
    assert got.dtype == torch.float64
    for i in range(3):
        weights = [math.exp(-x / 2.0) for x in d[i]]
        gold = sum(w for w, g in zip(weights, is_gold[i]) if g)
        expected = math.log(gold / sum(weights)) if gold > 0 else -math.inf
        assert float(got[i]) == pytest.approx(expected, rel=1e-12)


def test_vocab_log_probs_gives_padding_rows_no_mass():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float16)  # a half-precision head of 7 rows, a 5-token vocabulary
    got = vocab_log_probs(logits, vocab=5)
    assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            row = [float(x) for x in logits[b, t, :5]]
            total = sum(math.exp(x) for x in row)
            for v in range(5):
                assert float(got[b, t, v]) == pytest.approx(math.log(math.exp(row[v]) / total), abs=1e-6)
    labels = torch.tensor([[0, 4, 3], [2, 1, 1]])  # the gold-only path agrees with the dense one
    gold = got.gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(gold_log_probs(logits, labels, vocab=5), gold, atol=1e-6)


def test_gold_log_probs_renormalises_over_the_tokenizer_ids():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)  # a head of 7 rows padded beyond a 5-token vocabulary
    labels = torch.tensor([[0, 4, -100], [2, -100, 1]])
    got = gold_log_probs(logits, labels, vocab=5)
    for b in range(2):
        for t in range(3):
            gold = int(labels[b, t])
            if gold == -100:
                assert got[b, t] == 0.0
                continue
            row = logits[b, t].tolist()[:5]
            expected = math.log(math.exp(row[gold]) / sum(math.exp(x) for x in row))
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-6)


def test_mix_log_probs_is_the_mixture_with_exact_endpoints():
    p = [0.5, 0.5, 0.0, 0.2]
    q = [0.0, 0.25, 0.75, 0.0]
    base, other = torch.tensor(p, dtype=torch.float64).log(), torch.tensor(q, dtype=torch.float64).log()
    for lmbda in (0.3, 0.9):
        out = mix_log_probs(base, other, lmbda)
        expected = [math.log((1 - lmbda) * a + lmbda * b) for a, b in zip(p, q)]
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
        with torch.enable_grad():  # the autograd path gives the same values
            grad_out = mix_log_probs(base.clone().requires_grad_(), other, lmbda)
        torch.testing.assert_close(grad_out.detach(), out)
    # λ = 0 is the base and λ = 1 the other, the very tensors: no log(0) = −inf round trip, no NaN
    assert mix_log_probs(base, other, 0.0) is base
    assert mix_log_probs(base, other, 1.0) is other
    with pytest.raises(ValueError, match="lmbda must be in"):
        mix_log_probs(base, other, 1.5)


def test_perplexity_is_exp_of_the_mean_nll():
    lp = np.log([0.5, 0.25, 0.125])
    assert perplexity(lp) == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.25) + math.log(0.125)) / 3))
    with pytest.raises(ValueError, match="empty"):
        perplexity(np.zeros(0))


def test_lambda_sweep_picks_the_argmin():
    rng = np.random.default_rng(0)
    base = np.log(rng.uniform(0.01, 0.5, 500))
    other = np.log(rng.uniform(0.01, 0.9, 500))
    grid = [0.1, 0.3, 0.5, 0.7, 0.9]
    best, ppls = sweep_lambda(base, other, grid)
    direct = [math.exp(-np.mean(np.log((1 - x) * np.exp(base) + x * np.exp(other)))) for x in grid]
    np.testing.assert_allclose(ppls, direct, rtol=1e-10)
    assert best == grid[int(np.argmin(direct))]
    with pytest.raises(ValueError, match="empty"):
        sweep_lambda(base, other, [])
    # ties go to the first candidate, as documented: temperatures whose p_kNN are the same arrays
    chosen = sweep_temperature(base, {8.0: other, 2.0: other.copy(), 4.0: other + 0.0}, grid)
    assert chosen["temperature"] == 8.0


@pytest.mark.parametrize("n_tokens, window, stride", [(50, 12, 5), (50, 12, 12), (9, 12, 4)])
def test_sliding_windows_score_every_position_once_with_enough_context(n_tokens, window, stride):
    """A bigram 'model' gives each position a known log-prob; a second output reports the context it had."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 7, n_tokens)
    table = torch.log_softmax(torch.randn(7, 7, dtype=torch.float64), -1)  # log p(next | previous)
    calls = []

    def score(input_ids, labels):
        calls.append(input_ids.shape)
        lp = table[input_ids, labels.clamp(min=0)].masked_fill(labels == -100, 0.0)
        context = torch.arange(1, input_ids.shape[1] + 1, dtype=torch.float64).expand_as(lp)
        return {"bigram": lp, "context": context}

    out = sliding_gold_log_probs(tokens, window, stride, batch_size=2, score=score)
    expected = [float(table[tokens[i], tokens[i + 1]]) for i in range(n_tokens - 1)]
    np.testing.assert_allclose(out["bigram"], expected, rtol=1e-12)
    w = min(window, n_tokens - 1)
    for i, context in enumerate(out["context"]):
        assert context >= min(i + 1, w - min(stride, w) + 1)  # the first window's positions have all there is
    assert all(shape[1] == w and shape[0] <= 2 for shape in calls)
