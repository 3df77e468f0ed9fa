"""`memdec serve` end to end: a real server on 127.0.0.1 with tiny models, driven by an HTTP client.

Every greedy answer is checked token for token against ``InterpolatedLM.generate`` on the same prompt alone; the
bad requests each get their 4xx and the server answers the next good request. One server for the module (its start
is most of the time), shut down at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")

LMBDA = 0.3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["Hello there, how are", "The patient was given", "x", "In 1990 the city", "Proteins fold into",
           "A B C D E F G", "def main():", "She said that the"]  # fmt: skip
STARTUP_S = 300  # a loaded 2-core CI machine takes ~1 min to import and spawn the workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A tiny base whose tokenizer has a chat template, a tiny decoder sharing its vocabulary, and the reference."""
    from transformers import AutoTokenizer

    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    root = tmp_path_factory.mktemp("serve")
    base = save_tiny(root / "base", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    memdec = save_tiny(root / "memdec", n_embd=16, n_layer=1, seed=1)
    return {"base": base, "memdec": memdec, "reference": InterpolatedLM(str(base), str(memdec), LMBDA)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(models, log_dir: Path, *options: str):
    """``memdec serve`` of the tiny models with ``options`` on a free port: its URL while it runs."""
    port = free_port()
    cmd = [sys.executable, "-m", "lightning_memdec", "serve", "--base", str(models["base"]), "--memdec",
           str(models["memdec"]), "--lmbda", str(LMBDA), "--port", str(port), "--device", "cpu",
           "--queue.max_batch_size", "8", "--queue.batch_timeout", "0.05", "--model_name", "tiny-mix",
           *options]  # fmt: skip
    log = (log_dir / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server not up after {STARTUP_S} s: {Path(log.name).read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with running_server(models, tmp_path_factory.mktemp("serve-log")) as url:
        yield url


def greedy(models, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The reference: InterpolatedLM.generate greedy on this prompt alone, end-of-sequence id included if reached."""
    out = models["reference"].generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def expected_text(models, tokens: list[int]) -> str:
    tokenizer = models["reference"].tokenizer
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_greedy_completion_equals_interpolated_lm_generate(server, models):
    tokenizer = models["reference"].tokenizer
    ids = tokenizer(PROMPTS[0]).input_ids
    ref = greedy(models, ids, 8)
    models["reference"].lmbda = 0.0  # the guard: the served λ matters for this prompt (the base alone differs)
    assert greedy(models, ids, 8) != ref
    models["reference"].lmbda = LMBDA
    r = complete(server, model="tiny-mix", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-mix"
    assert body["choices"][0]["text"] == expected_text(models, ref)
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(ref),
        "total_tokens": len(ids) + len(ref),
    }
    assert body["choices"][0]["finish_reason"] == ("stop" if ref[-1] == tokenizer.eos_token_id else "length")


def test_logit_bias_and_penalties_change_the_tokens_as_openai_defines_them(server, models):
    """Over HTTP, beside a request without them in the same batch: each equals greedy decoding by hand."""
    from test_logit_adjustments import adjusted_greedy

    tokenizer = models["reference"].tokenizer
    ids = tokenizer(PROMPTS[1]).input_ids
    plain = adjusted_greedy(models["reference"], ids, 6, None)
    body = {"logit_bias": {str(plain[0]): -100, "262": 4}, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    adjust = {"logit_bias": [[plain[0], -100], [262, 4]], "frequency_penalty": 1.5, "presence_penalty": 0.5}
    expected = adjusted_greedy(models["reference"], ids, 6, adjust)
    assert expected != plain  # the guard
    with ThreadPoolExecutor(2) as pool:
        adjusted = pool.submit(complete, server, prompt=ids, max_tokens=6, temperature=0, logprobs=0, **body)
        alone = pool.submit(complete, server, prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    for r, tokens in ((adjusted.result(), expected), (alone.result(), plain)):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in tokens]


def test_concurrent_requests_each_equal_their_greedy_reference(server, models):
    tokenizer = models["reference"].tokenizer
    budgets = [3 + i for i in range(len(PROMPTS))]  # different lengths and budgets in one batch
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda pb: complete(server, prompt=pb[0], max_tokens=pb[1], temperature=0),
                                zip(PROMPTS, budgets)))  # fmt: skip
    assert max(int(r.headers["x-batch-size"]) for r in replies) > 1  # the server batched concurrent requests
    for prompt, budget, r in zip(PROMPTS, budgets, replies):
        assert r.status_code == 200, r.text
        ref = greedy(models, tokenizer(prompt).input_ids, budget)
        assert r.json()["choices"][0]["text"] == expected_text(models, ref), prompt
        assert r.json()["usage"]["completion_tokens"] == len(ref)


def test_requests_that_fit_alone_never_fail_together(server, models):
    """A long prompt with a short budget beside a short prompt with a long one: each fits the 512-token context
    alone; in one generate() call (left-padded to the longest prompt, run to the largest budget) they would not."""
    short = models["reference"].tokenizer(PROMPTS[1]).input_ids
    bodies = [{"prompt": [50] * 481, "max_tokens": 4}, {"prompt": short, "max_tokens": 200}] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: complete(server, temperature=0, **body), bodies))
    for body, r in zip(bodies, replies):
        assert r.status_code == 200, r.text
        ref = greedy(models, body["prompt"], body["max_tokens"])
        assert r.json()["choices"][0]["text"] == expected_text(models, ref)


def test_static_decoding_serves_the_same_tokens(models, tmp_path):
    """--decoding static: StaticGenerator behind the same protocol; concurrent requests of several lengths and
    budgets (one batch, padded to the queue's 8 rows) each equal their greedy reference."""
    tokenizer = models["reference"].tokenizer
    budgets = [3 + i for i in range(len(PROMPTS))]
    with running_server(models, tmp_path, "--decoding", "static") as url:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda pb: complete(url, prompt=pb[0], max_tokens=pb[1], temperature=0),
                                    zip(PROMPTS, budgets)))  # fmt: skip
    assert max(int(r.headers["x-batch-size"]) for r in replies) > 1
    for prompt, budget, r in zip(PROMPTS, budgets, replies):
        assert r.status_code == 200, r.text
        ref = greedy(models, tokenizer(prompt).input_ids, budget)
        assert r.json()["choices"][0]["text"] == expected_text(models, ref), prompt


def test_sampled_and_greedy_requests_together(server, models):
    """A batch mixing sampled and greedy requests: the greedy one is still exact, the sampled one has its budget."""
    tokenizer = models["reference"].tokenizer
    with ThreadPoolExecutor(4) as pool:
        sampled = [
            pool.submit(complete, server, prompt=p, max_tokens=5, temperature=1.0, top_p=0.9) for p in PROMPTS[:3]
        ]
        exact = pool.submit(complete, server, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert exact.result().json()["choices"][0]["text"] == expected_text(
        models, greedy(models, tokenizer(PROMPTS[3]).input_ids, 6)
    )
    for future in sampled:
        usage = future.result().json()["usage"]
        assert 1 <= usage["completion_tokens"] <= 5


def test_a_stop_string_cuts_the_greedy_text_streamed_or_not(server, models):
    """The reply ends before the first stop string (OpenAI's `stop`), finish reason "stop", whether streamed or not."""
    tokenizer = models["reference"].tokenizer
    ref = expected_text(models, greedy(models, tokenizer(PROMPTS[1]).input_ids, 10))
    at = next(k for k in range(1, len(ref) - 3) if ref.find(ref[k : k + 3]) == k)  # a stop first met inside the text
    stop = ref[at : at + 3]
    body = {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stop": [stop, "never in it"]}
    r = complete(server, **body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (ref[: ref.find(stop)], "stop")
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=120) as streamed:
        events = sse_events(streamed)
    assert "".join(e["choices"][0]["text"] for e in events) == ref[: ref.find(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def sse_events(response: httpx.Response) -> list:
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_completion_is_the_greedy_text_in_pieces(server, models):
    tokenizer = models["reference"].tokenizer
    ref = greedy(models, tokenizer(PROMPTS[1]).input_ids, 10)
    body = {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == expected_text(models, ref)
    assert len([p for p in pieces if p]) > 1  # streamed, not one piece at the end
    assert [e["choices"][0]["finish_reason"] for e in events][-1] in ("stop", "length")
    assert len({e["id"] for e in events}) == 1


def test_chat_completion_uses_the_chat_template(server, models):
    tokenizer = models["reference"].tokenizer
    messages = [{"role": "user", "content": "What is a protein?"}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    ref = greedy(models, ids, 6)
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": expected_text(models, ref)}
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as streamed:
        events = sse_events(streamed)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected_text(models, ref)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ({"prompt": [50] * 512, "max_tokens": 4}, 400, "prompt"),  # the context is 512 tokens
        ({"prompt": [50] * 500, "max_tokens": 20}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "", "max_tokens": 3}, 400, "prompt"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": ["hi", "ho"], "n": 129}, 400, "n"),
        ({"prompt": "hi", "stop": ["a"] * 33}, 400, "stop"),
        ({"prompt": "hi", "logit_bias": {"50257": -100}}, 400, "logit_bias"),  # past the tokenizer's ids
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, param):
    r = complete(server, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert complete(server, prompt="hi", max_tokens=2, temperature=0).status_code == 200


def test_malformed_json_gets_400(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(f"{server}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "malformed_json"
    assert complete(server, prompt="hi", max_tokens=2, temperature=0).status_code == 200


def test_models_lists_the_served_name(server):
    assert [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]] == ["tiny-mix"]
    assert httpx.get(f"{server}/v1/models/tiny-mix").json()["id"] == "tiny-mix"  # openai's models.retrieve
    assert httpx.get(f"{server}/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"


def test_unknown_paths_and_methods_get_openai_error_bodies(server):
    for response, status in ((httpx.get(f"{server}/v1/completions"), 405), (httpx.post(f"{server}/v2/x"), 404)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text


def test_a_stream_asking_for_usage_ends_with_it(server, models):
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        events = sse_events(r)
    prompt_tokens = len(models["reference"].tokenizer(PROMPTS[0]).input_ids)
    made = len(greedy(models, models["reference"].tokenizer(PROMPTS[0]).input_ids, 4))
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": made,
                                   "total_tokens": prompt_tokens + made}  # fmt: skip
    assert all("usage" not in e for e in events[:-1])


def test_echo_with_logprobs_scores_prompt_and_completion_as_the_mixture_does(server, models):
    """OpenAI's scoring request (echo, logprobs, temperature 0): every token's log p is the mixture's, the prompt's
    first has none, and the reply's text is prompt + completion."""
    tokenizer, reference = models["reference"].tokenizer, models["reference"]
    ids = tokenizer(PROMPTS[4]).input_ids
    r = complete(server, prompt=ids, max_tokens=2, temperature=0, logprobs=2, echo=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    made = greedy(models, ids, 2)
    assert choice["text"] == PROMPTS[4] + expected_text(models, made)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids + made]
    with torch.no_grad():
        rows = reference.log_probs(torch.tensor([ids + made]))[0]  # [T, V]: log p(next | prefix)
    want = [rows[t - 1, token].item() for t, token in enumerate(ids + made) if t > 0]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) in (2, 3) for top in logprobs["top_logprobs"][1:])
    assert all(choice["text"][o:].startswith(t) for o, t in zip(logprobs["text_offset"], logprobs["tokens"]))


def test_streamed_and_chat_logprobs_are_the_whole_reply_s(server, models):
    """Streamed, each chunk carries the log-probs of its tokens (one held back with its text comes later): together
    they are the non-streamed reply's. Chat's logprobs (true, top_logprobs 2) are the same numbers in chat's shape."""
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 1}
    whole = complete(server, **body).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        events = sse_events(r)
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    joined = {k: [x for p in parts for x in p[k]] for k in whole}
    assert len(parts) > 1 and joined.keys() == whole.keys()
    assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(whole["token_logprobs"])
    assert [top.keys() for top in joined["top_logprobs"]] == [top.keys() for top in whole["top_logprobs"]]
    assert all(a == pytest.approx(b) for a, b in zip(joined["top_logprobs"], whole["top_logprobs"], strict=True))
    messages = [{"role": "user", "content": "What is a protein?"}]
    chat = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=120)
    content = r.json()["choices"][0]["logprobs"]["content"]
    tokenizer = models["reference"].tokenizer
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    made = greedy(models, ids, 4)
    with torch.no_grad():
        rows = models["reference"].log_probs(torch.tensor([ids + made]))[0, len(ids) - 1 : -1]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in made]
    assert [c["logprob"] for c in content] == pytest.approx(rows.gather(1, torch.tensor([made]).T)[:, 0].tolist(),
                                                            abs=1e-4)  # fmt: skip
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6 for c in content)


def test_a_request_of_many_prompts_gets_each_prompt_s_greedy_text(server, models):
    """24 prompts in one request (three batches' worth): a choice each, in the prompts' order, each its greedy
    reference."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(24)]
    r = complete(server, prompt=prompts, temperature=0, max_tokens=12)
    assert r.status_code == 200, r.text
    tokenizer = models["reference"].tokenizer
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [expected_text(models, greedy(models, tokenizer(p).input_ids, 12)) for p in prompts]


def streamed_choices(events: list) -> dict:
    """A streamed reply's choices by index: their texts joined, their last finish reason."""
    texts, reasons = {}, {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons.get(choice["index"])
    return {i: (texts[i], reasons[i]) for i in sorted(texts)}


def test_n_choices_seeded_reproducible_and_streamed_interleaved(server, models):
    """n = 3 seeded: three choices that differ, the same again, the first the n = 1 reply's, and streamed the same
    texts. Two prompts × n = 2 greedy, streamed: each choice's pieces join to its prompt's greedy text, and the usage
    counts each prompt once."""
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 3}
    whole = [(c["index"], c["text"], c["finish_reason"]) for c in complete(server, **body).json()["choices"]]
    assert [i for i, _, _ in whole] == [0, 1, 2] and len({text for _, text, _ in whole}) > 1
    assert [(c["index"], c["text"], c["finish_reason"]) for c in complete(server, **body).json()["choices"]] == whole
    assert complete(server, **{**body, "n": 1}).json()["choices"][0]["text"] == whole[0][1]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert streamed_choices(sse_events(r)) == {i: (text, reason) for i, text, reason in whole}
    tokenizer = models["reference"].tokenizer
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    made = [greedy(models, prompt, 6) for prompt in ids]
    body = {"prompt": PROMPTS[:2], "n": 2, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        events = sse_events(r)
    got = streamed_choices(events[:-1])
    assert {i: text for i, (text, _) in got.items()} == {i: expected_text(models, made[i // 2]) for i in range(4)}
    assert all(reason in ("stop", "length") for _, reason in got.values())
    assert events[-1]["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert events[-1]["usage"]["completion_tokens"] == 2 * (len(made[0]) + len(made[1]))


def test_lm_evaluation_harness_local_completions_scores_as_memdec_lm_does(server, models):
    """lm-eval's `local-completions` model (token-id prompts, two per request, echo + logprobs) against this server
    gives the log-likelihoods and greedy flags of lm-eval's in-process `memdec` model, and its generations. Given only
    the URL, it finds the server's tokenizer endpoints and tokenizes through them."""
    pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lightning_memdec.evaluation.lm_eval_bridge import MemDecLM

    pairs = [("The patient was", " given a"), ("In 1990", " the city"), ("x", " y z"), ("Proteins fold", " into")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    remote = LocalCompletionsAPI(model="tiny-mix", base_url=f"{server}/v1/completions", batch_size=2, max_length=512)
    assert remote.tokenizer_backend == "remote"
    local = MemDecLM(str(models["base"]), str(models["memdec"]), lmbda=LMBDA)
    served, direct = remote.loglikelihood(requests), local.loglikelihood(requests)
    assert [ll for ll, _ in served] == pytest.approx([ll for ll, _ in direct], abs=1e-3)
    assert [greedy for _, greedy in served] == [greedy for _, greedy in direct]
    assert len({ll for ll, _ in served}) == len(pairs)  # the guard: four different scores, not one repeated
    until = Instance("generate_until", {}, (PROMPTS[0], {"until": ["\n\n"], "max_gen_toks": 6}), 0)
    text = expected_text(models, greedy(models, models["reference"].tokenizer(PROMPTS[0]).input_ids, 6))
    assert remote.generate_until([until]) == [text.split("\n\n")[0]]


def children(pid: int | str) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead child not yet waited for)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_the_server_process_stops_all_of_it(models, tmp_path):
    """`kill PID` left the HTTP process and the inference worker serving, orphaned, on the port."""
    with running_server(models, tmp_path) as url:
        port = url.rsplit(":", 1)[1].encode()  # not the module's server, which runs beside it
        (pid,) = [
            c for c in children("self") if b"\0--port\0" + port + b"\0" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        family, todo = [], [pid]
        while todo:
            family.append(todo.pop())
            todo += children(family[-1])
        assert len(family) >= 3  # the server, its HTTP process and its inference worker
        os.kill(pid, signal.SIGTERM)  # the main process only, as `kill PID` or a supervisor sends it
        deadline = time.monotonic() + 60
        while any(map(running, family)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(map(running, family)), [Path(f"/proc/{p}/cmdline").read_bytes() for p in family if running(p)]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
