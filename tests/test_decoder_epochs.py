"""docs/results/decoder_epochs.py: its refusals before any work, its λ choice and mixture, and the epoch rule."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_memdec.apps.quickstart_stages import Budget, epoch_steps
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "decoder_epochs.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("decoder_epochs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_a_directory_without_a_quickstart_run(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="quickstart_settings.json is missing"):
        script.baseline_run(tmp_path)


def test_refuses_a_run_whose_targets_are_not_finished(script, tmp_path):
    settings = {"beta": 0.5, "pretrain_bases": False, "base": ["embedded:base-small"], **Budget().__dict__}
    (tmp_path / "quickstart_settings.json").write_text(json.dumps(settings))
    for part in ("corpora/domain-train", "corpora/domain-valid", "targets/train"):
        (tmp_path / part).mkdir(parents=True)
        (tmp_path / part / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="targets/valid is not finished"):
        script.baseline_run(tmp_path)
    (tmp_path / "targets/valid").mkdir()
    (tmp_path / "targets/valid/meta.json").write_text("{}")
    assert script.baseline_run(tmp_path)[1] == Budget()


def test_mixture_is_the_direct_formula_at_the_valid_best_lambda(script):
    rng = np.random.default_rng(0)
    base, decoder = np.log(rng.uniform(0.01, 1, 500)), np.log(rng.uniform(0.01, 1, 500))
    lam, mixed = script.mixtures(base, {"memdec-e2": decoder})["memdec-e2"]
    direct = {g: np.log((1 - g) * np.exp(base) + g * np.exp(decoder)) for g in DEFAULT_LAMBDA_GRID}
    best = min(DEFAULT_LAMBDA_GRID, key=lambda g: -direct[g].mean())
    assert lam == best
    np.testing.assert_allclose(mixed, direct[best], rtol=1e-12)


def test_one_epoch_is_the_train_tokens_in_batches_of_windows_rounded_up(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("The cell divides. " * 400)
    corpus = tokenize([str(text)], tmp_path / "corpus", "gpt2", max_tokens=1_000)
    budget = Budget(window=32, batch_size=4)
    assert epoch_steps(corpus, budget) == math.ceil(Corpus(corpus).num_tokens / 128) == 8


def test_baseline_decoder_reuses_only_a_decoder_whose_training_time_the_report_records(script, tmp_path):
    """The E = 1 row reuses the baseline's decoder with the time its report.json records (under ``run``); a
    decoder the baseline itself reused from an earlier run (time 0) is retrained, so no row shows a 0 s time."""
    (tmp_path / "models" / "memdec").mkdir(parents=True)
    (tmp_path / "models" / "memdec" / "meta.json").write_text("{}")
    settings = {"memdec_steps": None}

    def report(seconds):
        run = {"seconds": {"train memdec": seconds}, "cpu_seconds": {"train memdec": 2 * seconds}}
        (tmp_path / "report.json").write_text(json.dumps({"run": run}))

    report(89.5)
    model, times = script.baseline_decoder(tmp_path, settings, "memdec", 98)
    assert model == tmp_path / "models" / "memdec" and times == {"seconds": 89.5, "cpu_seconds": 179.0}
    report(0.0)
    assert script.baseline_decoder(tmp_path, settings, "memdec", 98) is None
    assert script.baseline_decoder(tmp_path, {"memdec_steps": 50}, "memdec", 98) is None
