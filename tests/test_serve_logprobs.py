"""`memdec serve`'s log-probabilities, echo, seeds and several prompts, without a server: each log-probability the
worker sends is checked against the mixture's own forward pass over the same tokens, each reply shape against the
entries it was built from."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
import uuid

import pytest
import torch
from conftest import check_request, save_tiny

from lightning_memdec.apps.openai_protocol import RequestError, ServedModel, check_requests
from lightning_memdec.apps.openai_replies import Completion, TokenLogProb, chat_logprobs, completion_logprobs, reply
from lightning_memdec.io.embedded import load_tokenizer

pytest.importorskip("litserve")
TOP = 3


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return ServedModel("m", load_tokenizer("gpt2"), context=64)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    from lightning_memdec.apps.serve_worker import load_generator

    root = tmp_path_factory.mktemp("logprobs")
    base, memdec = save_tiny(root / "b"), save_tiny(root / "m", n_embd=16, seed=1)
    return load_generator(str(base), str(memdec), 0.3, torch.device("cpu"))


def reference_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(· | ids[:t + 1]) ``[T, V]``: the mixture's forward pass over the whole row, no cache, no padding."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)


def assert_scored(log_prob: float, top: list, reference: torch.Tensor, token: int) -> None:
    """A token's log p and its top list, against the reference row ``[V]``."""
    assert log_prob == pytest.approx(reference[token].item(), abs=1e-4)
    assert [lp for _, lp in top] == pytest.approx(reference.topk(len(top)).values.tolist(), abs=1e-4)
    assert [lp for _, lp in top] == pytest.approx([reference[i].item() for i, _ in top], abs=1e-4)


def run_jobs(model, jobs: list[dict], tokenizer=None, abandoned=None) -> list[list[dict]]:
    """Each job's non-empty steps from the worker."""
    from lightning_memdec.apps.serve_worker import generate_steps

    got: list[list[dict]] = [[] for _ in jobs]
    eos = {model.generation_config.eos_token_id}
    for step in generate_steps(model, jobs, eos_token_ids=eos, vocab=50257, tokenizer=tokenizer, abandoned=abandoned):
        for row, out in enumerate(step):
            if out:
                got[row].append(out)
    return got


def test_each_generated_token_carries_the_mixture_s_log_probs(mixture, served):
    """Greedy and sampled jobs in one batch, left-padded: each token's log p and top list are those of the mixture
    over the row alone, before temperature (a sampled job at temperature 0.5 reports the model's own log p)."""
    bodies = [
        {"prompt": [15496, 612, 11], "max_tokens": 4, "temperature": 0, "logprobs": TOP},
        {"prompt": [87], "max_tokens": 5, "temperature": 0.5, "logprobs": 1},
        {"prompt": [464, 5827, 373, 1813, 257], "max_tokens": 3, "temperature": 0},  # no log-probs asked
    ]
    jobs = [check_request(body, served, chat=False) for body in bodies]
    got = run_jobs(mixture, [job.payload() for job in jobs])
    for job, steps in zip(jobs, got):
        assert len(steps) == job.max_tokens
        if job.logprobs is None:
            assert all("logprob" not in step for step in steps)
            continue
        tokens = [step["token"] for step in steps]
        reference = reference_log_probs(mixture, job.prompt_ids + tokens)
        for t, step in enumerate(steps):
            assert len(step["top"]) == job.logprobs
            assert_scored(step["logprob"], step["top"], reference[len(job.prompt_ids) - 1 + t], step["token"])
        if not job.sampling["do_sample"]:  # greedy: the chosen token is the most likely one
            assert all(step["token"] == step["top"][0][0] for step in steps)


def test_the_base_alone_normalises_over_the_tokenizer_s_ids(tmp_path, served):
    """Served without a decoder, a head padded past the tokenizer (50304 rows for 50257 ids) gives the padding no
    mass: the log-probs are normalised over the tokenizer's ids, prompt and generated tokens alike."""
    from lightning_memdec.apps.serve_worker import load_generator

    base = load_generator(str(save_tiny(tmp_path / "b", vocab=50304)), None, 0.3, torch.device("cpu"))
    job = check_request({"prompt": [464, 5827, 373], "max_tokens": 2, "temperature": 0, "logprobs": 2,
                         "echo": True}, served, chat=False)  # fmt: skip
    ((prompt, *steps),) = run_jobs(base, [job.payload()])
    ids = job.prompt_ids + [step["token"] for step in steps]
    with torch.no_grad():
        reference = base(torch.tensor([ids])).logits[0, :, :50257].log_softmax(-1)
    for t, (log_prob, top) in enumerate(prompt["prompt"][1:], start=1):
        assert_scored(log_prob, top, reference[t - 1], ids[t])
    for t, step in enumerate(steps, start=len(job.prompt_ids)):
        assert_scored(step["logprob"], step["top"], reference[t - 1], step["token"])


def test_the_base_alone_never_decodes_a_padded_head_s_rows(tmp_path, served):
    """A padded row made the likeliest next token: served alone (eager or static), the base decodes the likeliest
    of the tokenizer's ids instead, and its log-probs are those ids' (the padded id had failed the request). The row
    is the first padded one, id 50257 = the tokenizer's size: the boundary an off-by-one leaves open."""
    from transformers import GPT2LMHeadModel

    from lightning_memdec.apps.serve_worker import load_generator, static_generator

    path, prompt = save_tiny(tmp_path / "b", vocab=50304, seed=2), [464, 5827, 373]
    padded = GPT2LMHeadModel.from_pretrained(path)
    with torch.no_grad():  # the head is tied to the embeddings: row 50257 aligned with the prompt's last state
        h = padded.transformer(torch.tensor([prompt])).last_hidden_state[0, -1]
        padded.transformer.wte.weight[50257] = 30 * h / h.norm() ** 2
        logits = padded(torch.tensor([prompt])).logits[0, -1]
    assert logits.argmax() == 50257  # the guard: the first padded row wins over the whole head
    padded.save_pretrained(path)
    base = load_generator(str(path), None, 0.3, torch.device("cpu"))
    job = check_request({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}, served, False)
    (eager,), (static,) = (
        run_jobs(base, [job.payload()]),
        run_jobs(static_generator(base, False, 1, 50257), [{**job.payload(), "logprobs": None}]),
    )
    assert eager[0]["token"] == static[0]["token"] == logits[:50257].argmax().item()
    assert eager[0]["logprob"] == pytest.approx(logits[:50257].log_softmax(-1).max().item(), abs=1e-4)


def test_echo_scores_the_prompt_and_may_ask_for_no_new_tokens(mixture, served):
    prompt = [464, 5827, 373, 1813, 257]
    only_prompt = check_request({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": TOP}, served, False)
    also_two = check_request({"prompt": prompt[:2], "max_tokens": 2, "echo": True, "logprobs": 0}, served, False)
    (scored,), (first, *generated) = run_jobs(mixture, [only_prompt.payload(), also_two.payload()])
    reference = reference_log_probs(mixture, prompt)
    assert scored["prompt"][0] is None and len(scored["prompt"]) == len(prompt)
    for t, (log_prob, top) in enumerate(scored["prompt"][1:], start=1):
        assert_scored(log_prob, top, reference[t - 1], prompt[t])
    assert first["prompt"][1][0] == pytest.approx(reference[0, prompt[1]].item(), abs=1e-4)
    assert first["prompt"][1][1] == [] and len(generated) == 2


def test_a_seeded_sampled_job_draws_the_same_tokens_whatever_it_is_batched_with(mixture, served):
    body = {"prompt": [464, 5827], "max_tokens": 6, "temperature": 1.0, "seed": 7}
    seeded = check_request(body, served, chat=False).payload()
    other = check_request({**body, "prompt": [87, 88], "seed": None}, served, chat=False).payload()
    draws = [[s["token"] for s in steps] for steps in run_jobs(mixture, [seeded, other, seeded])]
    alone = [s["token"] for s in run_jobs(mixture, [seeded])[0]]
    assert draws[0] == draws[2] == alone
    reseeded = check_request({**body, "seed": 8}, served, chat=False).payload()
    assert [s["token"] for s in run_jobs(mixture, [reseeded])[0]] != alone  # the seed is what fixes the draws
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    run_jobs(mixture, [seeded])
    assert torch.equal(torch.rand(3), before)  # the others' draws go on as if the seeded job had not run


def test_completions_logprobs_false_is_none(served):
    assert check_request({"prompt": "hi", "logprobs": False}, served, chat=False).logprobs is None


def test_a_seed_asks_nothing_of_greedy_decoding(served):
    assert check_request({"prompt": "hi", "temperature": 0, "seed": 3}, served, False).sampling == {"do_sample": False}
    assert check_request({"prompt": "hi", "seed": -3}, served, False).sampling["seed"] == -3


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({"logprobs": 6}, False, "logprobs"),  # OpenAI's completions list at most 5
        ({"logprobs": True}, False, "logprobs"),  # false is read as null, true is no count
        ({"logprobs": 2}, True, "logprobs"),  # chat's is true or false
        ({"top_logprobs": 2}, True, "top_logprobs"),  # needs logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
        ({"echo": "yes"}, False, "echo"),
        ({"max_tokens": 0}, False, "max_tokens"),  # no new tokens only with echo
        ({"seed": 1.5}, False, "seed"),
        ({"seed": True}, False, "seed"),
        ({"seed": 2**63}, False, "seed"),  # int64: 2**64 - 1 would draw as -1 does
        ({"prompt": ["a", ""]}, False, "prompt"),
        ({"prompt": ["a", 3]}, False, "prompt"),
    ],
)
def test_bad_log_prob_echo_seed_and_prompt_settings_are_400s(served, body, chat, param):
    start = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    with pytest.raises(RequestError) as err:
        check_requests({**start, **body}, served, chat)
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_static_decoding_refuses_log_probs_and_echo_naming_the_fix():
    static = ServedModel("m", load_tokenizer("gpt2"), 64, eager=False)
    for asked in ({"logprobs": 0}, {"echo": True}):
        with pytest.raises(RequestError, match="--decoding eager"):
            check_request({"prompt": "hi", **asked}, static, chat=False)
    assert check_request({"prompt": "hi"}, static, chat=False).logprobs is None


def test_several_prompts_are_several_jobs_of_one_request(served):
    jobs = check_requests({"prompt": ["Hello", [1, 2, 3], "x"], "max_tokens": 2, "logprobs": 1}, served, chat=False)
    assert [job.index for job in jobs] == [0, 1, 2] and len({job.request_id for job in jobs}) == 1
    assert jobs[1].prompt_ids == [1, 2, 3] and jobs[0].prompt_ids == served.tokenizer("Hello").input_ids
    assert all(job.logprobs == 1 and job.max_tokens == 2 for job in jobs)
    with pytest.raises(RequestError, match="at most"):
        check_requests({"prompt": ["a"] * 257}, served, chat=False)
    with pytest.raises(RequestError, match="prompt 1 has"):
        check_requests({"prompt": [[1], [1] * 63], "max_tokens": 2}, served, chat=False)


def test_completion_logprobs_are_openai_s_shape(served):
    """The chosen token joins its top list when not in it; a prompt's first token has no log p; two ids of one text
    keep the likelier's."""
    tok = served.tokenizer
    the, cat, dot = tok(" the").input_ids[0], tok(" cat").input_ids[0], tok(".").input_ids[0]
    entries = [TokenLogProb(the, None, None, 0), TokenLogProb(cat, -2.0, [[dot, -0.5], [dot, -0.7]], 4)]
    assert completion_logprobs(entries, tok) == {
        "tokens": [" the", " cat"],
        "token_logprobs": [None, -2.0],
        "top_logprobs": [None, {".": -0.5, " cat": -2.0}],
        "text_offset": [0, 4],
    }
    content = chat_logprobs([TokenLogProb(cat, -2.0, [[dot, -0.5]], 0)], tok)["content"]
    assert content == [{"token": " cat", "logprob": -2.0, "bytes": list(b" cat"),
                        "top_logprobs": [{"token": ".", "logprob": -0.5, "bytes": [46]}]}]  # fmt: skip


def test_a_reply_of_several_prompts_has_a_choice_each_and_their_usage(served):
    jobs = check_requests({"prompt": ["Hello there", "x"], "max_tokens": 2}, served, chat=False)
    done = [Completion(" a", "length", 2), Completion("", "stop", 1)]
    body = reply(jobs, served, done)
    assert [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for c in body["choices"]] == [
        (0, " a", "length", None),
        (1, "", "stop", None),
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_a_row_ends_where_its_text_meets_a_stop_string_and_its_batch_mates_go_on(mixture, served):
    """The worker ends a job's row at the token whose text completes a stop string (the first prefix of the greedy
    tokens whose whole-character text holds it), not at max_tokens; a row without stops in the same call is
    unchanged, and a call whose rows all stopped ends there."""
    from lightning_memdec.apps.serve_worker import generate_steps

    tok = served.tokenizer
    free = check_request({"prompt": [464, 5827], "max_tokens": 16, "temperature": 0}, served, False).payload()
    ref = [s["token"] for s in run_jobs(mixture, [free])[0]]
    prefixes = [tok.decode(ref[:t], skip_special_tokens=True) for t in range(len(ref) + 1)]
    stop = prefixes[5][-4:]  # the end of the fifth token's text (met there, or earlier in a repeated text)
    ends = next(t for t, d in enumerate(prefixes) if stop in d and not d.endswith("\ufffd"))
    assert 0 < ends <= 5 and len(ref) == 16
    stopped = {**free, "stop": ["never in it", stop]}
    other = check_request({"prompt": [87, 88], "max_tokens": 16, "temperature": 0}, served, False).payload()
    got = run_jobs(mixture, [stopped, other], tokenizer=tok)
    assert [s["token"] for s in got[0]] == ref[:ends]
    assert [s["token"] for s in got[1]] == [s["token"] for s in run_jobs(mixture, [other])[0]]
    eos = {mixture.generation_config.eos_token_id}
    assert len(list(generate_steps(mixture, [stopped], eos, vocab=50257, tokenizer=tok))) == ends
    assert "stop strings needs the tokenizer" in run_jobs(mixture, [stopped])[0][0]["error"]


def test_an_abandoned_job_s_row_ends_at_its_next_token_and_its_batch_mates_go_on(mixture, served, tmp_path):
    """A job whose client went away (its uid marked by the HTTP process) ends after the token being made, stop
    strings or not, and its mark is taken; a batch-mate's tokens are unchanged; a call of abandoned rows ends."""
    from lightning_memdec.apps.abandoned_jobs import AbandonedJobs
    from lightning_memdec.apps.serve_worker import generate_steps

    abandoned, gone, kept = AbandonedJobs(str(tmp_path)), str(uuid.uuid4()), str(uuid.uuid4())
    free = check_request({"prompt": [464, 5827], "max_tokens": 16, "temperature": 0}, served, False).payload()
    other = check_request({"prompt": [87, 88], "max_tokens": 16, "temperature": 0}, served, False).payload()
    ref = [[s["token"] for s in steps] for steps in run_jobs(mixture, [free, other])]
    assert len(ref[0]) == len(ref[1]) == 16
    for stop in ([], ["never in it"]):
        abandoned.mark(gone)
        got = run_jobs(mixture, [free | {"uid": gone, "stop": stop}, other | {"uid": kept}], served.tokenizer,
                       abandoned)  # fmt: skip
        assert [[s["token"] for s in steps] for steps in got] == [ref[0][:1], ref[1]]
        assert os.listdir(tmp_path) == []
    abandoned.mark(gone)
    eos = {mixture.generation_config.eos_token_id}
    assert len(list(generate_steps(mixture, [free | {"uid": gone}], eos, vocab=50257, abandoned=abandoned))) == 1
    assert [s["token"] for s in run_jobs(mixture, [free | {"uid": gone}], abandoned=abandoned)[0]] == ref[0]


def test_a_mark_never_taken_is_removed_by_a_later_one_once_stale(tmp_path):
    """A job that ended before its client's mark was written leaves a mark no worker takes: a later mark removes it
    once older than STALE_AFTER_S, and keeps younger ones (a queued job's) and its own."""
    from lightning_memdec.apps.abandoned_jobs import STALE_AFTER_S, AbandonedJobs

    abandoned = AbandonedJobs(str(tmp_path))
    stale, young, new = (str(uuid.uuid4()) for _ in range(3))
    abandoned.mark(stale)
    abandoned.mark(young)
    now = time.time()
    os.utime(tmp_path / stale, (now - STALE_AFTER_S - 60,) * 2)
    os.utime(tmp_path / young, (now - STALE_AFTER_S + 60,) * 2)
    abandoned.mark(new)
    assert sorted(os.listdir(tmp_path)) == sorted([young, new])
    assert abandoned.take(young) and abandoned.take(new) and not abandoned.take(stale)


def test_a_job_left_before_its_last_piece_is_marked_abandoned_and_no_other(served, tmp_path):
    """The HTTP process marks a job for the worker when its reply is left unfinished (the client gone, streamed or
    not, or a sibling choice failed); a finished job and a failed one are not marked."""
    from types import SimpleNamespace

    from lightning_memdec.apps.abandoned_jobs import AbandonedJobs
    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec, Piece

    spec = OpenAICompletionsSpec(served, abandoned=AbandonedJobs(str(tmp_path)))
    queued: list[tuple] = []
    spec.request_queue, spec.response_buffer, spec.response_queue_id = SimpleNamespace(put=queued.append), {}, 0
    spec.data_streamer = lambda *args, **kwargs: None  # LitServe's reader of the worker's replies: none here

    async def token_pieces(job, tokens):  # the worker: a job of 9 tokens fails, one of 2 ends, the others hang
        yield Piece("a", None, 1, [])
        if job.max_tokens == 9:
            raise RequestError(500, "generation failed", code="server_error")
        await asyncio.sleep(0 if job.max_tokens == 2 else 30)
        yield Piece("b", "length", 2, [])

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    async def streamed_then_gone(jobs):
        events = spec.events(jobs)
        for _ in range(len(jobs) + 1):  # the first chunks and one piece
            await anext(events)
        await events.aclose()
        # marked as the stream closes, not when the event loop ends (the server's runs on)
        assert all(os.path.exists(tmp_path / payload["uid"]) for *_, payload in queued)

    def marked(run, body) -> list[bool]:
        """Which of the request's jobs were marked."""
        queued.clear()
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)
        jobs = check_requests({"prompt": "Hi", **body}, served, chat=False)
        with contextlib.suppress(RequestError):
            asyncio.run(run(jobs))
        return [os.path.exists(tmp_path / payload["uid"]) for *_, payload in queued]

    spec.token_pieces = token_pieces
    assert marked(lambda jobs: spec.queued_completions(jobs, Gone()), {"max_tokens": 5}) == [True]
    assert marked(lambda jobs: spec.queued_completions(jobs, Gone()), {"max_tokens": 2}) == [False]
    assert marked(lambda jobs: spec.queued_completions(jobs, None), {"max_tokens": 2, "n": 2}) == [False, False]
    assert marked(lambda jobs: spec.queued_completions(jobs, None), {"max_tokens": 9}) == [False]
    assert marked(streamed_then_gone, {"max_tokens": 5, "stream": True}) == [True]
    assert marked(streamed_then_gone, {"max_tokens": 5, "stream": True, "n": 2}) == [True, True]


def test_n_choices_per_prompt_are_jobs_in_openai_s_order_with_seeds_of_their_own(served):
    """n = 3 over two prompts: six jobs, choice index prompt × n + choice; a seeded request's first choice keeps its
    seed (so it is the n = 1 reply), the others get distinct int64 seeds derived from it, the same each time."""
    body = {"prompt": ["Hello there", "x"], "max_tokens": 2, "n": 3, "seed": -5}
    jobs = check_requests(body, served, chat=False)
    assert [(j.index, j.choice, j.prompt_ids) for j in jobs] == [
        (i * 3 + c, c, served.tokenizer(p).input_ids) for i, p in enumerate(body["prompt"]) for c in range(3)
    ]
    seeds = [j.sampling["seed"] for j in jobs]
    assert seeds[0] == seeds[3] == -5 and len(set(seeds[:3])) == 3 and seeds[1:3] == seeds[4:6]
    assert all(0 <= s < 2**63 for s in seeds[1:3])
    assert [j.sampling["seed"] for j in check_requests(body, served, chat=False)] == seeds
    assert check_requests({**body, "seed": 6}, served, chat=False)[1].sampling["seed"] != seeds[1]
    unseeded = check_requests({"prompt": "x", "n": 2}, served, chat=False)
    assert [j.sampling for j in unseeded] == [{"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}] * 2
    done = [Completion(" a", "length", 2)] * 6
    assert reply(jobs, served, done)["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    for bad in (0, 129, 2.0, True, "2"):
        with pytest.raises(RequestError, match="n must be an integer from 1 to 128") as err:
            check_requests({**body, "n": bad}, served, chat=False)
        assert (err.value.status, err.value.param) == (400, "n")
    with pytest.raises(RequestError, match="3 prompts × n = 100 make 300 completions") as err:
        check_requests({"prompt": ["a", "b", "c"], "n": 100}, served, chat=False)
    assert err.value.param == "n"


def test_seeded_choices_draw_differently_and_the_first_as_the_n_1_request(mixture, served):
    body = {"prompt": [464, 5827], "max_tokens": 8, "temperature": 1.0, "seed": 11}
    choices = [job.payload() for job in check_requests({**body, "n": 3}, served, chat=False)]
    draws = [[s["token"] for s in steps] for steps in run_jobs(mixture, choices)]
    alone = [s["token"] for s in run_jobs(mixture, [check_request(body, served, chat=False).payload()])[0]]
    assert draws[0] == alone and draws[1] != draws[0] and draws[2] not in draws[:2]
    assert [[s["token"] for s in steps] for steps in run_jobs(mixture, choices[::-1])] == draws[::-1]


def test_echoed_pieces_give_the_prompt_then_the_tokens_with_their_offsets(served):
    """What token_pieces makes of an echo job's steps: the prompt's text and log-probs, then each token's, every
    offset pointing at where the token's text begins in the choice's text."""
    from litserve.utils import LitAPIStatus

    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec

    tok = served.tokenizer
    prompt, tokens = tok("The cat sat").input_ids, tok(" on the mat").input_ids
    job = check_request({"prompt": prompt, "max_tokens": len(tokens), "echo": True, "logprobs": 1}, served, False)
    scored = [None] + [(-1.0 * t, [[7, -0.1]]) for t in range(1, len(prompt))]

    async def steps():
        yield json.dumps({"prompt": scored, "batch": 1}), LitAPIStatus.OK
        for t in tokens:
            step = {"token": t, "end": False, "batch": 1, "logprob": -0.25, "top": [[t, -0.25]]}
            yield json.dumps(step), LitAPIStatus.OK

    async def pieces():
        return [piece async for piece in OpenAICompletionsSpec(served).token_pieces(job, steps())]

    got = asyncio.run(pieces())
    text = "".join(p.text for p in got)
    entries = [e for p in got for e in p.log_probs]
    assert text == "The cat sat on the mat" and got[-1].finish_reason == "length"
    assert [e.id for e in entries] == prompt + tokens
    assert [e.log_prob for e in entries] == [None, -1.0, -2.0] + [-0.25] * len(tokens)
    for e in entries:
        assert text[e.offset :].startswith(tok.decode([e.id]))


@pytest.mark.parametrize("prompt", ["a<|endoftext|>b", "and\ufffdx", "中文 text 😀 ok", "plain words"])
def test_prompt_offsets_count_the_characters_before_each_token(served, prompt):
    """Against the tokens' own bytes (GPT-2's byte-level alphabet): a token's offset is the number of whole
    characters before it; the echoed text is the prompt, special tokens and a literal U+FFFD included."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from lightning_memdec.apps.openai_replies import prompt_offsets

    tok, byte_of = served.tokenizer, {c: b for b, c in bytes_to_unicode().items()}
    ids = tok(prompt).input_ids
    pieces = [bytes(byte_of[c] for c in tok.convert_ids_to_tokens(i)) for i in ids]
    want = [len(b"".join(pieces[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]
    assert tok.decode(ids) == prompt and prompt_offsets(tok, ids) == want


def test_chat_bytes_of_tokens_inside_a_character_rebuild_the_text(served):
    """A token that is part of a character reads U+FFFD as text, but its bytes are its own: joined, the bytes of a
    reply's tokens are the reply's text (GPT-2's byte-level tokens here; sentencepiece byte tokens below)."""
    from lightning_memdec.apps.openai_replies import token_bytes

    text = "中文 text 😀 ok"
    ids = served.tokenizer(text).input_ids
    assert any("\ufffd" in served.tokenizer.decode([i]) for i in ids)  # the guard: some tokens split a character
    content = chat_logprobs([TokenLogProb(i, -1.0, [], 0) for i in ids], served.tokenizer)["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode("utf-8")

    class ByteFallback:  # a sentencepiece tokenizer's byte tokens, as HF's Llama tokenizer shows them
        def decode(self, ids):
            return "\ufffd"

        def convert_ids_to_tokens(self, token):
            return f"<0x{token:02X}>"

    assert token_bytes(ByteFallback(), 0xE4) == b"\xe4"


def test_a_request_s_prompts_are_queued_a_batch_s_worth_at_a_time(served):
    """At most jobs_in_flight of one request's jobs wait in the queue at once, so another client's request queued
    meanwhile is generated before the rest of them (a request of 256 prompts held everyone else until a 504)."""
    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec, Piece

    class Spec(OpenAICompletionsSpec):
        queued, most = 0, 0

        async def pieces(self, job):
            self.queued += 1
            self.most = max(self.most, self.queued)
            await asyncio.sleep(0.001)  # the worker generating it
            self.queued -= 1
            yield Piece(str(job.index), "length", 1, [])

    jobs = check_requests({"prompt": [[1]] * 20, "max_tokens": 1}, served, chat=False)
    spec = Spec(served, jobs_in_flight=8)
    done = asyncio.run(spec.queued_completions(jobs))
    assert [c.text for c in done] == [str(i) for i in range(20)] and spec.most == 8


def test_the_log_prob_limits_are_openai_s_inclusive(served):
    """completions' logprobs 0–5 and chat's top_logprobs 0–20 are accepted at their maxima and refused past them."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    chat_served = ServedModel("m", copy.deepcopy(served.tokenizer), context=64)
    chat_served.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert check_request({"prompt": "Hello", "logprobs": 5}, served, chat=False).logprobs == 5
    assert check_request({**chat, "top_logprobs": 20}, chat_served, chat=True).logprobs == 20
    for body, is_chat, name in (({"prompt": "Hello", "logprobs": 6}, False, "logprobs"),
                                ({**chat, "top_logprobs": 21}, True, "top_logprobs")):  # fmt: skip
        with pytest.raises(RequestError, match=f"{name} must be an integer from 0 to") as err:
            check_request(body, chat_served, chat=is_chat)
        assert err.value.param == name


def test_a_streamed_reply_s_first_chunk_has_no_log_probs(served):
    """The role chunk carries `logprobs: null`, as OpenAI's; the log-probs come with the tokens' chunks."""
    from lightning_memdec.apps.openai_protocol import Job
    from lightning_memdec.apps.openai_replies import chunk

    for is_chat in (False, True):
        job = Job([1, 2], 4, {"do_sample": False}, stream=True, chat=is_chat, logprobs=2)
        first = json.loads(chunk(job, served, "", None, first=True)[len("data: ") :])
        assert first["choices"][0]["logprobs"] is None
        later = json.loads(chunk(job, served, " a", None, log_probs=[TokenLogProb(257, -1.0, [], 0)])[len("data: ") :])
        assert later["choices"][0]["logprobs"] is not None


def spec_pieces(served, job, steps: list[dict]):
    """What the HTTP process makes of the worker's ``steps`` for ``job``: its :class:`Piece` list."""
    from litserve.utils import LitAPIStatus

    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec

    async def stream():
        for step in steps:
            yield json.dumps(step), LitAPIStatus.OK

    async def pieces():
        return [piece async for piece in OpenAICompletionsSpec(served).token_pieces(job, stream())]

    return asyncio.run(pieces())


def test_an_echo_only_request_ends_with_length_and_a_cut_character_is_kept(served):
    """lm-eval's scoring request (echo, max_tokens 0) ends with finish_reason "length" after the prompt; a reply cut by
    max_tokens inside a character keeps the character's start (U+FFFD), so its text is the tokens' decode."""
    tok = served.tokenizer
    job = check_request({"prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 1}, served, chat=False)
    scored = [None] + [[-1.0, [[1, -0.5]]] for _ in job.prompt_ids[1:]]
    pieces = spec_pieces(served, job, [{"prompt": scored, "batch": 1}])
    assert ("".join(p.text for p in pieces), pieces[-1].finish_reason) == ("Hello world", "length")
    made = [tok.convert_tokens_to_ids("Ġa"), tok.convert_tokens_to_ids("ä")]  # ' a', then 0xE4: a character's start
    job = check_request({"prompt": "Hello", "max_tokens": 2, "temperature": 0}, served, chat=False)
    pieces = spec_pieces(served, job, [{"token": t, "end": False, "batch": 1} for t in made])
    assert ("".join(p.text for p in pieces), pieces[-1].finish_reason) == (tok.decode(made), "length")
    assert tok.decode(made).endswith("\ufffd")


def test_a_row_past_its_end_of_sequence_streams_none():
    """stream_generate's rows: the EOS id is the row's last token; after it, None (not generate()'s padding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.inference.streamed_generation import stream_generate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=8, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        first = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in ([1, 2, 3], [4, 5, 6], [7, 8])]
    eos = first[0]  # row 0's first greedy token, made the end-of-sequence id
    other = [4, 5, 6] if first[1] != eos else [7, 8]
    assert first[[1, 2][other == [7, 8]]] != eos
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 0
    steps = list(stream_generate(model, [[1, 2, 3], other], [4, 4], {eos}, do_sample=False))
    assert [None if s[0] is None else s[0].id for s in steps] == [eos, None, None, None]
    assert all(s[1] is not None for s in steps)


def test_each_row_streams_exactly_its_own_budget():
    """stream_generate's rows of budgets 2 and 5 (the server's max_tokens per prompt): row 0 streams generate()'s
    first 2 greedy tokens, then None, row 1 its first 5; no row streams a token past its budget."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.inference.streamed_generation import stream_generate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=8, n_layer=1, n_head=2)).eval()
    prompts, budgets = [[1, 2, 3], [4, 5, 6]], [2, 5]
    want = model.generate(torch.tensor(prompts), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = min(set(range(50)) - set(want[:, 3:].flatten().tolist()))  # an id neither row makes: only budgets end
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 0
    steps = list(stream_generate(model, prompts, budgets, {eos}, do_sample=False))
    for row, budget in enumerate(budgets):
        streamed = [s[row].id for s in steps if s[row] is not None]
        assert streamed == want[row, 3 : 3 + budget].tolist()
    assert [s[0] is None for s in steps] == [step >= budgets[0] for step in range(budgets[1])]


def test_a_failed_or_abandoned_request_queues_no_more_of_its_jobs(served):
    """n = 8, two jobs in flight: once a job fails (a queue timeout) or the client is gone, the jobs not yet queued
    never are (they kept the queue busy for a reply no one would read, and made later clients time out)."""
    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec, Piece

    spec = OpenAICompletionsSpec(served, jobs_in_flight=2)
    jobs = check_requests({"prompt": "Hi", "n": 8, "max_tokens": 2}, served, chat=False)
    started: list[int] = []

    async def pieces(job):
        started.append(job.index)
        if job.index == 0 and failing:
            raise RequestError(504, "timed out in the queue", code="timeout")
        await asyncio.sleep(0.2)
        yield Piece("x", "length", 2, [])

    class GoneAfterFirstCheck:
        async def is_disconnected(self) -> bool:
            return True

    async def run(request) -> RequestError:
        with pytest.raises(RequestError) as err:
            await spec.queued_completions(jobs, request)
        await asyncio.sleep(1.0)  # what is still queued would start and finish by now
        return err.value

    spec.pieces = pieces
    failing = True
    assert asyncio.run(run(None)).status == 504 and 0 in started and len(started) <= 3
    started.clear()
    failing = False
    error = asyncio.run(run(GoneAfterFirstCheck()))
    assert (error.status, error.code) == (499, "client_closed_request") and 0 < len(started) <= 4
    started.clear()
    assert len(asyncio.run(spec.queued_completions(jobs, None))) == 8 and sorted(started) == list(range(8))
