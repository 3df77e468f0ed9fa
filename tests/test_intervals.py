"""Bootstrap intervals over documents against a direct, slow loop over resamples."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_memdec.evaluation.intervals import (
    RESAMPLES,
    SEED,
    bootstrap_perplexities,
    document_sums,
    interval,
    resample_counts,
)
from lightning_memdec.evaluation.row_figures import row_intervals


def slow_bootstrap(log_probs: np.ndarray, offsets: np.ndarray, draws: np.ndarray, keep=None) -> np.ndarray:
    """Per resample: concatenate the drawn documents' positions (position i belongs to token i + 1's document)."""
    doc_of = [int(np.searchsorted(offsets, i + 1, side="right") - 1) for i in range(len(log_probs))]
    keep = np.ones(len(log_probs), bool) if keep is None else keep
    out = []
    for row in draws:
        picked = [log_probs[i] for d in row for i in range(len(log_probs)) if doc_of[i] == d and keep[i]]
        out.append(float(np.exp(-np.mean(picked))))
    return np.array(out)


def same_draws(documents: int) -> np.ndarray:
    """The document indices resample_counts counts, drawn by the same generator calls."""
    rng = np.random.default_rng(SEED)
    return np.concatenate([rng.integers(0, documents, size=(min(100, RESAMPLES - s), documents))
                           for s in range(0, RESAMPLES, 100)])  # fmt: skip


@pytest.fixture
def small():
    rng = np.random.default_rng(3)
    offsets = np.array([0, 5, 9, 20, 26, 33, 40])
    a = -rng.gamma(2.0, 1.5, size=39)
    b = a + rng.normal(0.2, 0.3, size=39)
    return offsets, a, b


def test_counts_are_the_drawn_documents():
    draws = same_draws(7)
    counts = np.concatenate(list(resample_counts(7)))
    np.testing.assert_array_equal(counts, np.stack([np.bincount(r, minlength=7) for r in draws]))


def test_bootstrap_equals_a_slow_loop_and_pairs_the_draws(small):
    offsets, a, b = small
    keep = np.arange(len(a)) % 3 != 0
    draws = same_draws(len(offsets) - 1)[:60]
    for mask in (None, keep):
        fast = bootstrap_perplexities([document_sums(a, offsets, mask), document_sums(b, offsets, mask)])
        np.testing.assert_allclose(fast[0, :60], slow_bootstrap(a, offsets, draws, mask), rtol=1e-12)
        np.testing.assert_allclose(fast[1, :60], slow_bootstrap(b, offsets, draws, mask), rtol=1e-12)
    figures = row_intervals({"memdec_ppl": b, "base_ppl": a}, offsets)
    full = np.stack([slow_bootstrap(x, offsets, same_draws(len(offsets) - 1)) for x in (b, a)])
    assert figures["intervals"]["memdec_ppl"] == pytest.approx(list(np.quantile(full[0], [0.025, 0.975])))
    diff = figures["differences"]["memdec_ppl - base_ppl"]
    assert diff["interval"] == pytest.approx(list(np.quantile(full[0] - full[1], [0.025, 0.975])))
    assert diff["difference"] == pytest.approx(np.exp(-b.mean()) - np.exp(-a.mean()))
    assert diff["interval"][0] <= diff["difference"] <= diff["interval"][1]


def test_a_document_with_zero_probability_makes_its_resamples_infinite(small):
    offsets, a, _ = small
    a = a.copy()
    a[6] = -np.inf  # in document 1
    ppl = bootstrap_perplexities([document_sums(a, offsets)])[0]
    drawn = same_draws(len(offsets) - 1)
    np.testing.assert_array_equal(np.isinf(ppl), (drawn == 1).any(axis=1))
    assert interval(np.array([1.0, 2.0, 3.0]), 0.5) == [1.5, 2.5]


def test_a_bound_next_to_an_infinite_resample_is_its_outer_order_statistic():
    # Linear quantiles: position q·(n − 1) between sorted values; next to ∞ that is undefined (inf − inf).
    values = np.array([3.0, np.inf, 1.0, 2.0, np.inf])  # sorted: 1, 2, 3, inf, inf
    low, high = interval(values, 0.5)  # positions 1.0 and 3.0 of 0 … 4: exact order statistics
    assert (low, high) == (2.0, np.inf)
    low, high = interval(values, 0.6)  # positions 0.8 (between 1 and 2) and 3.2 (between inf and inf)
    assert low == pytest.approx(1.8) and high == np.inf
    low, high = interval(np.array([1.0, 2.0, np.inf, np.inf]), 0.5)  # positions 0.75 and 2.25: 1.75 and inf
    assert low == pytest.approx(1.75) and high == np.inf
    low, high = interval(np.array([1.0, np.inf, np.inf]), 0.0)  # position 1.0 both: inf (no interpolation)
    assert (low, high) == (np.inf, np.inf)
    low, high = interval(np.array([1.0, 5.0, np.inf]), 0.2)  # positions 0.8 and 1.2: 4.2, then 5..inf -> inf
    assert low == pytest.approx(4.2) and high == np.inf
    low, high = interval(np.array([1.0, 5.0, np.inf]), 0.6)  # positions 0.4 and 1.6: 2.6, then 5..inf undefined
    assert low == pytest.approx(2.6) and high == np.inf  # (numpy's lerp there is NaN: the order statistic above)
    low, high = interval(np.array([np.inf, np.inf, np.inf]))  # every resample infinite: [inf, inf], not NaN
    assert (low, high) == (np.inf, np.inf)
    assert all(np.isnan(interval(np.array([1.0, np.nan, 2.0]))))  # NaN values (inf − inf differences) stay NaN


def test_the_intervals_table_shows_infinite_bounds_and_says_why():
    from lightning_memdec.evaluation.report import interval_table

    offsets = np.array([0, 5, 9, 20, 26, 33, 40])
    base = -np.random.default_rng(0).gamma(2.0, 1.5, size=39)
    knn = base.copy()
    knn[[3, 12]] = -np.inf  # p_kNN(gold) = 0 in documents 0 and 2
    figures = row_intervals({"base_ppl": base, "knn_alone_ppl": knn}, offsets)
    bounds = figures["intervals"]["knn_alone_ppl"]
    assert bounds[1] == np.inf and not np.isnan(bounds[0])
    row = {"base": "b", "base_ppl": float(np.exp(-base.mean())), "knn_alone_ppl": np.inf, "all_positions": figures}
    text = "\n".join(interval_table({"rows": [row]}))
    assert "| b | kNN alone | ∞ [" in text and "nan" not in text
    assert "∞: p(gold) = 0 at some positions" in text
    finite = {"base": "b", "base_ppl": row["base_ppl"], "all_positions": row_intervals({"base_ppl": base}, offsets)}
    assert "∞" not in "\n".join(interval_table({"rows": [finite]}))


def test_one_document_gives_no_interval_and_no_goal_is_met_on_it():
    """Every draw of one document is that document: a zero-width "95 % interval" would read as certainty."""
    from lightning_memdec.apps.quickstart_report import goals
    from lightning_memdec.evaluation.intervals import bootstrap_means
    from lightning_memdec.evaluation.report import interval_table

    rng = np.random.default_rng(0)
    base, memdec = -rng.gamma(2.0, 1.5, size=30), -rng.gamma(2.0, 1.0, size=30)
    one = np.array([0, 31])
    draws = bootstrap_perplexities([document_sums(base, one), document_sums(memdec, one)])
    assert draws.shape == (2, RESAMPLES) and np.isnan(draws).all()
    assert np.isnan(interval(draws[1] - draws[0])).all()
    assert np.isnan(bootstrap_means(np.ones((1, 3)))).all() and not np.isnan(bootstrap_means(np.ones((2, 3)))).any()
    two = np.array([0, 12, 31])  # two documents are enough for an interval, the slow loop's
    draws = bootstrap_perplexities([document_sums(memdec, two)])
    np.testing.assert_allclose(draws[0], slow_bootstrap(memdec, two, same_draws(2)), rtol=1e-12)
    figures = row_intervals({"base_ppl": base, "memdec_ppl": memdec}, one)
    row = {"base": "b", "base_ppl": float(np.exp(-base.mean())), "memdec_ppl": float(np.exp(-memdec.mean()))}
    text = "\n".join(interval_table({"rows": [{**row, "all_positions": figures}]}))
    assert " [—, —]" in text and "nan" not in text
    ce = {"difference": -3.0, "interval": [float("nan")] * 2}
    report = {
        "lambda_grid": [0.0, 1.0],
        "rows": [{**row, "all_positions": {"differences": {"memdec_ppl - ce_only_ppl": ce}}}],
    }
    assert not goals(report)["b"]["paired 95 % interval of MemDec − CE-only below zero"]["met"]
