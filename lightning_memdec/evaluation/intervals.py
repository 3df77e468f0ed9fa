"""Bootstrap intervals over units (documents for perplexity, examples for accuracy), alone and paired, defined once.

Positions of one document are not independent (a repeated name, a memorised abstract), so the unit resampled is the
document: draw the split's documents with replacement, and the resampled perplexity is exp(mean NLL over the drawn
documents' positions, a document drawn twice counting twice). The interval is the 2.5 … 97.5 % quantile range of
``RESAMPLES`` draws with a fixed seed. A paired interval of a difference uses the same draws for both models, so
what the two share (hard documents) cancels. A mean over examples (an accuracy) is resampled the same way, with
the example as the unit (:func:`bootstrap_means`). Fewer than :data:`MIN_UNITS` units give no interval (NaN: every
draw would be the one unit, a zero-width range that reads as certainty).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "RESAMPLES",
    "MIN_UNITS",
    "SEED",
    "LEVEL",
    "document_sums",
    "resample_counts",
    "bootstrap_perplexities",
    "bootstrap_means",
    "interval",
]

RESAMPLES = 1000
MIN_UNITS = 2
SEED = 0
LEVEL = 0.95
_BLOCK = 100  # resamples per block: memory stays O(block × documents)


def document_sums(log_probs: np.ndarray, offsets: np.ndarray, keep: np.ndarray | None = None):
    """Per document: the sum of −log p(gold) over its positions and how many there are ``([docs], [docs])``.

    Position ``i`` predicts token ``i + 1`` and belongs to that token's document (``offsets`` are token offsets).
    ``keep`` [positions] bool restricts the sums to some positions (e.g. outside repeated spans).
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    weights = np.ones(len(log_probs)) if keep is None else np.asarray(keep, dtype=np.float64)
    doc = np.searchsorted(np.asarray(offsets), np.arange(1, len(log_probs) + 1), side="right") - 1
    docs = len(offsets) - 1
    nll = np.bincount(doc, weights=np.where(weights > 0, -log_probs, 0.0), minlength=docs)
    return nll, np.bincount(doc, weights=weights, minlength=docs)


def resample_counts(documents: int, resamples: int = RESAMPLES, seed: int = SEED):
    """Blocks of ``[block, documents]`` counts: how often each document is drawn in each resample."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _BLOCK):
        rows = min(_BLOCK, resamples - start)
        draws = rng.integers(0, documents, size=(rows, documents))
        flat = (draws + documents * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * documents).reshape(rows, documents).astype(np.float64)


def bootstrap_perplexities(sums: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = SEED):
    """``[len(sums), resamples]`` perplexities, every row resampled with the same document draws (paired)."""
    documents = len(sums[0][0])
    if documents < MIN_UNITS:
        return np.full((len(sums), resamples), np.nan)
    out = []
    for counts in resample_counts(documents, resamples, seed):
        out.append(np.stack([_perplexities(counts, nll, n) for nll, n in sums]))
    return np.concatenate(out, axis=1)


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``[columns, resamples]`` means of each column of ``values`` ``[units, columns]``, every column resampled
    with the same draws of units (paired: a difference of two rows is the bootstrap of the paired difference)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"need values [units, columns] with at least one unit, got shape {values.shape}.")
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}.")
    if values.shape[0] < MIN_UNITS:
        return np.full((values.shape[1], resamples), np.nan)
    blocks = [counts @ values / values.shape[0] for counts in resample_counts(values.shape[0], resamples, seed)]
    return np.concatenate(blocks, axis=0).T


def _perplexities(counts: np.ndarray, nll: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """exp(Σ counts·nll / Σ counts·positions) per resample; infinite when a drawn document has p(gold) = 0."""
    finite = np.isfinite(nll)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ppl = np.exp((counts @ np.where(finite, nll, 0.0)) / (counts @ positions))
    ppl[counts @ (~finite).astype(np.float64) > 0] = np.inf
    return ppl


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central ``level`` quantile range of bootstrap values (numpy's default, linear quantiles).

    Where a drawn document has p(gold) = 0 some values are infinite, and a linear quantile between a finite and an
    infinite value is undefined (inf − inf); there that bound is the order statistic on its outer side (lower bound:
    the lower one, upper bound: the higher), so the interval is ``[finite, ∞]`` or ``[∞, ∞]`` rather than NaN. NaN
    remains only where the values hold NaN (the difference of two infinite perplexities). report.json writes both as
    null.
    """
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        low, high = (float(q) for q in np.quantile(values, [tail, 1.0 - tail]))
        if np.isnan(low):  # an infinite neighbour (or NaN values, which stay NaN)
            low = float(np.quantile(values, tail, method="lower"))
        if np.isnan(high):
            high = float(np.quantile(values, 1.0 - tail, method="higher"))
    return [low, high]
