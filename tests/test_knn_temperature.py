"""One λ and temperature policy: evaluate sweeps kernels.scoring's 0 … 1 grid and chooses the kNN temperature on
valid by the quickstart's rule; the one-pass multi-temperature scorer equals a KNNLM at each temperature."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import knnlm_scorer

from lightning_memdec.evaluation.evaluate import evaluate, text_tokens
from lightning_memdec.evaluation.knn_temperature import check_temperatures, knn_key, knn_temperatures_scorer
from lightning_memdec.evaluation.settings import EvaluateKNN, EvaluateMixing, Scoring
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.sliding_window import sliding_gold_log_probs
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID, mixed_perplexity, sweep_lambda

TEMPERATURES = [1.0, 4.0, 64.0]


def test_the_lambda_grid_is_zero_to_one():
    assert DEFAULT_LAMBDA_GRID[0] == 0.0 and DEFAULT_LAMBDA_GRID[-1] == 1.0 and len(DEFAULT_LAMBDA_GRID) == 21
    np.testing.assert_allclose(np.diff(DEFAULT_LAMBDA_GRID), 0.05)
    with pytest.raises(ValueError, match="temperature_grid"):
        check_temperatures([4.0, 0.0])


def test_one_pass_scorer_equals_a_knnlm_at_each_temperature(tiny_gpt2, biomed_datastore, biomed_index):
    tokens = text_tokens("embedded:biomed/test", load_tokenizer("gpt2"), max_tokens=120)
    many = KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=16, temperature=16.0)
    got = sliding_gold_log_probs(tokens, 32, 16, 4, knn_temperatures_scorer(many, TEMPERATURES))
    for t in TEMPERATURES:
        one = KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=16, temperature=t)
        want = sliding_gold_log_probs(tokens, 32, 16, 4, knnlm_scorer(one))
        np.testing.assert_allclose(got[knn_key(t)], want["knn"], rtol=1e-12)
        np.testing.assert_allclose(got["base"], want["base"], rtol=1e-6)


def test_evaluate_chooses_the_temperature_on_valid(tmp_path, tiny_gpt2, biomed_datastore, biomed_index):
    splits = {"test": "embedded:biomed/test", "valid": "embedded:law/valid"}
    common = {"scoring": Scoring(window=32, stride=16, batch_size=4, max_tokens=150)}
    report = evaluate(
        bases=[str(tiny_gpt2)],
        out=tmp_path / "r",
        knn=EvaluateKNN(datastore=[str(biomed_datastore)], index=[str(biomed_index)], k=16),
        mix=EvaluateMixing(temperature_grid=TEMPERATURES),
        **splits,
        **common,
    )
    assert report["lambda_grid"] == list(DEFAULT_LAMBDA_GRID)
    row = report["rows"][0]
    # direct: a KNNLM per temperature on valid, λ swept on the 0 … 1 grid, the lowest valid perplexity wins
    tok = load_tokenizer("gpt2")
    lp = {}
    for split, spec in splits.items():
        tokens = text_tokens(spec, tok, max_tokens=150)
        for t in TEMPERATURES:
            knnlm = KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=16, temperature=t)
            lp[split, t] = sliding_gold_log_probs(tokens, 32, 16, 4, knnlm_scorer(knnlm))
    valid_ppl = {}
    for t in TEMPERATURES:
        lam = sweep_lambda(lp["valid", t]["base"], lp["valid", t]["knn"], DEFAULT_LAMBDA_GRID)[0]
        valid_ppl[t] = (mixed_perplexity(lp["valid", t]["base"], lp["valid", t]["knn"], lam), lam)
    best = min(valid_ppl, key=lambda t: valid_ppl[t][0])
    assert row["knnlm_temperature"] == best and row["knnlm_temperature_from"] == "valid"
    assert row["knnlm_lambda"] == valid_ppl[best][1]
    assert row["knnlm_valid_ppl_by_temperature"] == pytest.approx({f"{t:g}": v[0] for t, v in valid_ppl.items()})
    assert row["knnlm_temperature_at_edge"] == (best in (1.0, 64.0))
    test = lp["test", best]
    assert row["knnlm_ppl"] == pytest.approx(mixed_perplexity(test["base"], test["knn"], valid_ppl[best][1]), rel=1e-9)
    assert "T chosen on valid" in (tmp_path / "r" / "report.md").read_text()
    # without a valid split, the given temperature is the one used
    fixed = evaluate(
        bases=[str(tiny_gpt2)],
        test=splits["test"],
        out=tmp_path / "f",
        knn=EvaluateKNN(datastore=[str(biomed_datastore)], index=[str(biomed_index)], k=16, temperature=4.0),
        mix=EvaluateMixing(knn_lmbda=0.3),
        **common,
    )
    assert fixed["rows"][0]["knnlm_temperature"] == 4.0 and fixed["rows"][0]["knnlm_temperature_from"] == "given"
    knn = lp["test", 4.0]
    assert fixed["rows"][0]["knnlm_ppl"] == pytest.approx(mixed_perplexity(knn["base"], knn["knn"], 0.3), rel=1e-9)


def test_evaluate_warns_when_a_set_temperature_option_is_ignored(tmp_path, tiny_gpt2, biomed_datastore, biomed_index):
    """With --valid T comes from --mix.temperature_grid, without it from --knn.temperature: setting the other one
    warns, naming the option used instead; which one is used does not change, and options left alone warn nothing."""
    import warnings

    stores = dict(datastore=[str(biomed_datastore)], index=[str(biomed_index)], k=16)
    common = dict(
        bases=[str(tiny_gpt2)],
        test="embedded:biomed/test",
        scoring=Scoring(window=32, stride=16, batch_size=4, max_tokens=64),
    )
    with pytest.warns(UserWarning, match=r"--knn.temperature 4 is ignored: .*--valid .*--mix.temperature_grid \[1"):
        chosen = evaluate(
            out=tmp_path / "v",
            valid="embedded:law/valid",
            knn=EvaluateKNN(temperature=4.0, **stores),
            mix=EvaluateMixing(temperature_grid=[1.0, 64.0]),
            **common,
        )
    row = chosen["rows"][0]
    assert row["knnlm_temperature_from"] == "valid" and row["knnlm_temperature"] in (1.0, 64.0)
    with pytest.warns(UserWarning, match=r"--mix.temperature_grid \[1.0, 64.0\] is ignored: .*--knn.temperature 4 is"):
        given = evaluate(
            out=tmp_path / "g",
            knn=EvaluateKNN(temperature=4.0, **stores),
            mix=EvaluateMixing(knn_lmbda=0.3, temperature_grid=[1.0, 64.0]),
            **common,
        )
    assert given["rows"][0]["knnlm_temperature"] == 4.0 and given["rows"][0]["knnlm_temperature_from"] == "given"
    unset = [
        dict(valid="embedded:law/valid", knn=EvaluateKNN(**stores), mix=EvaluateMixing(temperature_grid=[1.0, 64.0])),
        dict(knn=EvaluateKNN(temperature=4.0, **stores), mix=EvaluateMixing(knn_lmbda=0.3)),
    ]
    for i, options in enumerate(unset):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate(out=tmp_path / f"u{i}", **options, **common)
        assert not [w for w in caught if "ignored" in str(w.message)], [str(w.message) for w in caught]
