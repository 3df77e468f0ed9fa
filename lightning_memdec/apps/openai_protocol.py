"""OpenAI's completions and chat completions wire format: requests checked into token jobs, tokens into replies.

No model and no server here: what ``memdec serve`` accepts and answers, so that every bad request is refused with
a 4xx before it reaches the batch of another, and the reply shapes are defined once.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI fields not applied here, each with the values that ask for nothing: any other value is refused (400) rather
# than silently ignored (a logit bias or a penalty ignored changes the tokens; an ignored seed breaks reproducibility)
UNSUPPORTED = {
    "stop": (None, "", []), "logprobs": (None, False), "suffix": (None, ""), "tools": (None, []), "echo": (None, False),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "seed": (None,),
}  # fmt: skip


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


@dataclass
class Job:
    """A checked request: the prompt's token ids, its budget and sampling, and how to reply."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: dict
    stream: bool
    chat: bool
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    batch_size: int = 0  # rows of the generate() call that served it, once known (the X-Batch-Size header)

    def payload(self) -> dict:
        """What the inference worker needs (plain data: it crosses a process boundary)."""
        return {"prompt_ids": self.prompt_ids, "max_tokens": self.max_tokens, "sampling": self.sampling}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}", code="malformed_json") from err
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object.", code="malformed_json")
    return body


def check_request(body: dict, served: ServedModel, chat: bool) -> Job:
    """The job a request asks for, or a :class:`RequestError` naming the field at fault and what would do."""
    model = body.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {served.name!r}.",
                           "model", "model_not_found")  # fmt: skip
    for name, no_op in UNSUPPORTED.items():
        if not any(_asks_nothing(body.get(name), value) for value in no_op):
            raise RequestError(400, f"{name!r} is not supported by memdec serve; leave it out.", name, "unsupported")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n = 1 is supported; send n requests for n completions.", "n", "unsupported")
    prompt_ids = chat_prompt(body, served) if chat else completion_prompt(body, served)
    default = body.get("max_completion_tokens", DEFAULT_MAX_TOKENS) if chat else DEFAULT_MAX_TOKENS
    max_tokens = body.get("max_tokens", default)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}.", "max_tokens")
    if served.context is not None and len(prompt_ids) + max_tokens > served.context:
        raise RequestError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}, more than "
                           f"{served.context_limit} of {served.context} tokens; shorten the prompt or lower "
                           "max_tokens.",
                           "max_tokens" if len(prompt_ids) < served.context else "prompt",
                           "context_length_exceeded")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {stream!r}.", "stream")
    return Job(prompt_ids, max_tokens, sampling(body), stream, chat)


def _asks_nothing(value, no_op) -> bool:
    """``value`` equals ``no_op`` as JSON values compare: a number only to a number (``0`` and ``0.0`` alike),
    ``false`` and ``null`` only to themselves."""
    if isinstance(value, bool) or isinstance(no_op, bool) or value is None or no_op is None:
        return value is no_op
    if isinstance(value, (int, float)) != isinstance(no_op, (int, float)):
        return False
    return value == no_op


def sampling(body: dict) -> dict:
    """``generate()`` arguments: temperature 0 is greedy decoding (``do_sample=False``), as OpenAI means it."""
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(400, f"temperature must be a number in [0, 2], got {temperature!r}.", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(400, f"top_p must be a number in (0, 1], got {top_p!r}.", "top_p")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def completion_prompt(body: dict, served: ServedModel) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return served.tokenizer(prompt).input_ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(served.tokenizer) for t in prompt):
            raise RequestError(400, f"prompt token ids must lie in [0, {len(served.tokenizer)}).", "prompt")
        return prompt
    raise RequestError(400, "prompt must be a non-empty string or a non-empty list of token ids (one prompt).",
                       "prompt")  # fmt: skip


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    if not getattr(served.tokenizer, "chat_template", None):
        raise RequestError(400, f"the tokenizer of {served.name!r} has no chat template, so chat completions are not "
                           "available; use /v1/completions with a prompt.", "messages", "no_chat_template")  # fmt: skip
    messages = body.get("messages")
    well_formed = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )  # fmt: skip
    if not well_formed:
        raise RequestError(400, "messages must be a non-empty list of {'role': str, 'content': str}.", "messages")
    ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


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


def reply(job: Job, model: str, text: str, finish_reason: str, completion_tokens: int) -> dict:
    """The whole (non-streamed) response."""
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
             "total_tokens": len(job.prompt_ids) + completion_tokens}  # fmt: skip
    return {**envelope(job, model, streamed=False), "choices": [choice], "usage": usage}


def chunk(job: Job, model: str, text: str, finish_reason: str | None, first: bool = False) -> str:
    """One server-sent event of a streamed response."""
    if job.chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return f"data: {json.dumps({**envelope(job, model, streamed=True), 'choices': [choice]})}\n\n"


def envelope(job: Job, model: str, streamed: bool) -> dict:
    kind = ("chat.completion.chunk" if streamed else "chat.completion") if job.chat else "text_completion"
    return {"id": job.request_id, "object": kind, "created": int(time.time()), "model": model}
