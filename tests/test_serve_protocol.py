"""What `memdec serve` checks and generates, without a server: request checks, detokenizing, batched steps."""

from __future__ import annotations

import json
import random
import socket

import pytest
import torch
from conftest import check_request, save_tiny

from lightning_memdec.apps.openai_protocol import (
    Detokenizer,
    RequestError,
    ServedModel,
    StopText,
    check_requests,
    parse_body,
)
from lightning_memdec.apps.openai_replies import Completion, reply
from lightning_memdec.io.embedded import load_tokenizer


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return ServedModel("m", load_tokenizer("gpt2"), context=64)


def test_chat_without_a_chat_template_is_a_400_naming_the_fix(served):
    assert not getattr(served.tokenizer, "chat_template", None)
    with pytest.raises(RequestError, match="no chat template") as err:
        check_request({"messages": [{"role": "user", "content": "hi"}]}, served, chat=True)
    assert err.value.status == 400 and err.value.body()["error"]["code"] == "no_chat_template"


def test_a_good_request_becomes_its_token_job(served):
    job = check_request({"prompt": "Hello world", "max_tokens": 5, "temperature": 0}, served, chat=False)
    assert job.prompt_ids == served.tokenizer("Hello world").input_ids
    assert job.payload() == {"prompt_ids": job.prompt_ids, "max_tokens": 5, "sampling": {"do_sample": False},
                             "logprobs": None, "echo": False, "stop": [], "adjust": None}  # fmt: skip
    sampled = check_request({"prompt": [1, 2], "temperature": 0.7, "top_p": 0.5}, served, chat=False)
    assert sampled.sampling == {"do_sample": True, "temperature": 0.7, "top_p": 0.5, "top_k": 0}
    assert sampled.max_tokens == 16 and sampled.request_id.startswith("cmpl-")


def test_null_fields_mean_their_defaults(served):
    """OpenAI's API takes null for "use the default"; clients that serialise unset options send it."""
    nulls = {
        name: None
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "stream",
            "n",
            "stop",
            "seed",
            "user",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
        )
    }
    job = check_request({"prompt": "hi", **nulls}, served, chat=False)
    assert job.max_tokens == 16 and not job.stream and job.sampling["do_sample"] and job.sampling["temperature"] == 1
    assert job.adjust is None


@pytest.mark.parametrize("temperature", [1e-6, 1e-300, 5e-324])
def test_temperatures_too_small_to_sample_are_greedy(served, temperature):
    """logits / 1e-300 overflow (the request failed with a 500); the argmax is what such a temperature samples."""
    assert check_request({"prompt": "hi", "temperature": temperature}, served, chat=False).sampling == {
        "do_sample": False
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", {"type": "json_object"}),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("echo", True),  # completions' only
        ("tool_choice", "auto"),
        ("lmbda", 0.5),  # not OpenAI's: ignored, it would leave λ as the server's without a word
        ("top_k", 5),
        ("stream_options", {"include_usage": True, "other": 1}),
    ],
)
def test_fields_that_change_the_output_or_are_not_openai_s_are_refused(served, field, value):
    with pytest.raises(RequestError) as err:
        check_request({"messages": [{"role": "user", "content": "hi"}], field: value}, chat_served(), chat=True)
    assert err.value.status == 400 and err.value.param == field
    assert check_request({"prompt": "hi", "user": "u1", "store": False}, served, chat=False).max_tokens == 16


def chat_served() -> ServedModel:
    tokenizer = load_tokenizer("gpt2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return ServedModel("m", tokenizer, context=64)


def test_a_lone_surrogate_is_a_400_naming_the_field(served):
    """JSON's "\\ud800" decodes to a lone surrogate, which the tokenizer fails on (a bare 500 with a traceback)."""
    from lightning_memdec.apps.tokenizer_endpoints import tokenize

    lone = json.loads('"a \\ud800 b"')
    for call, param in ((lambda: check_request({"prompt": lone}, served, chat=False), "prompt"),
                        (lambda: check_request({"prompt": ["ok", lone]}, served, chat=False), "prompt"),
                        (lambda: check_request({"messages": [{"role": "user", "content": lone}]}, chat_served(),
                                               chat=True), "messages"),
                        (lambda: tokenize({"prompt": lone}, served), "prompt")):  # fmt: skip
        with pytest.raises(RequestError, match="lone surrogate .* at character 2") as err:
            call()
        assert err.value.status == 400 and err.value.param == param
    paired = json.loads('"\\ud83d\\ude00"')  # a surrogate pair is one character: text
    assert check_request({"prompt": paired}, served, chat=False).prompt_ids == served.tokenizer("\U0001f600").input_ids


def test_tokenize_adds_special_tokens_unless_the_body_says_not_to():
    """vLLM's /tokenize adds the tokenizer's special tokens by default: a Llama-style tokenizer's BOS (here gpt2's
    with a BOS post-processor) is counted, as in the prompt the model will see."""
    from tokenizers.processors import TemplateProcessing

    from lightning_memdec.apps.tokenizer_endpoints import tokenize

    tokenizer = load_tokenizer("gpt2")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 50256)])  # fmt: skip
    served = ServedModel("m", tokenizer, context=64)
    with_bos, plain = tokenizer("Hello world").input_ids, tokenizer("Hello world", add_special_tokens=False).input_ids
    assert with_bos == [50256, *plain]  # the guard: the tokenizer really adds a BOS token
    got = tokenize({"prompt": "Hello world"}, served)
    assert got["tokens"] == with_bos and got["count"] == len(with_bos)
    assert tokenize({"prompt": "Hello world", "add_special_tokens": False}, served)["tokens"] == plain


def test_chat_messages_as_openai_sends_them():
    """Content as a list of text parts, an assistant's null content; another role or an image part refused; chat ids
    are chatcmpl-; max_completion_tokens wins over the deprecated max_tokens; n: true is not n = 1."""
    served = chat_served()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": None}]  # fmt: skip
    plain = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": ""}]
    job = check_request({"messages": parts, "max_tokens": 3, "max_completion_tokens": 5}, served, chat=True)
    assert job.prompt_ids == check_request({"messages": plain}, served, chat=True).prompt_ids
    assert job.max_tokens == 5 and job.request_id.startswith("chatcmpl-")
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    for bad in ({"role": "wizard", "content": "hi"}, {"role": "user", "content": [image]}, {"role": "tool"}):
        with pytest.raises(RequestError, match=r"messages\[0\]") as err:
            check_request({"messages": [bad]}, served, chat=True)
        assert err.value.status == 400
    with pytest.raises(RequestError, match="n must be an integer from 1 to 128") as err:
        check_request({"messages": plain, "n": True}, served, chat=True)
    assert err.value.param == "n"
    jobs = check_requests({"messages": plain, "n": 2}, served, chat=True)
    choices = reply(jobs, served, [Completion("a", "stop", 1), Completion("b", "stop", 1)])["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [(0, "a"), (1, "b")]


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it():
    """Megabytes of prompt took the tokenizer seconds on the HTTP process before the context check refused it."""

    class Untouchable:
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized")

        def __len__(self):
            return 50257

    served = ServedModel("m", Untouchable(), context=64, longest_token_bytes=128)
    with pytest.raises(RequestError, match="at least 65 tokens") as err:
        check_request({"prompt": "a" * (65 * 128)}, served, chat=False)
    assert err.value.code == "context_length_exceeded"
    gpt2 = load_tokenizer("gpt2")
    from lightning_memdec.apps.openai_protocol import longest_token_bytes

    longest = longest_token_bytes(gpt2)
    assert longest == max(len(gpt2.decode([i]).encode()) for i in range(len(gpt2)))
    text = "word " * 10_000
    assert len(text.encode()) // longest <= len(gpt2(text).input_ids)  # the bound is a lower bound


@pytest.mark.parametrize("raw", [b"{", b"null", b'"text"', b"\x80"])
def test_malformed_bodies_are_400(raw):
    with pytest.raises(RequestError) as err:
        parse_body(raw)
    assert err.value.status == 400


def test_prompt_token_ids_must_be_the_tokenizer_s(served):
    """An id one past the tokenizer's last is refused with a 400 (in the worker it would fail its whole batch)."""
    size = len(served.tokenizer)
    last = [0, 1, size - 1]
    assert check_request({"prompt": last, "max_tokens": 2}, served, chat=False).prompt_ids == last
    for bad in (size, -1):
        with pytest.raises(RequestError, match=rf"prompt token ids must lie in \[0, {size}\)") as err:
            check_request({"prompt": [1, 2, bad], "max_tokens": 2}, served, chat=False)
        assert (err.value.status, err.value.param) == (400, "prompt")


def test_detokenizer_holds_back_a_split_character():
    tokenizer = load_tokenizer("gpt2")
    text = "naïve café ☕ done"
    ids = tokenizer(text).input_ids
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(t) for t in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_steps_batches_greedy_and_sampled_jobs(tmp_path):
    """Each greedy job of a batch equals generate() on its prompt alone; a sampled job gets exactly its budget
    (no end-of-sequence id is possible when the id set is empty)."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve_worker import generate_steps
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    model = InterpolatedLM(str(save_tiny(tmp_path / "b")), str(save_tiny(tmp_path / "m", n_embd=16, seed=1)), 0.3)
    prompts = [[15496, 612, 11], [87], [464, 5827, 373, 1813, 257]]
    jobs = [
        {"prompt_ids": prompts[0], "max_tokens": 4, "sampling": {"do_sample": False}},
        {"prompt_ids": prompts[1], "max_tokens": 6, "sampling": {"do_sample": True, "temperature": 1.0}},
        {"prompt_ids": prompts[2], "max_tokens": 7, "sampling": {"do_sample": False}},
    ]
    got: list[list[int]] = [[], [], []]
    for step in generate_steps(model, jobs, eos_token_ids={model.generation_config.eos_token_id}):
        assert len(step) == 3
        for row, out in enumerate(step):
            if out:
                got[row].append(out["token"])
    for row in (0, 2):
        ref = model.generate(torch.tensor([prompts[row]]), max_new_tokens=jobs[row]["max_tokens"], do_sample=False)
        assert got[row] == ref[0, len(prompts[row]) :].tolist()
    assert 1 <= len(got[1]) <= 6


def test_static_decoding_streams_what_eager_decoding_streams(tmp_path):
    """The worker's --decoding static model: per-row budgets, EOS, padding and streaming as generate() has them,
    every batch size as the queue's 4 rows."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve_worker import generate_steps, load_generator, static_generator
    from lightning_memdec.inference.static_generation import StaticGenerator

    eager = load_generator("embedded:base-large", "embedded:base-small", 0.3, torch.device("cpu"))
    static = static_generator(eager, mixed=True, batch_rows=4)
    assert isinstance(static, StaticGenerator) and static.batch_rows == 4
    prompts = [[464, 3290, 373, 257, 1310, 13], [40, 588], [1849, 11, 262, 995]]
    for rows in ([0], [0, 1, 2]):
        jobs = [{"prompt_ids": prompts[r], "max_tokens": 5 + 2 * r, "sampling": {"do_sample": False}} for r in rows]
        runs = [list(generate_steps(model, jobs, eos_token_ids={13, 11})) for model in (eager, static)]
        assert runs[0] == runs[1] and len(runs[0]) > 1
    base_alone = load_generator("embedded:base-small", None, 0.3, torch.device("cpu"))
    jobs = [{"prompt_ids": p, "max_tokens": 6, "sampling": {"do_sample": False}} for p in prompts]
    assert list(generate_steps(static_generator(base_alone, False, 4), jobs, {13})) == list(
        generate_steps(base_alone, jobs, {13})
    )


def test_serve_refuses_static_decoding_with_a_router(tmp_path):
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve import serve

    with pytest.raises(ValueError, match="--decoding static decodes at a fixed λ"):
        serve(str(tmp_path), str(tmp_path), router=str(tmp_path), decoding="static")
    with pytest.raises(ValueError, match="--decoding must be eager or static"):
        serve(str(tmp_path), decoding="compiled")


def test_serve_refuses_a_missing_decoder_before_starting(tmp_path):
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve import serve

    base = save_tiny(tmp_path / "b")
    with socket.socket() as probe:  # a port that is free now (serve checks --port before the models)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="--memdec .*nowhere.* not a model directory"):
        serve(str(base), memdec=str(tmp_path / "nowhere"), port=port)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        serve(str(base), memdec=str(base), lmbda=1.5, port=port)
    # a --lmbda that would change nothing: no decoder to weigh, or a router giving λ per token
    with pytest.raises(ValueError, match="--lmbda 0.5 weighs the Memory Decoder, and none is served"):
        serve(str(base), lmbda=0.5, port=port)
    with pytest.raises(ValueError, match="--lmbda 0.5 is a fixed λ, and --router gives λ per token"):
        serve(str(base), memdec=str(base), router=str(tmp_path), lmbda=0.5, port=port)


@pytest.mark.parametrize(
    ("field", "asks_nothing", "refused"),
    [
        ("best_of", 1, 2),
        ("top_logprobs", 0, 3),  # chat's; completions' is logprobs
    ],
)
def test_fields_that_would_change_the_tokens_are_refused_unless_they_ask_for_nothing(served, field, asks_nothing,
                                                                                    refused):  # fmt: skip
    """An ignored logit bias or penalty gives other tokens than asked, an ignored seed no reproducibility."""
    assert check_request({"prompt": "hi", field: asks_nothing}, served, chat=False).max_tokens == 16
    with pytest.raises(RequestError, match=f"'{field}' is not supported") as err:
        check_request({"prompt": "hi", field: refused}, served, chat=False)
    assert err.value.status == 400 and err.value.param == field


def test_logit_bias_and_penalties_become_the_job_s_adjustments(served):
    """JSON's string keys become token ids, sorted; a zero bias or penalty asks for nothing and is left out."""
    body = {"prompt": "hi", "logit_bias": {"50256": -100, "262": 2.5, "13": 0}, "frequency_penalty": 0.5,
            "presence_penalty": 0}  # fmt: skip
    job = check_request(body, served, chat=False)
    assert job.adjust == {"logit_bias": [[262, 2.5], [50256, -100.0]], "frequency_penalty": 0.5}
    assert job.payload()["adjust"] == job.adjust
    chat = {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -2}
    assert check_request(chat, chat_served(), chat=True).adjust == {"presence_penalty": -2.0}
    several = check_requests({"prompt": ["a", "b"], "n": 3, "logit_bias": {"262": -100}}, served, chat=False)
    assert len(several) == 6 and all(j.adjust == {"logit_bias": [[262, -100.0]]} for j in several)  # every choice
    for nothing in ({}, {"logit_bias": {}, "presence_penalty": 0.0, "frequency_penalty": 0}, {"logit_bias": None}):
        assert check_request({"prompt": "hi", **nothing}, served, chat=False).adjust is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": [[262, 1]]}, "logit_bias"),
        ({"logit_bias": {"50257": 1}}, "logit_bias"),  # past the tokenizer's ids
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"２６２": 1}}, "logit_bias"),  # digits, but not ASCII ones
        ({"logit_bias": {"262": 100.5}}, "logit_bias"),
        ({"logit_bias": {"262": True}}, "logit_bias"),
        ({"logit_bias": {"262": "1"}}, "logit_bias"),
        ({"logit_bias": {"262": float("nan")}}, "logit_bias"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "0.5"}, "frequency_penalty"),
    ],
)
def test_bad_logit_bias_and_penalties_are_400s_naming_the_field(served, body, param):
    with pytest.raises(RequestError) as err:
        check_request({"prompt": "hi", **body}, served, chat=False)
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_static_decoding_refuses_logit_bias_and_penalties_naming_the_fix():
    static = ServedModel("m", load_tokenizer("gpt2"), 64, eager=False)
    for asked in ({"logit_bias": {"262": 1}}, {"presence_penalty": 1}, {"frequency_penalty": 0.1}):
        with pytest.raises(RequestError, match="--decoding eager") as err:
            check_request({"prompt": "hi", **asked}, static, chat=False)
        assert err.value.param == next(iter(asked))
    assert check_request({"prompt": "hi", "logit_bias": {"262": 0}}, static, chat=False).adjust is None


def test_the_context_refusal_names_what_sets_the_context():
    static = ServedModel("m", load_tokenizer("gpt2"), 8, "the static caches' length (--decoding static)")
    with pytest.raises(RequestError, match="more than the static caches' length .* of 8 tokens"):
        check_request({"prompt": [1] * 6, "max_tokens": 3}, static, chat=False)


def test_jobs_that_fit_alone_are_never_batched_past_the_context(tmp_path):
    """Left padding widens every row to the longest prompt and the call runs to the largest budget: a short prompt
    with a long budget beside a long prompt with a short one would overflow the context, failing both requests."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve_worker import generate_calls, generate_steps
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    jobs = [
        {"prompt_ids": [50] * 30, "max_tokens": 4, "sampling": {"do_sample": False}},
        {"prompt_ids": [464, 5827, 373], "max_tokens": 20, "sampling": {"do_sample": False}},
        {"prompt_ids": [40, 588], "max_tokens": 6, "sampling": {"do_sample": False}},
    ]
    assert [rows for rows, _ in generate_calls(jobs, context=40)] == [[0], [1, 2]]  # 30 + 20 > 40; 3 + 20 fits
    assert [rows for rows, _ in generate_calls(jobs, context=None)] == [[0, 1, 2]]
    model = InterpolatedLM(str(save_tiny(tmp_path / "b")), str(save_tiny(tmp_path / "m", n_embd=16, seed=1)), 0.3)
    got: list[list[int]] = [[], [], []]
    sizes = set()
    for step in generate_steps(model, jobs, eos_token_ids=set(), context=40):
        for row, out in enumerate(step):
            if out:
                got[row].append(out["token"])
                sizes.add((row, out["batch"]))
    assert sizes == {(0, 1), (1, 2), (2, 2)}
    for job, tokens in zip(jobs, got):
        prompt = torch.tensor([job["prompt_ids"]])
        ref = model.generate(prompt, max_new_tokens=job["max_tokens"], min_new_tokens=job["max_tokens"],
                             do_sample=False)  # fmt: skip
        assert tokens == ref[0, prompt.shape[1] :].tolist()


def test_a_failed_generate_call_fails_its_own_requests_with_a_message(caplog):
    """Its jobs get {"error": message} (the HTTP side answers 500 naming it, not a pickled exception); the jobs
    of other calls still run; the traceback is in the server's log, for the operator."""
    pytest.importorskip("litserve")
    from types import SimpleNamespace

    from lightning_memdec.apps.serve_worker import generate_steps

    class Failing:
        generation_config, device = SimpleNamespace(pad_token_id=0), torch.device("cpu")

        def generate(self, input_ids, **kwargs):
            if kwargs.get("do_sample"):
                raise RuntimeError("CUDA out of memory")
            kwargs["streamer"].put(input_ids)
            kwargs["streamer"].put(torch.full((len(input_ids),), 7))
            kwargs["streamer"].end()

    jobs = [
        {"prompt_ids": [1, 2], "max_tokens": 1, "sampling": {"do_sample": True}},
        {"prompt_ids": [3], "max_tokens": 1, "sampling": {"do_sample": False}},
    ]
    with caplog.at_level("ERROR", logger="lightning_memdec.apps.serve_worker"):
        steps = list(generate_steps(Failing(), jobs, eos_token_ids=set()))
    assert steps == [[{"error": "RuntimeError: CUDA out of memory"}, {}], [{}, {"token": 7, "end": False, "batch": 1}]]
    (record,) = caplog.records
    assert "generation failed for a batch of 1: RuntimeError: CUDA out of memory" in record.getMessage()
    assert record.exc_info is not None and "in generate" in caplog.text  # the traceback, down to the failing call


def test_an_unforeseen_request_failure_is_logged_with_its_traceback(caplog):
    """The client gets a 500 body with the message; the operator's log gets the traceback (nothing was logged)."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.openai_spec import unforeseen_error

    try:
        {}["missing"]
    except KeyError as err:
        with caplog.at_level("ERROR", logger="lightning_memdec.apps.openai_spec"):
            error = unforeseen_error(err)
    assert error.status == 500 and "KeyError" in error.body()["error"]["message"]
    (record,) = caplog.records
    assert "a request failed: KeyError" in record.getMessage() and 'test_serve_protocol.py", line' in caplog.text


def test_an_error_step_becomes_a_500_naming_it(served):
    pytest.importorskip("litserve")
    import asyncio
    import json

    from litserve.utils import LitAPIStatus

    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec

    job = check_request({"prompt": "hi"}, served, chat=False)

    async def steps():
        yield json.dumps({"error": "RuntimeError: CUDA out of memory"}), LitAPIStatus.OK

    async def pieces():
        return [piece async for piece in OpenAICompletionsSpec(served).token_pieces(job, steps())]

    with pytest.raises(RequestError, match="inference worker: RuntimeError: CUDA out of memory$") as err:
        asyncio.run(pieces())
    assert err.value.status == 500 and err.value.body()["error"]["type"] == "server_error"


def test_a_queue_timeout_is_a_504_not_a_generation_failure(served):
    """LitServe answers a request that waited past --queue.timeout with HTTPException(504); it was passed on as a
    500 "generation failed in the inference worker"."""
    pytest.importorskip("litserve")
    import asyncio

    from fastapi import HTTPException
    from litserve.utils import LitAPIStatus

    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec

    job = check_request({"prompt": "hi"}, served, chat=False)

    async def steps():
        yield HTTPException(504, "Request timed out"), LitAPIStatus.ERROR

    async def pieces():
        return [piece async for piece in OpenAICompletionsSpec(served).token_pieces(job, steps())]

    with pytest.raises(RequestError, match="waited in the queue longer than .*--queue.timeout") as err:
        asyncio.run(pieces())
    assert err.value.status == 504 and err.value.code == "timeout"


def test_sampled_requests_draw_from_the_whole_mixture(tmp_path):
    """temperature 1, top_p 1 is OpenAI's plain sampling: generate() alone kept the top 50 tokens (its top_k default),
    and a model's generation_config.json (top_k 20, a repetition penalty) applied too. On a near-uniform random
    model, draws from the whole distribution mostly fall outside its top 50; with top-k 50 none would."""
    pytest.importorskip("litserve")
    from transformers import GenerationConfig

    from lightning_memdec.apps.serve_worker import generate_steps, load_generator

    base = save_tiny(tmp_path / "b")
    GenerationConfig(top_k=20, repetition_penalty=1.3, temperature=0.6, do_sample=True).save_pretrained(base)
    memdec = save_tiny(tmp_path / "m", n_embd=16, seed=1)
    model = load_generator(str(base), str(memdec), 0.3, torch.device("cpu"))
    kept = model.generation_config  # the token ids stay (stopping at EOS), the decoding settings are generate()'s
    assert kept.eos_token_id == 50256 and kept.pad_token_id is not None
    assert kept.to_diff_dict().keys() <= {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}
    served = ServedModel("m", load_tokenizer("gpt2"), context=64)
    job = check_request({"prompt": [464, 5827], "max_tokens": 1, "temperature": 1, "top_p": 1}, served, chat=False)
    torch.manual_seed(0)
    draws = [step[row]["token"] for step in generate_steps(model, [job.payload()] * 40, set()) for row in range(40)]
    with torch.no_grad():
        p = model(torch.tensor([[464, 5827]])).logits[0, -1].softmax(-1)
    ranks = (p[None, :] > p[torch.tensor(draws)][:, None]).sum(-1)  # tokens more likely than each draw
    assert (ranks >= 50).sum() >= 30, ranks.tolist()


def test_a_decoder_of_fewer_ids_without_a_saved_tokenizer_is_refused_before_serving(tmp_path):
    """With no tokenizer saved beside it, only its config tells the decoder's vocabulary: it was refused in the
    worker, after the server listened, with "One or more workers failed to start"."""
    from lightning_memdec.apps.serve import served_model

    base = save_tiny(tmp_path / "b")
    small = save_tiny(tmp_path / "m", vocab=1000, tokenizer=None)
    with pytest.raises(ValueError, match=r"--memdec .* has 1000 token ids .* fewer than the 50257"):
        served_model(str(base), str(small), None)
    padded = save_tiny(tmp_path / "p", vocab=50304, tokenizer=None)  # a head padded past the tokenizer is fine
    assert served_model(str(base), str(padded), None).context == 512


def test_stop_strings_cut_the_text_before_the_first_of_them_however_it_arrives():
    """Against text[: the first index of any stop string], for random splits of the text into pieces: the pieces sent
    never carry a stop string's start (a streamed client cannot take it back)."""
    import random

    rng = random.Random(0)
    text = "The cell membrane.\nProteins fold; the end is near. END of text\n\nNext"
    cases = [["\n"], ["END"], ["fold;", "near"], ["\n\n", "zzz"], ["absent"], ["e", "en"], ["END of text\n\nNext"]]
    for stops in cases:
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = text[: min(found)] if found else text
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            cut, sent, stopped = StopText(stops), "", False
            for piece in pieces:
                out, stopped = cut.add(piece)
                sent += out
                assert not any(sent.endswith(s[:k]) for s in stops for k in range(1, len(s) + 1)) or stopped
                if stopped:
                    break
            sent += "" if stopped else cut.flush()
            assert sent == want and stopped == bool(found), (stops, pieces)


@pytest.mark.parametrize(
    ("stop", "want"),
    [("\n", ["\n"]), (["a", "", "b"], ["a", "b"]), ("", []), ([], []), (None, []), (list("abcdef"), list("abcdef"))],
)
def test_stop_is_a_string_or_up_to_32(served, stop, want):
    """OpenAI takes 4 stop strings; lm-eval's humaneval sends 5 + its end-of-text, as vLLM takes them."""
    assert check_request({"prompt": "hi", "stop": stop}, served, chat=False).stop == want


@pytest.mark.parametrize("stop", [["a"] * 33, [1], {"a": 1}, 3])
def test_other_stops_are_refused(served, stop):
    with pytest.raises(RequestError, match="stop must be a string or a list of at most 32 strings") as err:
        check_request({"prompt": "hi", "stop": stop}, served, chat=False)
    assert err.value.status == 400 and err.value.param == "stop"


def test_a_stop_string_of_more_than_512_characters_is_refused(served):
    """Every token's text is checked against the stop strings (in the HTTP process and the worker): 32 stops of
    16,000 characters stalled the server for seconds a token."""
    assert check_request({"prompt": "hi", "stop": ["a" * 512]}, served, chat=False).stop == ["a" * 512]
    with pytest.raises(RequestError, match="a stop string has 513 characters, more than 512") as err:
        check_request({"prompt": "hi", "stop": ["b", "a" * 513]}, served, chat=False)
    assert (err.value.status, err.value.param) == (400, "stop")
    with pytest.raises(RequestError, match="stop holds a lone surrogate") as err:
        check_request({"prompt": "hi", "stop": [json.loads('"a\\ud800"')]}, served, chat=False)
    assert (err.value.status, err.value.param) == (400, "stop")


def test_the_held_back_end_is_the_longest_that_begins_a_stop_string():
    """Against the direct search over every prefix of every stop, on random texts and stops of a small alphabet
    (where prefixes repeat)."""
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 12)))
        want = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert StopText(stops).held_back(text) == want, (stops, text)


def test_a_stop_string_ends_the_reply_and_drops_the_rest_of_the_steps(served):
    """The worker's steps of one job, as token_pieces reads them: the text ends before the stop string, finish reason
    "stop", the tokens counted up to the one that completed it; later steps are not read."""
    pytest.importorskip("litserve")
    import asyncio
    import json

    from litserve.utils import LitAPIStatus

    from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec

    tokens = served.tokenizer(" one two. three four").input_ids
    job = check_request({"prompt": "hi", "stop": [". th"], "max_tokens": 16}, served, chat=False)
    read = []

    async def steps():
        for t in tokens:
            read.append(t)
            yield json.dumps({"token": t, "end": False, "batch": 1}), LitAPIStatus.OK

    async def pieces():
        return [piece async for piece in OpenAICompletionsSpec(served).token_pieces(job, steps())]

    got = asyncio.run(pieces())
    text = served.tokenizer.decode(tokens)
    assert "".join(p.text for p in got) == text[: text.index(". th")]
    at = next(i for i in range(len(tokens)) if ". th" in served.tokenizer.decode(tokens[: i + 1]))
    assert got[-1][1:3] == ("stop", at + 1) and read == tokens[: at + 1]


def test_tokenizer_endpoints_answer_as_vllm_s(served):
    """/tokenize, /detokenize and /tokenizer_info's bodies (what lm-eval's remote tokenizer reads), bad input a 400."""
    from lightning_memdec.apps.tokenizer_endpoints import detokenize, tokenize, tokenizer_info

    ids = served.tokenizer("Hello world").input_ids
    assert tokenize({"prompt": "Hello world", "add_special_tokens": False}, served) == {
        "tokens": ids, "count": len(ids), "max_model_len": 64,
    }  # fmt: skip
    assert detokenize({"tokens": ids + [50256]}, served) == {"prompt": "Hello world<|endoftext|>"}
    assert detokenize({"tokens": []}, served) == {"prompt": ""}
    info = tokenizer_info(served)
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64 and info["vocab_size"] == 50257
    for call, body, param in ((tokenize, {"prompt": 3}, "prompt"), (tokenize, {"prompt": "a", "add_special_tokens": 1},
                              "add_special_tokens"), (detokenize, {"tokens": [1, 50257]}, "tokens"),
                              (detokenize, {"tokens": "12"}, "tokens")):  # fmt: skip
        with pytest.raises(RequestError) as err:
            call(body, served)
        assert err.value.status == 400 and err.value.param == param
