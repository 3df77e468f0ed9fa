"""OpenAI's reply shapes for ``memdec serve``: whole responses, streamed chunks, usage and log-probabilities.

No model and no server here: what a checked :class:`~lightning_memdec.apps.openai_protocol.Job` is answered with,
defined once for both endpoints (completions and chat completions).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from dataclasses import dataclass, field

from lightning_memdec.apps.openai_protocol import Job, ServedModel


@dataclass(frozen=True)
class TokenLogProb:
    """One token of a reply's log-probabilities: its id, its log p (None for a prompt's first token, which has no
    context), the most likely tokens at its step ``[[id, log p], …]``, and where its text begins in the choice's
    text (in characters)."""

    id: int
    log_prob: float | None
    top: list | None
    offset: int


@dataclass
class Completion:
    """What one job's reply holds once generated."""

    text: str
    finish_reason: str
    completion_tokens: int
    log_probs: list[TokenLogProb] = field(default_factory=list)


def token_text(tokenizer, token: int) -> str:
    """A token as text, alone (a token that is part of a character shows as U+FFFD; a sentencepiece tokenizer drops
    a word's leading space here)."""
    return tokenizer.decode([token])


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (also Llama 3's, Qwen's): the character each byte is written as in a token."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, stand_in = {}, 256
    for byte in range(256):  # a printable byte is itself; the others take 256, 257, … in byte order
        alphabet[chr(byte if byte in printable else stand_in)] = byte
        stand_in += byte not in printable
    return alphabet


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's UTF-8 bytes: its text's, or, for a token that is part of a character (its text a U+FFFD), the bytes
    it stands for (a byte-level BPE token's, a sentencepiece ``<0xNN>`` byte token's)."""
    text = token_text(tokenizer, token)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece, alphabet = tokenizer.convert_ids_to_tokens(token) or "", byte_level_alphabet()
    if (byte := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:
        return bytes([int(byte[1], 16)])
    if piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return text.encode("utf-8")


def completion_logprobs(entries: list[TokenLogProb], tokenizer) -> dict:
    """``/v1/completions``' logprobs: each token, its log p, the most likely tokens (as OpenAI: with the chosen
    token added if it is not among them) and its offset in the text."""
    tokens = [token_text(tokenizer, e.id) for e in entries]
    tops = []
    for text, e in zip(tokens, entries):
        if e.log_prob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token, log_prob in e.top:  # most likely first: two ids of one text keep the likelier's
            top.setdefault(token_text(tokenizer, token), log_prob)
        top.setdefault(text, e.log_prob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.log_prob for e in entries], "top_logprobs": tops,
            "text_offset": [e.offset for e in entries]}  # fmt: skip


def chat_logprobs(entries: list[TokenLogProb], tokenizer) -> dict:
    """``/v1/chat/completions``' logprobs: per token its text, log p, UTF-8 bytes and the most likely tokens."""

    def described(token: int, log_prob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": log_prob,
            "bytes": list(token_bytes(tokenizer, token)),
        }

    content = [described(e.id, e.log_prob) | {"top_logprobs": [described(*t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def logprobs_of(job: Job, entries: list[TokenLogProb], tokenizer) -> dict | None:
    if job.logprobs is None:
        return None
    return chat_logprobs(entries, tokenizer) if job.chat else completion_logprobs(entries, tokenizer)


def reply(jobs: list[Job], served: ServedModel, done: list[Completion]) -> dict:
    """The whole (non-streamed) response: one choice per job (n per prompt), in the request's order."""
    choices = []
    for job, completion in zip(jobs, done):
        logprobs = logprobs_of(job, completion.log_probs, served.tokenizer)
        if job.chat:
            message = {"role": "assistant", "content": completion.text}
            choices.append({"index": job.index, "message": message, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason})  # fmt: skip
        else:
            choices.append({"index": job.index, "text": completion.text, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason})  # fmt: skip
    made = sum(completion.completion_tokens for completion in done)
    return {**envelope(jobs[0], served.name, streamed=False), "choices": choices, "usage": usage(jobs, made)}


def chunk(job: Job, served: ServedModel, text: str, finish_reason: str | None, first: bool = False,
          log_probs: list[TokenLogProb] | None = None) -> str:  # fmt: skip
    """One server-sent event of a streamed response; ``log_probs``: the tokens received since the previous one."""
    logprobs = None if first else logprobs_of(job, log_probs or [], served.tokenizer)
    if job.chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": job.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return f"data: {json.dumps({**envelope(job, served.name, streamed=True), 'choices': [choice]})}\n\n"


def usage_chunk(jobs: list[Job], model: str, completion_tokens: int) -> str:
    """The last event of a stream that asked for ``stream_options.include_usage``: no choices, the usage."""
    body = {**envelope(jobs[0], model, streamed=True), "choices": [], "usage": usage(jobs, completion_tokens)}
    return f"data: {json.dumps(body)}\n\n"


def usage(jobs: list[Job], completion_tokens: int) -> dict:
    """OpenAI's usage: each prompt's tokens once, whatever its n; every choice's generated tokens."""
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs if job.choice == 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def envelope(job: Job, model: str, streamed: bool) -> dict:
    kind = ("chat.completion.chunk" if streamed else "chat.completion") if job.chat else "text_completion"
    return {"id": job.request_id, "object": kind, "created": int(time.time()), "model": model}


def prompt_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each prompt token's text begins in the prompt's text (``decode(ids)``, special tokens kept): the
    length of the text before it, up to where it agrees with the whole (a token that ends inside a character
    decodes with a U+FFFD the whole does not have; a U+FFFD the prompt holds is its own character)."""
    text = tokenizer.decode(ids)
    prefixes = tokenizer.batch_decode([ids[:i] for i in range(len(ids))])
    return [len(p) if text.startswith(p) else len(os.path.commonprefix([p, text])) for p in prefixes]
