"""Gaps of `memdec downstream`'s driver (which examples each split scores, kNN-LM's temperature when both λs are
fixed, which of tied temperatures wins) and of routed generation (the scores generate() returns, not only its tokens),
each against a direct computation on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny
from test_downstream import (  # noqa: F401 (verbalizer_store: a fixture)
    ENTRY,
    TEXTS,
    direct_dcpmi,
    direct_next_token_probs,
    read_predictions,
    verbalizer_store,
    write_task_folder,
)
from test_router import direct_lambda, direct_mixture, planted_threshold, reference_greedy, spread_router

from lightning_memdec.evaluation.downstream import downstream
from lightning_memdec.evaluation.downstream_tasks import knn_prompt_sample
from lightning_memdec.evaluation.settings import Bootstrap, DownstreamMixing, KNNLMRows, Prompts
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.hf.paired_generation import PairCache
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.embedded import load_tokenizer

SINGLE = {**ENTRY, "verbalizers": [[" terrible", " bad"], [" great", " good"]]}  # each one GPT-2 token


def write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def credit(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 for a right prediction, 1/m when the label is among m classes tied at the top, else 0."""
    top = scores == scores.max(axis=1, keepdims=True)
    return top[np.arange(len(labels)), labels] / top.sum(axis=1)


def class_ids(tok) -> list[list[int]]:
    return [[tok(w, add_special_tokens=False)["input_ids"][0] for w in words] for words in SINGLE["verbalizers"]]


def test_the_prompt_sample_is_drawn_from_the_dev_split_too(tmp_path, tiny_gpt2):
    """--prompts.n_sample is kNN-Prompt's seeded sample of every split scored, dev included: λ is tuned on the dev
    sample (its accuracy curve, by hand, on those examples), not on the whole dev file."""
    decoder = save_tiny(tmp_path / "dec", n_layer=1, seed=1)
    test = [{"id": i, "input": {"text": t}, "label": i % 2} for i, t in enumerate(TEXTS)]
    dev = [{"id": 100 + i, "input": {"text": f"{t} ({i})"}, "label": (i // 3) % 2} for i, t in enumerate(TEXTS * 3)]
    folder = write_task_folder(tmp_path / "tasks", SINGLE, test, dev=False)
    write_jsonl(folder / "toy" / "dev.jsonl", dev)
    grid, n_sample = [0.0, 0.5, 1.0], 4
    report = downstream([str(folder)], [str(tiny_gpt2)], tmp_path / "out", memdec=str(decoder),
                        mix=DownstreamMixing(lambda_grid=grid), prompts=Prompts(n_sample=n_sample, device="cpu"),
                        bootstrap=Bootstrap(resamples=10))  # fmt: skip
    tok = load_tokenizer("gpt2")
    base, mem = load_causal_lm(tiny_gpt2).eval(), load_causal_lm(decoder).eval()

    def curve(records):
        probs = [(direct_next_token_probs(base, tok, t), direct_next_token_probs(mem, tok, t))
                 for t in [r["input"]["text"] + " It was" for r in records] + [" It was"]]  # fmt: skip
        labels = np.array([r["label"] for r in records])
        accuracy = []
        for lmbda in grid:
            mixed = [(1 - lmbda) * pb + lmbda * pm for pb, pm in probs]
            scores = np.array([direct_dcpmi(p, mixed[-1], class_ids(tok)) for p in mixed[:-1]])
            accuracy.append(float(credit(scores, labels).mean()))
        return accuracy

    sampled = curve(knn_prompt_sample(dev, n_sample))
    assert sampled != curve(dev), "the whole dev split gives the sample's curve: the sample would not be tested"
    cell = report["accuracy"]["toy"][f"{tiny_gpt2} + MemDec"]
    assert cell["lmbda_from"] == "dev" and cell["dev_accuracy_by_lambda"] == pytest.approx(sampled)
    assert cell["lmbda"] == grid[int(np.argmax(sampled))]
    scored = [p["id"] for p in read_predictions(tmp_path / "out") if p["system"] == str(tiny_gpt2)]
    assert scored == [r["id"] for r in knn_prompt_sample(test, n_sample)]


def knn_dev_accuracy(tiny_gpt2, store, index, records, temperatures, lmbda) -> dict[float, float]:
    """Each T's dev accuracy of (1 − λ)·p_base + λ·p_kNN(T), mixed by hand from KNNLM's p_kNN (its λ = 1) and the
    base's softmax, on unpadded prompts."""
    tok = load_tokenizer("gpt2")
    knnlm = KNNLM(str(tiny_gpt2), store, index, k=8, lmbda=1.0)
    labels = np.array([r["label"] for r in records])
    texts = [r["input"]["text"] + " It was" for r in records] + [" It was"]
    p_base = [direct_next_token_probs(knnlm.base, tok, t) for t in texts]
    accuracy = {}
    for t in temperatures:
        knnlm.temperature = t
        p_knn = [knnlm.log_probs(torch.tensor([tok(x)["input_ids"]]))[0, -1].double().exp() for x in texts]
        mixed = [(1 - lmbda) * pb + lmbda * pk for pb, pk in zip(p_base, p_knn)]
        scores = np.array([direct_dcpmi(p, mixed[-1], class_ids(tok)) for p in mixed[:-1]])
        accuracy[t] = float(credit(scores, labels).mean())
    return accuracy


def test_knn_temperature_is_tuned_on_dev_with_both_lambdas_fixed(tmp_path, tiny_gpt2, verbalizer_store):  # noqa: F811
    """--mix.lmbda and --mix.knn_lmbda both given leave nothing but kNN-LM's T to tune: dev is still scored, and T is
    the grid's first with the best dev accuracy at the fixed λ (by hand), listed out of order here so that the first
    of the tied best is not the last (T was --knn.temperature, 'given', when no λ was left to tune)."""
    store, index = verbalizer_store
    records = [{"id": i, "input": {"text": t}, "label": (i + i // 5) % 2} for i, t in enumerate(TEXTS * 3)]
    folder = write_task_folder(tmp_path / "tasks", SINGLE, records)  # dev: the records reversed
    temperatures, knn_lmbda = [512.0, 0.5, 8.0], 0.5
    report = downstream([str(folder)], [str(tiny_gpt2)], tmp_path / "out",
                        knn=KNNLMRows(datastore=[str(store)], index=[str(index)], k=8, temperature=16.0),
                        mix=DownstreamMixing(lmbda=0.3, knn_lmbda=knn_lmbda, temperature_grid=temperatures),
                        prompts=Prompts(batch_size=8, device="cpu"), bootstrap=Bootstrap(resamples=10))  # fmt: skip
    by_t = knn_dev_accuracy(tiny_gpt2, store, index, records[::-1], temperatures, knn_lmbda)
    best = max(by_t.values())
    tied = [t for t in temperatures if by_t[t] == best]
    assert len(tied) > 1 and len(set(by_t.values())) > 1, f"no tie or no choice on dev: {by_t}"
    cell = report["accuracy"]["toy"][f"{tiny_gpt2} + kNN-LM"]
    assert (cell["knn_temperature"], cell["knn_temperature_from"]) == (tied[0], "dev")
    assert (cell["lmbda"], cell["lmbda_from"]) == (knn_lmbda, "given")
    assert cell["dev_accuracy_by_knn_temperature"] == pytest.approx({f"{t:g}": a for t, a in by_t.items()})
    assert cell["knn_temperature_at_edge"] is False  # tied with another T: says nothing of T beyond the grid


def check_step_scores(lm, router, sequences, scores, prompt_length: int) -> None:
    """Each step's scores against log((1 − λ)·p_base + λ·p_mem) by full passes over the tokens before it, λ the
    router's on the base's last hidden state and logits there (0 under its threshold)."""
    with torch.no_grad():
        for step, got in enumerate(scores):
            ids = sequences[:, : prompt_length + step]
            base = lm.base(ids, output_hidden_states=True)
            lam = direct_lambda(router, base.hidden_states[-1][:, -1], base.logits[:, -1])
            want = direct_mixture(base.logits[:, -1], lm.memdec(ids).logits[:, -1], lam)
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5, msg=f"step {step}")


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_gpt2) -> dict:
    """A mixture with a router whose threshold skips the decoder at some of 12 greedy steps and not at others (the
    steps' tokens and λs by full passes: test_router's planted threshold); the beam test mixes its two models anew."""
    router = spread_router(seed=4, scale=5.0)
    decoder = save_tiny(tmp_path_factory.mktemp("routed") / "mem", seed=1)
    lm = InterpolatedLM(str(tiny_gpt2), str(decoder), 0.3, router=router)
    prompt = torch.randint(0, 50257, (1, 6), generator=torch.Generator().manual_seed(1))
    tokens, lambdas = planted_threshold(lm, router, prompt, 12)
    return {"lm": lm, "router": router, "prompt": prompt, "tokens": tokens, "lambdas": lambdas}


def test_routed_generation_scores_are_each_step_s_router_mixture(routed):
    """generate() with a router returns, beside its tokens, each step's scores and logits: the mixture at that step's
    λ, whether the decoder ran or caught up later on the tokens it skipped; a generation continued from the returned
    cache (the decoder behind the base by the tokens it skipped) goes on with the same scores."""
    lm, router, prompt, tokens, lambdas = (routed[k] for k in ("lm", "router", "prompt", "tokens", "lambdas"))
    steps = tokens.shape[1]
    zero = (lambdas[0] == 0).tolist()
    first = next(i for i in range(1, steps) if zero[i - 1] and not zero[i])  # the first call ends with a skip
    settings = {"do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    whole = lm.generate(prompt, max_new_tokens=steps, output_logits=True, **settings)
    assert torch.equal(whole.sequences[:, prompt.shape[1] :], tokens)
    check_step_scores(lm, router, whole.sequences, whole.scores, prompt.shape[1])
    check_step_scores(lm, router, whole.sequences, whole.logits, prompt.shape[1])
    start = lm.generate(prompt, max_new_tokens=first, **settings)
    assert start.cache.pending_ids is not None  # the decoder is behind the base
    rest = lm.generate(start.sequences, cache=start.cache, max_new_tokens=steps - first, **settings)
    assert torch.equal(rest.sequences[:, prompt.shape[1] :], tokens)
    check_step_scores(lm, router, rest.sequences, [*start.scores, *rest.scores], prompt.shape[1])


def test_routed_beam_scores_are_the_sums_of_each_beam_s_router_mixture(routed, monkeypatch):
    """Beam search with a router that skips the decoder at some steps: each returned beam's score (no length penalty)
    is the sum over its tokens of the router's mixture recomputed by full passes over that beam's prefix; the tokens
    the decoder skipped follow their beam through every reorder (else it caught up on another beam's tokens)."""
    router = spread_router(seed=0, scale=5.0)
    lm = InterpolatedLM(routed["lm"].base, routed["lm"].memdec, 0.3, router=router)
    prompt, steps = routed["prompt"], 10
    router.threshold = float(reference_greedy(lm, router, prompt, steps)[1].quantile(0.7))
    moved, reorder = [], PairCache.reorder_cache

    def spy(cache, beam_idx):
        moved.append(cache.pending_ids is not None and not torch.equal(beam_idx, torch.arange(len(beam_idx))))
        return reorder(cache, beam_idx)

    monkeypatch.setattr(PairCache, "reorder_cache", spy)
    beams = {"num_beams": 3, "num_return_sequences": 3, "eos_token_id": None, "length_penalty": 0.0}
    out = lm.generate(prompt, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True,
                      **beams)  # fmt: skip
    assert any(moved), "no beam reorder moved tokens the decoder skipped: the test would not test them"
    n, totals = prompt.shape[1], []
    with torch.no_grad():
        for row in out.sequences:
            total = 0.0
            for s in range(steps):
                ids = row[None, : n + s]
                base = lm.base(ids, output_hidden_states=True)
                lam = direct_lambda(router, base.hidden_states[-1][:, -1], base.logits[:, -1])
                total += float(direct_mixture(base.logits[:, -1], lm.memdec(ids).logits[:, -1], lam)[0, row[n + s]])
            totals.append(total)
    np.testing.assert_allclose(out.sequences_scores.double().numpy(), totals, atol=1e-4, rtol=1e-6)
