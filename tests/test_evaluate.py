"""Evaluation: KNNLM against brute force, sliding-window perplexity against a token loop, λ sweeps, the
`memdec evaluate` report, and the CrossModelEval callback in a short fit. Tiny random models, real text."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import knnlm_scorer, save_tiny
from transformers import AutoModelForCausalLM

from lightning_memdec.cli import main
from lightning_memdec.evaluation.evaluate import evaluate, text_tokens
from lightning_memdec.evaluation.latency import generation_throughput, model_latency
from lightning_memdec.evaluation.settings import Audit, Controls, EvaluateKNN, EvaluateMixing, Scoring
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.token_corpus import position_windows
from lightning_memdec.kernels.scoring import mix_log_probs, mixed_perplexity, perplexity
from lightning_memdec.training.callbacks import CrossModelEval
from lightning_memdec.training.fit import lightning_cli

V = 50257
TINY_DECODER = [
    "--model.config",
    '{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}',
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A decoder and a second (cross-architecture) base of the GPT-2 tokenizer; a base of another tokenizer."""
    root = tmp_path_factory.mktemp("eval-models")
    return {
        "memdec": save_tiny(root / "memdec", n_embd=32, seed=1),
        "llama": save_tiny(root / "llama-base", arch="llama", n_embd=32, seed=2),
        "wide": save_tiny(root / "gpt2-wide", n_embd=48, seed=3),
        "neox": save_tiny(root / "neox", arch="gpt_neox", vocab=50277, tokenizer="gpt-neox-20b", seed=4),
    }


@pytest.fixture(scope="module")
def knnlm(tiny_gpt2, biomed_datastore, biomed_index):
    return KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=16, temperature=4.0, lmbda=0.3)


@pytest.fixture(scope="module")
def test_tokens(tiny_gpt2):
    return text_tokens("embedded:biomed/test", load_tokenizer(str(tiny_gpt2)), max_tokens=160)


def brute_force_knn(store: Datastore, queries: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Dense p_kNN [n, V] in float64: all distances, the k smallest, softmax(−d/T), summed per token."""
    keys = np.asarray(store.keys, dtype=np.float64)
    values = np.asarray(store.values)
    out = np.zeros((len(queries), V))
    for row, q in enumerate(queries.astype(np.float64)):
        d = ((keys - q) ** 2).sum(1)
        near = np.argsort(d, kind="stable")[:k]
        w = np.exp(-(d[near] - d[near].min()) / temperature)
        np.add.at(out[row], values[near], w / w.sum())
    return out


# -- KNNLM ------------------------------------------------------------------------------------------------------


def test_knnlm_endpoints_and_rows_sum_to_one(knnlm, test_tokens):
    ids = torch.as_tensor(test_tokens[:40])[None]
    with torch.no_grad():
        base = F.log_softmax(knnlm.base(ids).logits.float(), -1)
    lp = knnlm.log_probs(ids)
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(1, 40, dtype=torch.float64), atol=1e-5, rtol=0)
    _, keys = knnlm.base_forward(ids)
    knn = knnlm.knn_log_probs(keys[0])
    torch.testing.assert_close(
        lp[0].double(),
        torch.logaddexp(base[0].double() + math.log(0.7), knn.double() + math.log(0.3)),
        atol=1e-5,
        rtol=1e-5,
    )
    knnlm.lmbda = 0.0
    assert torch.equal(knnlm.log_probs(ids), base)
    knnlm.lmbda = 1.0
    assert torch.equal(knnlm.log_probs(ids)[0], knn)
    knnlm.lmbda = 0.3
    assert (knn.exp() > 0).sum(-1).max() <= 16  # support: at most the k neighbours' tokens


@pytest.mark.parametrize("k, exact, search", [(8, False, "faiss"), (2999, True, "faiss"), (40, False, "exact")])
def test_knn_distribution_equals_brute_force(tiny_gpt2, biomed_datastore, biomed_index, test_tokens, k, exact, search):
    index = biomed_index if search == "faiss" else None  # exact search needs no index
    kwargs = {"exact_distances": exact, "search": search}
    lm = KNNLM(tiny_gpt2, biomed_datastore, index, k=k, temperature=4.0, lmbda=0.5, **kwargs)
    ids = torch.as_tensor(test_tokens[:24])[None]
    _, keys = lm.base_forward(ids)
    queries = keys[0].numpy()
    expected = brute_force_knn(Datastore(biomed_datastore), queries, k, 4.0)
    got = lm.knn_log_probs(keys[0]).double().exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # the gold-token path: the weight of the neighbours holding the gold token, no dense tensor
    gold = torch.as_tensor(test_tokens[1:25])
    gold_lp = lm.knn_gold_log_probs(keys[0], gold).numpy()
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.exp(gold_lp), expected[np.arange(24), gold.numpy()], rtol=1e-4, atol=1e-9)
    lm.lmbda = 0.3  # not 0.5, where the mixture is symmetric in its two models
    out = lm.gold_log_probs(ids, gold[None])
    dense = lm.log_probs(ids)[0].gather(-1, gold[:, None])[:, 0].double()
    torch.testing.assert_close(out["mix"][0], dense, atol=1e-5, rtol=1e-5)
    with np.errstate(divide="ignore"):
        direct = np.log(0.7 * np.exp(out["base"][0].numpy()) + 0.3 * np.exp(gold_lp))  # λ·p_kNN + (1 − λ)·p_base
    np.testing.assert_allclose(out["mix"][0].numpy(), direct, rtol=1e-9, atol=1e-9)
    # positions the attention mask leaves out (padding) are not scored: 0 in every output
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    masked = lm.gold_log_probs(ids, gold[None], attention_mask=mask)
    assert all(torch.all(masked[name][0, :5] == 0) for name in ("base", "knn", "mix"))
    alone = lm.gold_log_probs(ids[:, 5:], gold[None, 5:])  # the rest scored as the row without its left padding
    for name in ("base", "knn", "mix"):
        torch.testing.assert_close(masked[name][0, 5:], alone[name][0], atol=1e-5, rtol=1e-5)


# -- perplexity ---------------------------------------------------------------------------------------------------


def test_sliding_perplexity_equals_token_loop(tiny_gpt2, models, knnlm, test_tokens):
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    decoder = AutoModelForCausalLM.from_pretrained(models["memdec"]).eval()
    window, stride = 64, 24
    got = sliding_gold_log_probs(test_tokens, window, stride, 3, lm_scorer(decoder, V, "memdec"))["memdec"]
    with_knn = sliding_gold_log_probs(test_tokens, window, stride, 2, knnlm_scorer(knnlm))
    n = len(test_tokens) - 1
    wins = position_windows(n, window, stride)
    loop_base, loop_dec, loop_mix = np.zeros(n), np.zeros(n), np.zeros(n)
    with torch.no_grad():
        for j in range(len(wins)):
            s = int(wins.starts[j])
            for i in wins.scored_positions(j):
                context = torch.as_tensor(test_tokens[s : i + 1])[None]
                assert j == 0 or context.shape[1] >= window - stride + 1
                gold = int(test_tokens[i + 1])
                loop_base[i] = F.log_softmax(base(context).logits[0, -1].double(), -1)[gold]
                loop_dec[i] = F.log_softmax(decoder(context).logits[0, -1].double(), -1)[gold]
                loop_mix[i] = knnlm.log_probs(context)[0, -1, gold]
    np.testing.assert_allclose(got, loop_dec, atol=1e-4)
    np.testing.assert_allclose(with_knn["base"], loop_base, atol=1e-4)
    mix = mix_log_probs(torch.from_numpy(with_knn["base"]), torch.from_numpy(with_knn["knn"]), 0.3)
    np.testing.assert_allclose(mix.numpy(), loop_mix, atol=1e-4)
    assert perplexity(got) == pytest.approx(math.exp(-loop_dec.mean()), rel=1e-5)


def test_knnlm_warns_only_when_the_base_is_not_the_datastore_model(tmp_path, tiny_gpt2, biomed_datastore):
    """A store built with ``embedded:base-small`` queried by that model's directory is the same model: no warning.
    Without a recorded weights' hash (an earlier version's store), a base of another name is warned about; with one,
    the hash decides (tests/test_datastore.py)."""
    import shutil
    import warnings

    store = tmp_path / "ds"
    shutil.copytree(biomed_datastore, store)
    meta = json.loads((store / "meta.json").read_text())
    unhashed = {key: value for key, value in meta.items() if key != "model_sha256"}
    (store / "meta.json").write_text(json.dumps({**unhashed, "model": "embedded:base-small"}))
    same, other = tmp_path / "base-small", tmp_path / "other-base"
    shutil.copytree(tiny_gpt2, same)
    shutil.copytree(tiny_gpt2, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KNNLM(same, store, search="exact")
    with pytest.warns(UserWarning, match=r"built with embedded:base-small, but the base LM is .*other-base"):
        KNNLM(other, store, search="exact")
    retrained = save_tiny(tmp_path / "gpt2-tiny", seed=1)  # the same name and shapes, other weights: refused
    with pytest.raises(ValueError, match=r"built with .* but the base LM .*gpt2-tiny has other weights"):
        KNNLM(retrained, biomed_datastore, search="exact")


# -- bad inputs ---------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused(tmp_path, tiny_gpt2, models, biomed_corpus, biomed_datastore, biomed_index):
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        KNNLM(tiny_gpt2, biomed_datastore, biomed_index, lmbda=1.5)
    with pytest.raises(ValueError, match=r"k \(neighbours per query\) must be positive \(a whole number\)"):
        KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=0)
    with pytest.raises(ValueError, match="search='faiss' needs index="):
        KNNLM(tiny_gpt2, biomed_datastore)
    with pytest.raises(ValueError, match="search must be 'faiss' or 'exact'"):
        KNNLM(tiny_gpt2, biomed_datastore, biomed_index, search="flat")
    with pytest.raises(ValueError, match=r"datastore .* tokenizer gpt2 \(vocab 50257.*base LM uses neox \(vocab 50277"):
        KNNLM(models["neox"], biomed_datastore, biomed_index)
    with pytest.raises(ValueError, match="32-dim keys .* gives 48-dim keys"):
        KNNLM(models["wide"], biomed_datastore, biomed_index)
    with pytest.raises(ValueError, match="built with a 'gpt2' model .* is a 'llama'"):
        KNNLM(models["llama"], biomed_datastore, biomed_index)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        text_tokens(empty, load_tokenizer("gpt2"))
    with pytest.raises(ValueError, match=r"corpus .* uses tokenizer gpt2 .* but the base LM uses gpt-neox-20b"):
        text_tokens(biomed_corpus, load_tokenizer("gpt-neox-20b"))  # a corpus directory of another tokenizer
    assert len(text_tokens("embedded:biomed/valid", load_tokenizer("gpt2"), max_tokens=100)) == 100  # capped
    scoring = Scoring(max_tokens=200, window=32, stride=16, batch_size=4)
    common = dict(bases=[str(tiny_gpt2)], test="embedded:biomed/test", out=tmp_path / "r", scoring=scoring)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        evaluate(memdec=str(models["memdec"]), mix=EvaluateMixing(lmbda=-0.1), **common)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        evaluate(
            memdec=str(models["memdec"]),
            valid="embedded:biomed/valid",
            mix=EvaluateMixing(lambda_grid=[0.5, 1.2]),
            **common,
        )
    with pytest.raises(ValueError, match="pass --mix.lmbda .* or --valid"):
        evaluate(**common, memdec=str(models["memdec"]))
    with pytest.raises(ValueError, match=r"decoder .*neox uses tokenizer neox .* but base .*gpt2-tiny uses"):
        evaluate(memdec=str(models["neox"]), mix=EvaluateMixing(lmbda=0.5), **common)
    with pytest.raises(ValueError, match="was built with .*gpt2-tiny, which is none of"):
        evaluate(
            knn=EvaluateKNN(datastore=str(biomed_datastore), index=str(biomed_index)),
            mix=EvaluateMixing(lmbda=0.3),
            **{**common, "bases": [str(models["llama"])]},
        )
    with pytest.raises(ValueError, match=r"--scoring.window = 1024 exceeds the context of .*gpt2-tiny, 512 positions"):
        evaluate(mix=EvaluateMixing(lmbda=0.3), **{**common, "scoring": replace(scoring, window=1024)})
    with pytest.raises(
        ValueError, match=r"neox uses tokenizer neox \(vocab 50277.*decoder's training data uses gpt2 \(vocab 50257"
    ):
        decoder = AutoModelForCausalLM.from_pretrained(models["memdec"])
        CrossModelEval([str(models["neox"])]).load_bases(decoder, Datastore(biomed_datastore).tokenizer)
    with pytest.raises(ValueError, match="distinct names"):
        CrossModelEval(["a/gpt2", "b/gpt2"])


# -- the stage ------------------------------------------------------------------------------------------------------


def test_memdec_evaluate_writes_report(tmp_path, tiny_gpt2, models, biomed_corpus, biomed_datastore, biomed_index):
    out = tmp_path / "report"
    grid = [0.1, 0.5, 0.9]
    # valid is the datastore's own corpus here: allowed, but flagged (every position would retrieve itself)
    with pytest.warns(UserWarning, match="valid text .* is \\(the start of\\) the corpus the datastore was built from"):
        main(
            [
                "evaluate",
                "--bases",
                json.dumps([str(tiny_gpt2), str(models["llama"])]),
                "--memdec",
                str(models["memdec"]),
                "--test",
                "embedded:biomed/test",
                "--valid",
                str(biomed_corpus),
                "--knn.datastore",
                str(biomed_datastore),
                "--knn.index",
                str(biomed_index),
                "--knn.k",
                "16",
                "--knn.temperature",
                "4",
                "--mix.lambda_grid",
                json.dumps(grid),
                "--scoring.window",
                "64",
                "--scoring.stride",
                "32",
                "--scoring.batch_size",
                "4",
                "--scoring.max_tokens",
                "300",
                "--out",
                str(out),
                "--audit.latency",
                "true",
                "--audit.latency_repeats",
                "1",
            ]
        )
    for name in ("report.md", "report.json", "lambda_curve.png"):
        assert (out / name).stat().st_size > 0

    def strict(const):
        raise ValueError(f"report.json is not strict JSON: {const}")

    report = json.loads((out / "report.json").read_text(), parse_constant=strict)
    assert report["positions"] == {"test": 299, "valid": 299}
    gpt2_row, llama_row = report["rows"]
    assert gpt2_row["base"] == "gpt2-tiny" and llama_row["base"] == "llama-base"
    assert gpt2_row["memdec_alone_ppl"] == llama_row["memdec_alone_ppl"]  # one decoder array serves both bases
    assert llama_row["knnlm_ppl"] is None and gpt2_row["knnlm_ppl"] is not None
    for row in report["rows"]:
        curve = report["curves"][row["base"]]
        assert curve["split"] == "valid"
        on_grid = [curve["memdec"][curve["lambda"].index(x)] for x in grid]
        assert row["memdec_lambda"] == grid[int(np.argmin(on_grid))] and row["memdec_lambda_from"] == "valid"
        if "knnlm" in curve:  # λ = 0: both mixtures are the base alone
            assert curve["memdec"][0] == curve["knnlm"][0]
    # the report's numbers are the direct computation on the test split
    tok = load_tokenizer("gpt2")
    tokens = text_tokens("embedded:biomed/test", tok, max_tokens=300)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    decoder = AutoModelForCausalLM.from_pretrained(models["memdec"]).eval()
    b = sliding_gold_log_probs(tokens, 64, 32, 4, lm_scorer(base, V))["lm"]
    d = sliding_gold_log_probs(tokens, 64, 32, 4, lm_scorer(decoder, V))["lm"]
    assert gpt2_row["base_ppl"] == pytest.approx(perplexity(b), rel=1e-6)
    assert gpt2_row["memdec_ppl"] == pytest.approx(mixed_perplexity(b, d, gpt2_row["memdec_lambda"]), rel=1e-6)
    md = (out / "report.md").read_text()
    assert "| model | alone | + kNN-LM | + MemDec | λ MemDec | λ kNN-LM |" in md and "| llama-base |" in md
    assert set(report["latency"]["seconds"]) == {"base", "base+memdec", "base+knnlm"}


def test_knnlm_greedy_generation_equals_argmax_loop(knnlm, test_tokens):
    ids = torch.as_tensor(test_tokens[:12].reshape(2, 6))
    out = knnlm.generate_greedy(ids, 4)
    expected = ids
    for _ in range(4):
        expected = torch.cat([expected, knnlm.log_probs(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_latency_helpers_report_every_variant(tiny_gpt2, knnlm, test_tokens):
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    ids = torch.as_tensor(test_tokens[:32])[None]
    mixed = InterpolatedLM.from_pretrained(tiny_gpt2, tiny_gpt2, 0.5)
    out = model_latency(knnlm.base, ids, V, mixed, knnlm, repeats=1, warmup=0)
    assert out["overhead"]["base"] == 1.0 and all(s > 0 for s in out["seconds"].values())
    tps = generation_throughput(
        {"base": knnlm.base, "mixed": mixed, "knnlm": knnlm}, ids[:, :8], 2, repeats=1, warmup=0
    )
    assert set(tps) == {"base", "mixed", "knnlm"} and all(v > 0 for v in tps.values())


def test_median_times_reports_each_runner_s_median_of_its_timed_repeats(monkeypatch):
    """A stubbed clock that each runner advances by a known duration: the report is statistics.median of the timed
    repeats (4 here: the mean of the middle two), the warm-up call not counted."""
    import statistics
    from types import SimpleNamespace

    import lightning_memdec.evaluation.latency as latency

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    durations = {"a": [10.0, 0.5, 0.1, 0.3, 0.9], "b": [10.0, 2.0, 4.0, 1.0, 3.0]}  # the warm-up's first

    def runner(key):
        left = iter(durations[key])
        return lambda: setattr(clock, "now", clock.now + next(left))

    got = latency.median_times({key: runner(key) for key in durations}, repeats=4, warmup=1)
    assert got == pytest.approx({key: statistics.median(d[1:]) for key, d in durations.items()})


def test_generation_throughput_counts_every_row_s_new_tokens(monkeypatch, tiny_gpt2):
    """Tokens per second are all rows' new tokens: with the timing stubbed at 2 s per call, rows x new tokens of
    what the runner really generated, / 2."""
    import lightning_memdec.evaluation.latency as latency
    from lightning_memdec.hf.loading import load_causal_lm

    made = []

    def timed(runners, repeats, warmup, device):
        made.extend(fn() for fn in runners.values())
        return {key: 2.0 for key in runners}

    monkeypatch.setattr(latency, "median_times", timed)
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(0))
    tps = generation_throughput({"base": load_causal_lm(tiny_gpt2)}, ids, 4, repeats=1, warmup=0)
    [out] = made
    assert out.shape == (3, 10)  # the guard: every row made its 4 tokens
    assert tps == {"base": pytest.approx(out.shape[0] * (out.shape[1] - ids.shape[1]) / 2.0)}


# -- the callback ----------------------------------------------------------------------------------------------------


def test_cross_model_eval_scores_only_its_first_max_batches(monkeypatch):
    """max_batches = 2 of a 4-batch validation epoch: the logged perplexities are the base's and the mixture's over
    the first two batches, computed directly."""
    import contextlib
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.training.callbacks import CrossModelEval

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    base, decoder = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    callback = CrossModelEval(["base"], lambdas=0.5, max_batches=2)
    callback.models, callback.vocab = [base], 50
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), decoder=decoder, log_dict=lambda m, **kw: logged.update(m))
    trainer = SimpleNamespace(sanity_checking=False, strategy=SimpleNamespace(reduce=lambda x, reduce_op: x),
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))  # fmt: skip
    callback.on_validation_epoch_start(trainer, module)
    batches = []
    for i in range(4):
        ids = torch.randint(0, 50, (1, 9))
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, 8)})
        callback.on_validation_batch_end(trainer, module, None, batches[-1], i)
    callback.on_validation_epoch_end(trainer, module)
    with torch.no_grad():
        ids, gold = torch.cat([b["input_ids"] for b in batches[:2]]), torch.cat([b["labels"] for b in batches[:2]])
        p_base = base(ids).logits.double().softmax(-1).gather(-1, gold[..., None])
        p_mem = decoder(ids).logits.double().softmax(-1).gather(-1, gold[..., None])
    assert float(logged["val/ppl_base/base"]) == pytest.approx(float((-p_base.log().mean()).exp()), rel=1e-5)
    mixed = (0.5 * p_base + 0.5 * p_mem).log().mean()
    assert float(logged["val/ppl_mix/base"]) == pytest.approx(float((-mixed).exp()), rel=1e-5)


def test_cross_model_eval_logs_mixture_perplexities(tmp_path, tiny_gpt2, biomed_targets_pair):
    config = tmp_path / "cross.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning_memdec.training.callbacks.CrossModelEval\n      init_args:\n"
        f"        bases: [{tiny_gpt2}]\n        lambdas: [0.5, 0.0, 1.0]\n        max_batches: 100\n"
    )
    data = []
    for key, value in biomed_targets_pair.items():
        data += [f"--data.{key}", value]
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(config),
            *TINY_DECODER,
            *data,
            "--data.window",
            "64",
            "--data.batch_size",
            "2",
            "--data.max_support",
            "16",
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--export.dirpath",
            str(tmp_path / "hf"),
        ]
    )
    m = cli.trainer.callback_metrics
    names = [
        "val/ppl_base/gpt2-tiny",
        "val/ppl_mix/gpt2-tiny",
        "val/ppl_mix/gpt2-tiny@0.5",
        "val/ppl_mix/gpt2-tiny@0",
        "val/ppl_mix/gpt2-tiny@1",
    ]
    for name in names:
        assert name in m and torch.isfinite(m[name])
    assert m["val/ppl_mix/gpt2-tiny"] == m["val/ppl_mix/gpt2-tiny@0.5"]
    assert m["val/ppl_mix/gpt2-tiny@0"] == pytest.approx(float(m["val/ppl_base/gpt2-tiny"]), rel=1e-6)
    assert m["val/ppl_mix/gpt2-tiny@1"] == pytest.approx(float(m["val/ppl"]), rel=1e-4)  # the decoder alone
    # the base's perplexity, directly over the same two validation batches
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(cli.datamodule.val_dataloader()):
            if i == 2:
                break
            lp = F.log_softmax(base(batch["input_ids"]).logits.double(), -1)
            gold = lp.gather(-1, batch["labels"][..., None])[..., 0]
            nll -= float(gold[batch["loss_mask"]].sum())
            count += int(batch["loss_mask"].sum())
    assert float(m["val/ppl_base/gpt2-tiny"]) == pytest.approx(math.exp(nll / count), rel=1e-5)
    # convexity of −log: the mixture is never worse than the geometric mean of its sides
    mix = float(m["val/ppl_mix/gpt2-tiny@0.5"])
    assert mix <= math.sqrt(float(m["val/ppl_base/gpt2-tiny"]) * float(m["val/ppl"])) * (1 + 1e-6)


@pytest.mark.slow
def test_evaluate_fair_rows_every_base_its_own_datastore(tmp_path, tiny_gpt2, models, biomed_corpus):
    """--knn_corpus builds one datastore per model; teacher and CE-only rows appear; λ at a grid end is flagged."""
    out = tmp_path / "fair"
    report = evaluate(
        bases=[str(tiny_gpt2), str(models["llama"])],
        memdec=str(models["memdec"]),
        test="embedded:biomed/test",
        valid="embedded:biomed/valid",
        out=out,
        controls=Controls(teacher=str(models["wide"]), ce_only=str(tiny_gpt2)),
        knn=EvaluateKNN(corpus=str(biomed_corpus), k=8, temperature=4.0),
        mix=EvaluateMixing(lambda_grid=[0.0, 0.5, 1.0]),
        scoring=Scoring(batch_size=4, window=32, stride=16, max_tokens=200),
    )
    rows = {r["base"]: r for r in report["rows"]}
    assert [r["role"] for r in report["rows"]] == ["base", "base", "teacher"]
    for name in ("gpt2-tiny", "llama-base", "gpt2-wide"):  # every model has a kNN-LM row over its own datastore
        store = Datastore(out / "stores" / f"{name}-datastore")
        assert rows[name]["knnlm_ppl"] is not None and Path(store.meta["model"]).name == name
    teacher = rows["gpt2-wide"]
    assert teacher["memdec_ppl"] is None and teacher["ce_only_ppl"] is None
    base = rows["gpt2-tiny"]
    # the CE-only "decoder" is the base itself: every λ gives the base's perplexity, the first grid point wins
    assert base["ce_only_ppl"] == pytest.approx(base["base_ppl"], rel=1e-9) and base["ce_only_lambda"] == 0.0
    assert base["ce_only_lambda_at_edge"] is True
    md = (out / "report.md").read_text()
    assert "| gpt2-wide (teacher) |" in md and "+ CE-only" in md and "⚠ edge" in md
    # a rerun reuses the datastores it built
    mtime = (out / "stores" / "gpt2-tiny-datastore" / "meta.json").stat().st_mtime
    splits = {"test": "embedded:biomed/test", "valid": "embedded:biomed/valid"}
    evaluate(
        bases=[str(tiny_gpt2)],
        out=out,
        knn=EvaluateKNN(corpus=str(biomed_corpus), k=8),
        scoring=Scoring(batch_size=4, window=32, stride=16, max_tokens=200),
        **splits,
    )
    assert (out / "stores" / "gpt2-tiny-datastore" / "meta.json").stat().st_mtime == mtime


def test_windows_past_the_context_are_refused_before_any_work(tmp_path, tiny_gpt2, models, biomed_corpus, knnlm):
    """evaluate --knn_corpus builds no datastore, and generation starts no step, past a model's 512 positions."""
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    out = tmp_path / "report"
    with pytest.raises(ValueError, match=r"--scoring.window = 1024 exceeds the context of .*gpt2-tiny, 512 positions"):
        evaluate(
            bases=[str(tiny_gpt2)],
            test="embedded:biomed/test",
            out=out,
            knn=EvaluateKNN(corpus=str(biomed_corpus)),
            scoring=Scoring(batch_size=4, window=1024, stride=512),
            mix=EvaluateMixing(lmbda=0.3),
        )
    assert not out.exists()
    prompt = torch.zeros(1, 500, dtype=torch.long)
    mixed = InterpolatedLM(str(tiny_gpt2), str(models["memdec"]), 0.5)
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens = 520 exceeds the context of the base LM, 512"):
        mixed.generate(prompt, max_new_tokens=20, do_sample=False)
    assert mixed.generate(prompt[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens = 520 exceeds the context of the base LM, 512"):
        knnlm.generate_greedy(prompt, max_new_tokens=20)


def test_evaluate_reports_the_k_it_used(tmp_path, tiny_gpt2, biomed_datastore, biomed_index):
    """k beyond the datastore is capped at its size by the kNN-LM; the report says the k used and the k asked."""
    entries = len(Datastore(biomed_datastore))
    report = evaluate(
        bases=[str(tiny_gpt2)],
        test="embedded:biomed/test",
        out=tmp_path / "r",
        knn=EvaluateKNN(datastore=str(biomed_datastore), index=str(biomed_index), k=entries + 500),
        mix=EvaluateMixing(knn_lmbda=0.3),
        scoring=Scoring(batch_size=4, window=32, stride=16, max_tokens=64),
    )
    assert report["k"] == entries and report["k_asked"] == entries + 500
    assert f"k={entries}," in (tmp_path / "r" / "report.md").read_text()


def test_evaluate_checks_out_and_every_bases_tokenizer_before_scoring(tmp_path, tiny_gpt2, models):
    """An --out under a file, or a second base of another tokenizer than the decoder, is refused before any scoring."""
    scoring = Scoring(window=32, stride=16, max_tokens=64, batch_size=4)
    common = dict(test="embedded:biomed/test", scoring=scoring, mix=EvaluateMixing(lmbda=0.3))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match=rf"--out {blocker / 'report'} cannot be written: {blocker} is not a"):
        evaluate(bases=[str(tiny_gpt2)], out=blocker / "report", **common)
    with pytest.raises(ArtifactError, match=rf"--out {blocker} is a file, but a directory is needed"):
        evaluate(bases=[str(tiny_gpt2)], out=blocker, **common)
    out = tmp_path / "r"
    with pytest.raises(ArtifactError, match=r"decoder .*memdec uses tokenizer .* but base .*neox uses neox"):
        evaluate(bases=[str(tiny_gpt2), str(models["neox"])], memdec=str(models["memdec"]), out=out, **common)
    assert not out.exists()


def test_every_split_is_checked_before_any_datastore_is_built(tmp_path, tiny_gpt2, biomed_corpus):
    """A missing or mistyped --test/--valid (or --audit.overlap_with), a directory that is no corpus, or a corpus of
    another tokenizer is refused with the reader's own message before the --knn.corpus datastore is built or any split
    is scored."""
    from lightning_memdec.io.token_corpus import tokenize

    neox_corpus = tokenize(["embedded:law/valid"], tmp_path / "neox-corpus", "gpt-neox-20b", max_tokens=200)
    not_a_corpus = tmp_path / "not-a-corpus"
    not_a_corpus.mkdir()
    common = dict(
        bases=[str(tiny_gpt2)],
        knn=EvaluateKNN(corpus=str(biomed_corpus), k=8),
        mix=EvaluateMixing(knn_lmbda=0.3),
        scoring=Scoring(window=32, stride=16, max_tokens=64, batch_size=4),
    )
    refused = [
        ({"valid": str(tmp_path / "valid.txt")}, FileNotFoundError, r"valid\.txt"),
        ({"valid": "embedded:biomed/vaild"}, ValueError, "no embedded corpus biomed/vaild"),
        ({"valid": str(not_a_corpus)}, ArtifactError, r"not-a-corpus has no meta\.json"),
        (
            {"valid": str(neox_corpus)},
            ValueError,
            r"corpus .*neox-corpus uses tokenizer gpt-neox-20b .* base LM uses gpt2",
        ),
        ({"test": str(tmp_path / "test.txt"), "valid": None}, FileNotFoundError, r"test\.txt"),
        # the overlap audit's training text, read only after every model was scored
        ({"audit": Audit(overlap_with=[str(tmp_path / "train.txt")])}, FileNotFoundError, r"train\.txt"),
    ]
    for i, (splits, error, message) in enumerate(refused):
        out = tmp_path / f"r{i}"
        with pytest.raises(error, match=message):
            evaluate(**{"test": "embedded:biomed/test", **splits}, out=out, **common)
        assert not out.exists(), f"{splits}: a datastore was built (or a report written) before the split was read"


def test_a_datastore_is_paired_with_its_base_by_weights_not_by_folder_name(
    tmp_path, tiny_gpt2, biomed_datastore, biomed_index
):
    """A copy of the base in a folder of another name gets the datastore's kNN-LM row (the same row as the base
    itself); another model in a folder of the base's name is refused; a datastore that recorded no weights' hash (an
    earlier version's) is still paired by the folder name."""
    import shutil

    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.retrieval.settings import IndexSettings

    copy = tmp_path / "copies" / "my-base"
    shutil.copytree(tiny_gpt2, copy)
    impostor = save_tiny(tmp_path / "other" / tiny_gpt2.name, seed=1)  # the base's folder name, other weights
    common = dict(test="embedded:biomed/test", scoring=Scoring(window=32, stride=16, batch_size=4, max_tokens=64))
    knn = EvaluateKNN(datastore=[str(biomed_datastore)], index=[str(biomed_index)], k=8)
    mix = EvaluateMixing(knn_lmbda=0.3)
    by_copy = evaluate(bases=[str(copy)], out=tmp_path / "copy", knn=knn, mix=mix, **common)
    by_base = evaluate(bases=[str(tiny_gpt2)], out=tmp_path / "base", knn=knn, mix=mix, **common)
    assert by_copy["datastores"] == {"my-base": str(biomed_datastore)}
    assert by_copy["rows"][0]["knnlm_ppl"] == pytest.approx(by_base["rows"][0]["knnlm_ppl"], rel=1e-9)
    with pytest.raises(ValueError, match=rf"was built with .*{tiny_gpt2.name}, which is none of the bases .*other"):
        evaluate(bases=[str(impostor)], out=tmp_path / "impostor", knn=knn, mix=mix, **common)
    old = tmp_path / "old-store"
    shutil.copytree(biomed_datastore, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["model_sha256"]
    (old / "meta.json").write_text(json.dumps(meta))
    flat = build_index(old, tmp_path / "old-index", plan=IndexSettings(factory="Flat"))
    old_knn = EvaluateKNN(datastore=[str(old)], index=[str(flat)], k=8)
    by_name = evaluate(bases=[str(tiny_gpt2)], out=tmp_path / "old", knn=old_knn, mix=mix, **common)
    assert by_name["rows"][0]["knnlm_ppl"] == pytest.approx(by_base["rows"][0]["knnlm_ppl"], rel=1e-9)
