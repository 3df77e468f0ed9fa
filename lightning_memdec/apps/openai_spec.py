"""The LitServe spec behind ``memdec serve``: OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` endpoints.

LitServe's own ``OpenAISpec`` serves chat only, answers a bad request from inside the inference worker (where one
bad request fails its whole batch) and streams errors with status 200. This spec checks every request in the HTTP
process first (:mod:`openai_protocol`: 4xx with an OpenAI error body, nothing queued), queues only token jobs, and
turns the worker's token stream into text, finish reasons, usage and log-probabilities, streamed as server-sent
events or whole.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from lightning_memdec.apps.abandoned_jobs import AbandonedJobs
from lightning_memdec.apps.openai_protocol import (
    CompletionText,
    Job,
    RequestError,
    ServedModel,
    check_requests,
    parse_body,
)
from lightning_memdec.apps.openai_replies import Completion, TokenLogProb, chunk, prompt_offsets, reply, usage_chunk
from lightning_memdec.apps.tokenizer_endpoints import detokenize, tokenize, tokenizer_info

log = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1/completions"
DISCONNECT_POLL_S = 0.25  # how often a whole (non-streamed) reply's wait checks that its client is still there


class Piece(NamedTuple):
    """A reply's next text, its finish reason once it ends, its tokens so far, and the log-probs of the tokens that
    came with this piece (when asked)."""

    text: str
    finish_reason: str | None
    count: int
    log_probs: list[TokenLogProb]


class OpenAICompletionsSpec(LitSpec):
    """Completions and chat completions for one served model; per step the worker streams ``{"token": id, "end":
    is it an end-of-sequence id, "batch": rows generated together}`` for each running request, ``{}`` for the others."""

    def __init__(self, served: ServedModel, jobs_in_flight: int = 8, abandoned: AbandonedJobs | None = None):
        super().__init__()
        self.api_path = COMPLETIONS_PATH  # the request queue LitServe keys on; chat shares it (one model, one batch)
        self.served = served
        self.jobs_in_flight = jobs_in_flight  # a request's prompts queued at once (the queue's batch size)
        self.abandoned = abandoned  # where a job whose client went away is marked for the worker to end its row

    @property
    def stream(self) -> bool:
        return True

    @functools.cached_property
    def tokenizing(self) -> ThreadPoolExecutor:
        """Prompts are tokenized off the event loop (a long one stalled every other client), one at a time; made in
        the HTTP process on first use (the spec is pickled into LitServe's processes before)."""
        return ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def pre_setup(self, lit_api) -> None:
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/models/{model_id:path}", self.model, ["GET"])
        self.add_endpoint("/tokenize", self.tokenize, ["POST"])  # vLLM's: clients that tokenize on the server's side
        self.add_endpoint("/detokenize", self.detokenize, ["POST"])
        self.add_endpoint("/tokenizer_info", self.tokenizer_info, ["GET"])

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str):
        if model_id != self.served.name:
            err = RequestError(404, f"model {model_id!r} is not served here; this server serves {self.served.name!r}.",
                               "model", "model_not_found")  # fmt: skip
            return JSONResponse(err.body(), status_code=err.status)
        return self.model_card()

    async def tokenize(self, request: Request):
        return await self.tokenizer_reply(request, tokenize)

    async def detokenize(self, request: Request):
        return await self.tokenizer_reply(request, detokenize)

    async def tokenizer_info(self):
        return tokenizer_info(self.served)

    async def tokenizer_reply(self, request: Request, endpoint):
        """``endpoint(body, served)``'s reply, run on the tokenizing thread; a bad body is a 400."""
        raw = await request.body()
        try:
            body = parse_body(raw)
            return await asyncio.get_running_loop().run_in_executor(self.tokenizing, endpoint, body, self.served)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:
            return unforeseen(err)

    def model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": 0, "owned_by": "memdec"}

    async def completions(self, request: Request):
        return await self.respond(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.respond(request, chat=True)

    async def respond(self, request: Request, chat: bool):
        body = await request.body()
        try:
            loop = asyncio.get_running_loop()
            jobs = await loop.run_in_executor(self.tokenizing, checked_jobs, body, self.served, chat)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # a request no check foresaw: still an OpenAI error body, not a bare 500
            return unforeseen(err)
        if jobs[0].stream:
            return StreamingResponse(self.events(jobs), media_type="text/event-stream")
        try:
            done = await self.queued_completions(jobs, request)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        # how many requests were generated together with this one (the most, for several prompts)
        headers = {"X-Batch-Size": str(max(job.batch_size for job in jobs))}
        return JSONResponse(reply(jobs, self.served, done), headers=headers)

    async def queued_completions(self, jobs: list[Job], request: Request | None = None) -> list[Completion]:
        """The jobs of one request, whole, queued as :meth:`interleaved_pieces` queues them; the ``request``'s
        client going away ends them too (a 499): the jobs not yet queued never are."""
        collecting = asyncio.ensure_future(self.collected(jobs))
        try:
            while True:
                done, _ = await asyncio.wait({collecting}, timeout=None if request is None else DISCONNECT_POLL_S)
                if done:
                    return collecting.result()
                if await request.is_disconnected():
                    raise RequestError(499, "the client closed the request.", code="client_closed_request")
        finally:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)

    async def collected(self, jobs: list[Job]) -> list[Completion]:
        pieces: dict[int, list[Piece]] = {job.index: [] for job in jobs}
        async with aclosing(self.interleaved_pieces(jobs)) as interleaved:
            async for job, piece in interleaved:
                pieces[job.index].append(piece)
        return [completion(pieces[job.index]) for job in jobs]

    async def pieces(self, job: Job):
        """Queue the job for the inference workers, then its :class:`Piece` per generated token; the finish reason
        is "stop" at an end-of-sequence id (not part of the text) and "length" at max_tokens. Left before its last
        piece (its client gone, a sibling job failed), the job is marked abandoned: the worker ends its row."""
        uid, queue, event = uuid.uuid4(), deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job.payload() | {"uid": str(uid)}))
        ended = False
        try:
            async for item in self.token_pieces(job, self.data_streamer(queue, event, send_status=True)):
                ended = item.finish_reason is not None
                yield item
        except RequestError:  # the worker failed it or LitServe timed it out: nothing left to end
            ended = True
            raise
        finally:  # the rest of the batch may still send this uid empty steps: they are dropped once it is gone
            self.response_buffer.pop(uid, None)
            if not ended and self.abandoned is not None:
                self.abandoned.mark(str(uid))

    async def token_pieces(self, job: Job, tokens: AsyncIterator):
        """A :class:`Piece` per token (an echoed prompt first, whole); the text ends before a stop string (reason
        "stop"): the worker's remaining steps for the job are dropped."""
        text_so_far, count, start = CompletionText(self.served.tokenizer, job.stop, job.max_tokens), 0, 0
        detokenizer, stop = text_so_far.detokenizer, text_so_far.stop
        async for data, status in tokens:
            if status == LitAPIStatus.ERROR and getattr(data, "status_code", None) == 504:  # LitServe's queue timeout
                raise RequestError(504, "the request waited in the queue longer than the server's --queue.timeout; "
                                   "retry later.", code="timeout")  # fmt: skip
            if status == LitAPIStatus.ERROR:
                raise RequestError(500, f"generation failed in the inference worker: {data}", code="server_error")
            step = json.loads(data) if data else {}
            if "error" in step:
                raise RequestError(500, f"generation failed in the inference worker: {step['error']}",
                                   code="server_error")  # fmt: skip
            if "prompt" in step:  # echo: the prompt's text and log-probs come first
                job.batch_size = step["batch"]
                # off the event loop: a long prompt's offsets take the tokenizer a while (1,000 tokens: ~0.18 s)
                piece = await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.echoed, job,
                                                                         step["prompt"])  # fmt: skip
                start = len(piece.text)
                yield piece._replace(finish_reason="length") if job.max_tokens == 0 else piece
                if job.max_tokens == 0:
                    return
                continue
            if "token" not in step:
                continue
            job.batch_size = step["batch"]
            count += 1
            entries = []
            if job.logprobs is not None:
                entries = [TokenLogProb(step["token"], step["logprob"], step["top"], start + len(detokenizer.sent))]
            if step["end"]:  # an end-of-sequence id: not part of the text
                text, stopped = stop.add(detokenizer.flush())
            else:
                text, stopped = text_so_far.add(step["token"])
            if stopped:
                yield Piece(text, "stop", count, entries)
                return
            if step["end"] or count == job.max_tokens:
                yield Piece(text + stop.flush(), "stop" if step["end"] else "length", count, entries)
                return
            yield Piece(text, None, count, entries)
        # the worker ended early (not expected)
        yield Piece(stop.add(detokenizer.flush())[0] + stop.flush(), "length", count, [])

    def echoed(self, job: Job, scored: list) -> Piece:
        """The prompt as the reply's first piece: its text and (asked) its tokens' log-probs."""
        tokenizer = self.served.tokenizer
        text = tokenizer.decode(job.prompt_ids)  # special tokens kept: the prompt as the model read it
        entries = []
        if job.logprobs is not None:
            offsets = prompt_offsets(tokenizer, job.prompt_ids)
            for token, score, offset in zip(job.prompt_ids, scored, offsets):
                log_prob, top = score if score is not None else (None, None)
                entries.append(TokenLogProb(token, log_prob, top, offset))
        return Piece(text, None, 0, entries)

    async def events(self, jobs: list[Job]):
        """A streamed reply: each choice's first chunk, then each choice's pieces as they come (choices interleave,
        told apart by their index), the usage if asked, ``[DONE]``."""
        for job in jobs:
            yield chunk(job, self.served, "", None, first=True)
        counts, pending = {job.index: 0 for job in jobs}, {job.index: [] for job in jobs}
        try:
            async with aclosing(self.interleaved_pieces(jobs)) as interleaved:  # closed when the client goes
                async for job, piece in interleaved:
                    counts[job.index], pending[job.index] = piece.count, pending[job.index] + piece.log_probs
                    if piece.text or piece.finish_reason:  # log-probs of tokens whose text was held back come later
                        yield chunk(job, self.served, piece.text, piece.finish_reason, log_probs=pending[job.index])
                        pending[job.index] = []
        except RequestError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        except Exception as err:  # the stream has begun (status 200): the error is its last event
            yield f"data: {json.dumps(unforeseen_error(err).body())}\n\n"
        if jobs[0].include_usage:
            yield usage_chunk(jobs, self.served.name, sum(counts.values()))
        yield "data: [DONE]\n\n"

    async def interleaved_pieces(self, jobs: list[Job]):
        """``(job, piece)`` as each job's pieces come. A batch's worth of a request's jobs (``jobs_in_flight``) are
        queued at a time, so other clients' requests are queued in between rather than behind all of its prompts.
        The first error (a :class:`RequestError`) ends them all: the jobs not yet queued never are, and those
        queued are marked abandoned (:meth:`pieces`), so their rows end at their next token."""
        if len(jobs) == 1:  # the common case, without tasks
            async with aclosing(self.pieces(jobs[0])) as pieces:
                async for piece in pieces:
                    yield jobs[0], piece
            return
        arrived, in_flight = asyncio.Queue(), asyncio.Semaphore(self.jobs_in_flight)

        async def run(job: Job) -> None:
            try:
                async with in_flight:
                    async for piece in self.pieces(job):
                        arrived.put_nowait((job, piece))
            except Exception as err:
                arrived.put_nowait((job, err))
            finally:
                arrived.put_nowait((job, None))  # this job is done

        tasks = [asyncio.create_task(run(job)) for job in jobs]
        try:
            running = len(jobs)
            while running:
                job, item = await arrived.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield job, item
        finally:  # a client gone or an error: the other jobs stop too (their buffers are dropped)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def completion(pieces: list[Piece]) -> Completion:
    """A whole reply from its pieces."""
    log_probs = [entry for piece in pieces for entry in piece.log_probs]
    return Completion("".join(p.text for p in pieces), pieces[-1].finish_reason, pieces[-1].count, log_probs)


def unforeseen_error(err: Exception) -> RequestError:
    """A failure no check foresaw, as the client's 500 body; its traceback goes to the server's log, for the
    operator (the client sees only its message)."""
    log.error("a request failed: %s: %s", type(err).__name__, err, exc_info=err)
    return RequestError(500, f"the server failed on this request ({type(err).__name__}: {err}).", code="server_error")


def unforeseen(err: Exception) -> JSONResponse:
    error = unforeseen_error(err)
    return JSONResponse(error.body(), status_code=error.status)


def checked_jobs(raw: bytes, served: ServedModel, chat: bool) -> list[Job]:
    return check_requests(parse_body(raw), served, chat)
