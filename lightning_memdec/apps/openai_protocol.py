"""OpenAI's completions and chat completions requests, checked into token jobs; generated tokens into text.

No model and no server here: what ``memdec serve`` accepts, so that every bad request is refused with a 4xx before
it reaches the batch of another; the replies' shapes are :mod:`openai_replies`'.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import numpy

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
GREEDY_BELOW = 1e-5  # a temperature under this samples the argmax anyway (and overflows fp32 logits near 0): greedy
# OpenAI fields not applied here, each with the values that ask for nothing: any other value is refused (400) rather
# than silently ignored (a logit bias or a penalty ignored changes the tokens). `echo` and `top_logprobs` are applied by
# one endpoint each (completions, chat) and refused by the other unless they ask for nothing.
UNSUPPORTED = {
    "suffix": (None, ""), "tools": (None, []), "echo": (None, False), "best_of": (None, 1), "top_logprobs": (None, 0),
    "functions": (None, []), "function_call": (None, "none"), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,),
}  # fmt: skip
# OpenAI fields that change nothing in the tokens (bookkeeping), accepted as they are
BOOKKEEPING = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
               "safety_identifier", "reasoning_effort", "verbosity"}  # fmt: skip
APPLIED = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
           "logit_bias", "presence_penalty", "frequency_penalty"}  # fmt: skip
APPLIED_BY = {"completions": {"prompt", "echo"}, "chat": {"messages", "max_completion_tokens", "top_logprobs"}}
MAX_STOP_STRINGS = 32  # OpenAI takes 4; lm-eval's tasks send up to 5 + the end-of-text (vLLM: no limit)
MAX_STOP_CHARS = 512  # characters of one stop string: each token's text is checked against them, in both processes
LOGIT_BIAS_RANGE = (-100, 100)  # OpenAI's: -100 bans a token, 100 all but forces it
PENALTY_RANGE = (-2, 2)  # OpenAI's, for presence_penalty and frequency_penalty
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # OpenAI's limits: completions' logprobs, chat's top_logprobs
MAX_PROMPTS = 256  # prompts in one completions request
MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_CHOICES = 256  # prompts × n: the jobs one request makes
SEED_RANGE = (-(2**63), 2**63)  # int64, as OpenAI's; torch.manual_seed reads them mod 2**64, so no two alias
CHAT_ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the served name, the shared tokenizer, the context in tokens (and what
    sets it, for the refusal's message)."""

    name: str
    tokenizer: object
    context: int | None
    context_limit: str = "the model's context"
    longest_token_bytes: int | None = None  # the most UTF-8 bytes one token decodes to (:func:`longest_token_bytes`)
    eager: bool = True  # the worker decodes with generate(): log-probs, echo, logit bias, penalties (not static)


def longest_token_bytes(tokenizer) -> int:
    """The most bytes of text one token stands for: a prompt of B bytes has at least B / this many tokens, so a
    prompt far beyond the context is refused without tokenizing it (megabytes take the tokenizer seconds)."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return max(1, *(len(piece.encode("utf-8")) for piece in pieces))


def text_bytes(text: str, param: str) -> bytes:
    """``text`` as UTF-8, or a 400: JSON's ``\\ud800`` escapes can carry a lone surrogate, which is no text (the
    tokenizer fails on it)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{param} holds a lone surrogate ({text[err.start]!r} at character {err.start}), which "
                           "is not text; send valid Unicode (a high surrogate escape followed by a low one).",
                           param) from None  # fmt: skip


def check_prompt_size(size: int, served: ServedModel) -> None:
    if served.context is None or served.longest_token_bytes is None:
        return
    at_least = size // served.longest_token_bytes
    if at_least > served.context:
        raise RequestError(400, f"the prompt ({size} bytes) has at least {at_least} tokens, more than "
                           f"{served.context_limit} of {served.context} tokens; shorten the prompt.", "prompt",
                           "context_length_exceeded")  # fmt: skip


@dataclass
class Job:
    """A checked request: the prompt's token ids, its budget and sampling, and how to reply."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: dict
    stream: bool
    chat: bool
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    include_usage: bool = False  # streamed: a last chunk with the usage (stream_options.include_usage)
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these
    logprobs: int | None = None  # each token's log p and this many most likely tokens with it; None: no log-probs
    echo: bool = False  # the reply's text (and log-probs) begin with the prompt's
    index: int = 0  # its choice's place in the reply: prompt × n + choice (a completions request may send several)
    choice: int = 0  # which of its prompt's n choices (the first counts the prompt's tokens in the usage)
    batch_size: int = 0  # rows of the generate() call that served it, once known (the X-Batch-Size header)
    adjust: dict | None = None  # logit bias and penalties (:func:`logit_adjustments`); None: the model's own logits

    def payload(self) -> dict:
        """What the inference worker needs (plain data: it crosses a process boundary); the stop strings let it end
        the row where the reply's text ends (:class:`CompletionText`), not at ``max_tokens``."""
        return {"prompt_ids": self.prompt_ids, "max_tokens": self.max_tokens, "sampling": self.sampling,
                "logprobs": self.logprobs, "echo": self.echo, "stop": self.stop, "adjust": self.adjust}  # fmt: skip


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}", code="malformed_json") from err
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object.", code="malformed_json")
    return body


def check_requests(body: dict, served: ServedModel, chat: bool) -> list[Job]:
    """The jobs a request asks for (n per prompt), or a :class:`RequestError` naming the field at fault and what
    would do. A field sent as ``null`` means its default, as in OpenAI's API."""
    body = {name: value for name, value in body.items() if value is not None}
    model = body.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {served.name!r}.",
                           "model", "model_not_found")  # fmt: skip
    check_fields(body, chat)
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise RequestError(400, f"n must be an integer from 1 to {MAX_N} (completions per prompt), got {n!r}.", "n")
    top, echo = requested_logprobs(body, chat), body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(400, f"echo must be true or false, got {echo!r}.", "echo")
    if (top is not None or echo) and not served.eager:
        raise RequestError(400, "logprobs and echo need the server's --decoding eager (it decodes with static "
                           "caches, which keep no log-probabilities); leave them out.", "logprobs",
                           "unsupported")  # fmt: skip
    adjust = logit_adjustments(body, served)
    prompts = [chat_prompt(body, served)] if chat else completion_prompts(body, served)
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(name, DEFAULT_MAX_TOKENS)  # chat: max_completion_tokens wins, max_tokens is deprecated
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < (0 if echo else 1):
        raise RequestError(400, f"{name} must be a positive integer (0 only with echo), got {max_tokens!r}.", name)
    for i, prompt_ids in enumerate(prompts):
        if served.context is not None and len(prompt_ids) + max_tokens > served.context:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise RequestError(400, f"{which} has {len(prompt_ids)} tokens and {name} is {max_tokens}, more than "
                               f"{served.context_limit} of {served.context} tokens; shorten the prompt or lower "
                               f"{name}.", name if len(prompt_ids) < served.context else "prompt",
                               "context_length_exceeded")  # fmt: skip
    if len(prompts) * n > MAX_CHOICES:
        raise RequestError(400, f"{len(prompts)} prompts × n = {n} make {len(prompts) * n} completions, more than "
                           f"{MAX_CHOICES} in one request; split the request.", "n")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {stream!r}.", "stream")
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    settings, stops = sampling(body), stop_strings(body)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    return [
        Job(prompt_ids, max_tokens, choice_sampling(settings, choice), stream, chat, request_id, include_usage,
            stop=stops, logprobs=top, echo=echo, index=i * n + choice, choice=choice, adjust=adjust)
        for i, prompt_ids in enumerate(prompts)
        for choice in range(n)
    ]  # fmt: skip


def choice_sampling(settings: dict, choice: int) -> dict:
    """A choice's sampling: a seeded request's first choice draws from its seed (as with n = 1), each other from a
    seed of its own derived from it (numpy's SeedSequence: n choices of one seed differ, and are reproducible)."""
    if choice == 0 or "seed" not in settings:
        return settings
    state = numpy.random.SeedSequence(settings["seed"] % 2**64, spawn_key=(choice,)).generate_state(1, numpy.uint64)
    return settings | {"seed": int(state[0] >> numpy.uint64(1))}  # in [0, 2**63): an int64 as the request's seeds


def requested_logprobs(body: dict, chat: bool) -> int | None:
    """How many most likely tokens to list with each token's log-probability, or None for no log-probabilities:
    completions' ``logprobs`` (an integer), chat's ``logprobs`` (true or false) with its ``top_logprobs``."""
    endpoint = "chat" if chat else "completions"
    limit, name = MAX_LOGPROBS[endpoint], "top_logprobs" if chat else "logprobs"
    top = body.get(name, 0 if chat else None)
    if top is False and not chat:  # completions' logprobs is an integer or null; false is read as null
        top = None
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= limit):
        raise RequestError(400, f"{name} must be an integer from 0 to {limit} (how many most likely tokens to list "
                           f"with each token), got {top!r}.", name)  # fmt: skip
    if not chat:
        return top
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise RequestError(400, f"logprobs must be true or false, got {wanted!r}.", "logprobs")
    if top and not wanted:
        raise RequestError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
    return top if wanted else None


def logit_adjustments(body: dict, served: ServedModel) -> dict | None:
    """``logit_bias`` (token ids, as JSON's string keys, to a number in [-100, 100]) and ``presence_penalty`` /
    ``frequency_penalty`` (numbers in [-2, 2]) as the worker applies them (plain JSON: ``logit_bias`` as sorted
    ``[id, bias]`` pairs); those that ask for nothing left out, None when none is left."""
    adjust: dict = {}
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict):
        raise RequestError(400, f"logit_bias must be an object of token ids to biases, got {bias!r}.", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < len(served.tokenizer)):
            raise RequestError(400, f"logit_bias keys must be token ids in [0, {len(served.tokenizer)}) written as "
                               f"strings, got {key!r}.", "logit_bias")  # fmt: skip
        if not _is_number_in(value, LOGIT_BIAS_RANGE):
            raise RequestError(400, f"logit_bias values must be numbers in [{LOGIT_BIAS_RANGE[0]}, "
                               f"{LOGIT_BIAS_RANGE[1]}], got {value!r} for token {key}.", "logit_bias")  # fmt: skip
        if value != 0:
            pairs.append([int(key), float(value)])
    if pairs:
        adjust["logit_bias"] = sorted(pairs)
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name, 0)
        if not _is_number_in(value, PENALTY_RANGE):
            raise RequestError(400, f"{name} must be a number in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}], got "
                               f"{value!r}.", name)  # fmt: skip
        if value != 0:
            adjust[name] = float(value)
    if adjust and not served.eager:
        raise RequestError(400, "logit_bias and the penalties need the server's --decoding eager (static decoding "
                           "runs no logits processors); leave them out.", next(iter(adjust)),
                           "unsupported")  # fmt: skip
    return adjust or None


def _is_number_in(value, bounds: tuple[float, float]) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and bounds[0] <= value <= bounds[1]


def stop_strings(body: dict) -> list[str]:
    """``stop``: a string or a list of at most :data:`MAX_STOP_STRINGS` strings of at most :data:`MAX_STOP_CHARS`
    characters; empty ones ask for nothing."""
    stop = body.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(x, str) for x in stops):
        raise RequestError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, got "
                           f"{stop!r}.", "stop")  # fmt: skip
    for x in stops:  # a lone surrogate is no text: refused as in a prompt
        text_bytes(x, "stop")
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise RequestError(400, f"a stop string has {longest} characters, more than {MAX_STOP_CHARS}; shorten it.",
                           "stop")  # fmt: skip
    return [x for x in stops if x]


def check_fields(body: dict, chat: bool) -> None:
    """Refuse a field that would change the tokens if applied (unless it asks for nothing) and a field OpenAI's API
    does not have (``lmbda``, ``top_k``): ignored, either would change what the client gets without a word."""
    applied = APPLIED | APPLIED_BY["chat" if chat else "completions"]
    for name, no_op in UNSUPPORTED.items():
        if name not in applied and not any(_asks_nothing(body.get(name), value) for value in no_op):
            raise RequestError(400, f"{name!r} is not supported by memdec serve; leave it out.", name, "unsupported")
    known = applied | BOOKKEEPING | set(UNSUPPORTED)
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(400, f"unrecognized request argument(s) {unknown}: not part of OpenAI's "
                           f"{'chat completions' if chat else 'completions'} API; leave them out (λ is set per "
                           "server, --lmbda).", unknown[0], "unrecognized_argument")  # fmt: skip
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError(400, f"stream_options takes only include_usage, got {options!r}.", "stream_options")


def _asks_nothing(value, no_op) -> bool:
    """``value`` equals ``no_op`` as JSON values compare: a number only to a number (``0`` and ``0.0`` alike),
    ``false`` and ``null`` only to themselves."""
    if isinstance(value, bool) or isinstance(no_op, bool) or value is None or no_op is None:
        return value is no_op
    if isinstance(value, (int, float)) != isinstance(no_op, (int, float)):
        return False
    return value == no_op


def sampling(body: dict) -> dict:
    """``generate()`` arguments: temperature 0 (or under :data:`GREEDY_BELOW`) is greedy decoding, as OpenAI means
    it; sampling draws from the whole distribution (``top_k=0``: generate() would keep only the top 50 tokens), from
    torch's generators seeded with ``seed`` first when one is sent (the worker generates such a job alone)."""
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(400, f"temperature must be a number in [0, 2], got {temperature!r}.", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(400, f"top_p must be a number in (0, 1], got {top_p!r}.", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <
                             SEED_RANGE[1]):  # fmt: skip
        raise RequestError(400, f"seed must be an integer in [-2**63, 2**63), got {seed!r}.", "seed")
    if temperature < GREEDY_BELOW:
        return {"do_sample": False}  # greedy decoding draws nothing: a seed changes nothing
    settings = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    return settings if seed is None else settings | {"seed": seed}


def completion_prompts(body: dict, served: ServedModel) -> list[list[int]]:
    """The prompts' token ids: ``prompt`` is a string, a list of token ids, or a list of either (several prompts, as
    OpenAI's API and lm-evaluation-harness send them)."""
    prompt = body.get("prompt")
    several = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if several else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}; split them.",
                           "prompt")  # fmt: skip
    return [one_prompt(p, served) for p in prompts]


def one_prompt(prompt, served: ServedModel) -> list[int]:
    if isinstance(prompt, str) and prompt:
        check_prompt_size(len(text_bytes(prompt, "prompt")), served)
        return served.tokenizer(prompt).input_ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(served.tokenizer) for t in prompt):
            raise RequestError(400, f"prompt token ids must lie in [0, {len(served.tokenizer)}).", "prompt")
        return prompt
    raise RequestError(400, "prompt must be a non-empty string, a non-empty list of token ids, or a list of such "
                       "prompts.", "prompt")  # fmt: skip


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    if not getattr(served.tokenizer, "chat_template", None):
        raise RequestError(400, f"the tokenizer of {served.name!r} has no chat template, so chat completions are not "
                           "available; use /v1/completions with a prompt.", "messages", "no_chat_template")  # fmt: skip
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {'role': str, 'content': str}.", "messages")
    messages = [chat_message(m, i) for i, m in enumerate(messages)]
    check_prompt_size(sum(len(text_bytes(m["content"], "messages")) for m in messages), served)
    ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def chat_message(message, index: int) -> dict:
    """``{"role", "content"}`` with the content as one string: OpenAI's list of text parts joined, an assistant's
    ``null`` content as empty; another role, or a part that is not text, refused."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise RequestError(400, f"{where} must be {{'role': one of {list(CHAT_ROLES)}, 'content': str}}; got "
                           f"{message!r}.", "messages")  # fmt: skip
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        content = ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"{where}.content must be a string or a list of text parts "
                           f"({{'type': 'text', 'text': str}}); got {content!r}.", "messages")  # fmt: skip
    return {"role": message["role"], "content": content}


class Detokenizer:
    """A completion's text as its tokens arrive: each new piece, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.sent = text[len(self.sent) :], text
        return piece


class StopText:
    """A completion's text cut before the first of its stop strings, as pieces arrive: each call gives what can be
    sent, holding back an end that may begin a stop string (a streamed client never sees a stop string's start)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""
        # per stop, for each character c: the lengths k (longest first, k < len(stop)) whose prefix stop[:k] ends in c;
        # a text can end with a stop's prefix only where its last character is that prefix's last
        self.prefix_ends = []
        for stop in stops:
            ends: dict[str, list[int]] = {}
            for k in range(len(stop) - 1, 0, -1):
                ends.setdefault(stop[k - 1], []).append(k)
            self.prefix_ends.append(ends)

    def add(self, piece: str) -> tuple[str, bool]:
        """(text to send, whether a stop string was reached: the completion ends there)."""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = self.held_back(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def held_back(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop string (0: none)."""
        keep = 0
        for stop, ends in zip(self.stops, self.prefix_ends):
            for k in ends.get(text[-1:], ()):
                if k <= keep:
                    break
                if text.endswith(stop[:k]):
                    keep = k
                    break
        return keep

    def flush(self) -> str:
        """The held-back end, once no more text comes."""
        held, self.held = self.held, ""
        return held


class CompletionText:
    """A completion's text as its tokens arrive (neither an end-of-sequence id nor a token past the budget): each
    token's piece to send and whether a stop string ended the text there. The one rule for where a reply's text
    ends, followed by the server's HTTP process (the reply) and its worker (which ends the row at that token)."""

    def __init__(self, tokenizer, stops: list[str], max_tokens: int):
        self.detokenizer, self.stop = Detokenizer(tokenizer), StopText(stops)
        self.max_tokens, self.count = max_tokens, 0

    def add(self, token: int) -> tuple[str, bool]:
        self.count += 1
        piece = self.detokenizer.add(token) + (self.detokenizer.flush() if self.count == self.max_tokens else "")
        return self.stop.add(piece)

    def ends_at(self, token: int) -> bool:
        """Whether the text ends at ``token`` (a stop string met)."""
        return self.add(token)[1]
