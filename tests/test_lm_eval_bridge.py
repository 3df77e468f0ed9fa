"""The lm-evaluation-harness bridge: an offline lm_eval task on base + MemDec equals the package's own scorer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data are local files; never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from conftest import save_tiny  # noqa: E402

from lightning_memdec.evaluation.lm_eval_bridge import MemDecLM, run_lm_eval
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.token_corpus import position_windows
from lightning_memdec.kernels.scoring import gold_log_probs, mix_log_probs

pytestmark = pytest.mark.slow  # the harness and its tasks load for ~15 s
TEXTS = ["A dull, tired film.", "Warm and funny, with a cast that clearly enjoys itself", "Fine."]
LMBDA = 0.3


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm_eval_models")
    return save_tiny(root / "base", seed=0), save_tiny(root / "dec", n_embd=16, seed=2)


def own_log_likelihood(base, dec, tok, context, continuation) -> float:
    """The package's scorer: each model's gold log-probs (scoring.gold_log_probs), mixed by scoring.mix_log_probs."""
    ctx = tok(context)["input_ids"] if isinstance(context, str) else context
    cont = tok(continuation)["input_ids"] if isinstance(continuation, str) else continuation
    ids = torch.tensor([ctx + cont])
    labels = torch.full_like(ids, -100)
    labels[0, len(ctx) - 1 : -1] = torch.tensor(cont)
    with torch.no_grad():
        lp = [gold_log_probs(m(input_ids=ids).logits, labels, len(tok)).double() for m in (base, dec)]
    return float(mix_log_probs(lp[0], lp[1], LMBDA)[labels != -100].sum())


class Request:
    def __init__(self, *args):
        self.args = args


def test_harness_loglikelihoods_equal_the_package_scorer(tmp_path, pair):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: memdec_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}} It was"\n'
        'doc_to_choice: ["bad", "good"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    base_dir, dec_dir = pair
    out = run_lm_eval(str(base_dir), str(dec_dir), ["memdec_toy"], lmbda=LMBDA, include_path=tasks, batch_size=2,
                      log_samples=True, bootstrap_iters=0)  # fmt: skip
    samples = out["samples"]["memdec_toy"]
    assert len(samples) == len(TEXTS)
    tok = load_tokenizer("gpt2")
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    for s in samples:
        text = s["doc"]["text"]
        got = [r[0] for r in s["filtered_resps"]]
        want = [own_log_likelihood(base, dec, tok, f"{text} It was", f" {c}") for c in ("bad", "good")]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert "acc,none" in out["results"]["memdec_toy"]


def test_rolling_and_generation(pair):
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), lmbda=LMBDA, max_length=8, batch_size=3)
    tok = lm.tokenizer
    text = TEXTS[1] + " " + TEXTS[0]
    [rolling] = lm.loglikelihood_rolling([Request(text)])
    ids = tok(text)["input_ids"]
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    # every token after EOS scored once, with the context of its window (corpus.position_windows, 8 positions)
    tokens = [tok.eos_token_id] + ids
    windows = position_windows(len(tokens) - 1, 8, 8)
    want, scored = 0.0, []
    for s, f in zip(windows.starts.tolist(), windows.score_from.tolist()):
        want += own_log_likelihood(base, dec, tok, tokens[s : s + f + 1], tokens[s + f + 1 : s + 9])
        scored += list(range(s + f, s + 8))
    assert len(ids) > 16 and scored == list(range(len(ids)))
    assert rolling == pytest.approx(want, rel=1e-4, abs=1e-4)
    first = own_log_likelihood(base, dec, tok, tok.eos_token, tok.decode(ids[:8]))
    [(ll, _)] = lm.loglikelihood([Request("", tok.decode(ids[:8]))])
    assert ll == pytest.approx(first, rel=1e-4, abs=1e-4)
    [gen] = lm.generate_until([Request("The film", {"until": ["\n"], "max_gen_toks": 3})])
    assert isinstance(gen, str)


def test_rolling_texts_shorter_than_the_context_are_one_window(pair):
    """A text shorter than max_length raised `need 0 < stride <= window` (the window shrank to the text, the stride
    stayed max_length): most documents of a task are shorter than 512 or 1,024 tokens. Empty text scores 0."""
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), lmbda=LMBDA, max_length=64, batch_size=2)
    tok = lm.tokenizer
    texts = [TEXTS[1], TEXTS[2], ""]
    got = lm.loglikelihood_rolling([Request(t) for t in texts])
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    for text, value in zip(texts[:2], got):
        ids = tok(text)["input_ids"]
        assert 0 < len(ids) < 64
        assert value == pytest.approx(own_log_likelihood(base, dec, tok, [tok.eos_token_id], ids), rel=1e-4, abs=1e-4)
    assert got[2] == 0.0


def test_pairs_are_encoded_as_lm_evals_hf_model_encodes_them(pair):
    """A context ending in a space was scored as [..., " "] + ["Paris"]; lm_eval moves the space onto the
    continuation and splits the whole text's tokens ([...] + [" Paris"]). A one-token context with an empty
    continuation crashed; a continuation longer than the window raised deep inside torch."""
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), LMBDA, batch_size=2)
    tok = load_tokenizer("gpt2")
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    (got, _), (same, _), (empty, greedy) = lm.loglikelihood(
        [Request("The capital is ", "Paris"), Request("The capital is", " Paris"), Request("x", "")]
    )
    assert tok("The capital is ")["input_ids"][-1] == tok(" ")["input_ids"][0]  # the space is a token of its own
    assert got == same == pytest.approx(own_log_likelihood(base, dec, tok, "The capital is", " Paris"), abs=1e-4)
    assert (empty, greedy) == (0.0, True)
    with pytest.raises(ValueError, match="continuation of 600 tokens is longer than the models' 512 positions"):
        lm.loglikelihood([Request("a", " b" * 600)])


def mixed_log_probs(base, dec, ids: list[int]) -> torch.Tensor:
    """log((1 − λ)·p_base + λ·p_dec) at every position ``[T, V]``, straight from the two models (logaddexp)."""
    with torch.no_grad():
        lb, ld = (m(torch.tensor([ids])).logits[0].double().log_softmax(-1) for m in (base, dec))
    return torch.logaddexp(lb + math.log(1 - LMBDA), ld + math.log(LMBDA))


def greedy_reference(base, dec, ids: list[int], new: int) -> list[int]:
    """``new`` tokens, each the argmax of the mixture after the ones before it (no cache, no padding)."""
    out = list(ids)
    for _ in range(new):
        out.append(int(mixed_log_probs(base, dec, out)[-1].argmax()))
    return out[len(ids) :]


def test_is_greedy_only_when_every_continuation_token_is_the_mixture_s_argmax(pair):
    """lm_eval's is_greedy: every token of the continuation is the argmax given the ones before it. Two-token
    continuations greedy at the first token only, at the second only, and at both."""
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), LMBDA, batch_size=3)
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    ctx = lm.tokenizer("The capital of France is")["input_ids"]

    def ranked(ids: list[int], rank: int) -> int:  # the rank-th likeliest next token (0: the greedy one)
        return int(mixed_log_probs(base, dec, ids)[-1].argsort(descending=True)[rank])

    g, x = ranked(ctx, 0), ranked(ctx, 5)
    continuations = [[g, ranked(ctx + [g], 0)], [g, ranked(ctx + [g], 5)], [x, ranked(ctx + [x], 0)]]
    got = lm._loglikelihood_tokens([(("", ""), ctx, cont) for cont in continuations])
    for (ll, greedy), cont in zip(got, continuations):
        ref = mixed_log_probs(base, dec, ctx + cont)[len(ctx) - 1 : -1]  # the rows predicting the continuation
        assert greedy == all(int(ref[i].argmax()) == t for i, t in enumerate(cont))
        assert ll == pytest.approx(float(sum(ref[i, t] for i, t in enumerate(cont))), abs=1e-4)
    assert [greedy for _, greedy in got] == [True, False, False]  # the guard: each case is what it claims


def test_generate_until_is_the_greedy_continuation_of_the_context_s_last_tokens(pair):
    """A context longer than max_length − max_gen_toks keeps its last tokens, so that context + new tokens fit the
    models' positions; the text returned is the new tokens' only, decoded."""
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), LMBDA, max_length=16, batch_size=2)
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    ids = lm.tokenizer(text)["input_ids"]
    assert len(ids) > 16 - 4  # the guard: the context must be cut
    want = lm.tokenizer.decode(greedy_reference(base, dec, ids[-(16 - 4) :], 4))
    assert lm.generate_until([Request(text, {"until": [], "max_gen_toks": 4})]) == [want]


def test_generate_until_cuts_at_the_first_stop_and_top_k_1_sampling_is_greedy(pair):
    """The text before the first occurrence of a stop string, not after it; a sampled request's top_k is applied
    (top_k = 1 leaves the greedy token only)."""
    base_dir, dec_dir = pair
    lm = MemDecLM(str(base_dir), str(dec_dir), LMBDA, batch_size=2)
    base, dec = load_causal_lm(base_dir).eval(), load_causal_lm(dec_dir).eval()
    new = greedy_reference(base, dec, lm.tokenizer("The film")["input_ids"], 5)
    greedy, stop = lm.tokenizer.decode(new), lm.tokenizer.decode(new[-1:])
    assert stop in greedy and greedy.split(stop)[0] != greedy.split(stop)[-1]  # the guard: where it cuts matters
    assert lm.generate_until([Request("The film", {"until": [stop], "max_gen_toks": 5})]) == [greedy.split(stop)[0]]
    torch.manual_seed(0)
    sampled = {"until": [], "max_gen_toks": 5, "do_sample": True, "top_k": 1}
    assert lm.generate_until([Request("The film", sampled)] * 2) == [greedy, greedy]
