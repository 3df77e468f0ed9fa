"""`memdec serve`: an OpenAI-compatible HTTP server for a base LM + Memory Decoder (or the base alone), on LitServe.

LitServe runs the HTTP front end and the inference worker and batches concurrent requests (:class:`RequestQueue`);
:mod:`openai_spec` speaks OpenAI's protocol; :mod:`serve_worker` generates each batch through ``generate()`` of
:class:`InterpolatedLM` (or of the base), streaming every step's tokens back.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_memdec.apps.openai_protocol import ServedModel


@dataclass(frozen=True)
class RequestQueue:
    """How concurrent requests are batched, and how long one may wait for its turn."""

    max_batch_size: int = 8
    """at most this many concurrent requests are generated together"""
    batch_timeout: float = 0.01
    """seconds to wait for more requests to fill a batch"""
    timeout: float = 300.0
    """seconds a request may wait in the queue before it is answered 504"""

    def __post_init__(self):
        if self.max_batch_size < 1 or not 0 <= self.batch_timeout < self.timeout:
            raise ValueError(
                f"need --queue.max_batch_size ≥ 1 (got {self.max_batch_size}) and 0 ≤ --queue.batch_timeout "
                f"(got {self.batch_timeout}) < --queue.timeout (got {self.timeout})."
            )


def served_model(base: str, memdec: str | None, model_name: str | None, decoding: str = "eager") -> ServedModel:
    """Name, tokenizer and context of what is served, read before any weights are loaded (static decoding's
    caches hold at most :data:`~lightning_memdec.inference.static_generation.DEFAULT_MAX_LENGTH` positions)."""
    from transformers import AutoConfig

    from lightning_memdec.apps.openai_protocol import longest_token_bytes
    from lightning_memdec.hf.loading import context_length, find_tokenizer
    from lightning_memdec.io.embedded import resolve_model

    configs = {}
    for flag, ref in (("--base", base), ("--memdec", memdec)):
        try:
            configs |= {flag: AutoConfig.from_pretrained(resolve_model(ref))} if ref else {}
        except OSError as err:
            raise ValueError(f"{flag} {ref!r} is not a model directory or hub name ({err}).") from err
    contexts = [c for c in map(context_length, configs.values()) if c]
    limit = "the model's context"
    if decoding == "static":
        from lightning_memdec.inference.static_generation import DEFAULT_MAX_LENGTH

        if not contexts or DEFAULT_MAX_LENGTH < min(contexts):
            limit = "the static caches' length (--decoding static)"
        contexts.append(DEFAULT_MAX_LENGTH)
    tokenizer = find_tokenizer(base)
    if tokenizer is None:
        raise ValueError(f"--base {base!r} has no tokenizer saved with it; save its tokenizer into the directory.")
    check_decoder_tokenizer(memdec, tokenizer, base)
    for flag, config in configs.items():  # a head with fewer rows than the tokenizer's ids fails in the worker
        rows = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
        if rows is not None and rows < len(tokenizer):
            raise ValueError(f"{flag} {memdec if flag == '--memdec' else base!r} has {rows} token ids "
                             f"(config vocab_size), fewer than the {len(tokenizer)} of --base {base!r}'s tokenizer: "
                             "serve models of one tokenizer.")  # fmt: skip
    names = [Path(str(ref).rstrip("/")).name for ref in (base, memdec) if ref]
    context = min(contexts) if contexts else None
    return ServedModel(model_name or "+".join(names), tokenizer, context, limit, longest_token_bytes(tokenizer),
                       eager=decoding == "eager")  # fmt: skip


def check_decoder_tokenizer(memdec: str | None, tokenizer, base: str) -> None:
    """A decoder of another tokenizer is refused here, naming both: in the worker it only stopped the server with
    "One or more workers failed to start"."""
    from lightning_memdec.hf.loading import find_tokenizer, tokenizer_name
    from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info

    decoder_tokenizer = find_tokenizer(memdec) if memdec else None
    if decoder_tokenizer is not None:
        check_same_tokenizer(
            tokenizer_info(tokenizer, tokenizer_name(tokenizer, base)), f"--base {base}",
            tokenizer_info(decoder_tokenizer, tokenizer_name(decoder_tokenizer, memdec)), f"--memdec {memdec}",
            "serve a Memory Decoder trained with the base's tokenizer",
        )  # fmt: skip


def check_listen(host: str, port: int) -> None:
    """--port must be one LitServe accepts and free on --host, found before any model is loaded."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise ValueError(f"--port must be an integer from 1024 to 65535 (LitServe's range), got {port!r}.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"cannot listen on --host {host} --port {port} ({err.strerror}); check --host, choose another "
                "--port, or stop what holds it."
            ) from None


def check_router(router: str | None, base: str, memdec: str | None, tokenizer) -> None:
    """Refuse, before the server starts, a router without a decoder or fitted for other models."""
    if router is None:
        return
    if memdec is None:
        raise ValueError("--router weighs the Memory Decoder per token: pass the --memdec it was fitted for.")
    from lightning_memdec.hf.loading import tokenizer_name
    from lightning_memdec.inference.router_artifact import check_router_models
    from lightning_memdec.io.artifact_dirs import read_meta
    from lightning_memdec.io.tokenizer_identity import tokenizer_info

    fingerprint = tokenizer_info(tokenizer, tokenizer_name(tokenizer))["fingerprint"]
    check_router_models(read_meta(router, kind="router"), router, base, memdec, fingerprint)


DEFAULT_LMBDA = 0.3  # the decoder's weight when --memdec is served without --lmbda


def served_lmbda(lmbda: float | None, memdec: str | None, router: str | None) -> float:
    """The fixed λ served: --lmbda, or the default; a --lmbda that would change nothing is refused (no decoder to
    weigh, or a router giving λ per token), as a user who set it expects it to matter."""
    if lmbda is not None and memdec is None:
        raise ValueError(
            f"--lmbda {lmbda} weighs the Memory Decoder, and none is served: pass --memdec, or drop --lmbda."
        )
    if lmbda is not None and router is not None:
        raise ValueError(f"--lmbda {lmbda} is a fixed λ, and --router gives λ per token: drop one of them.")
    return DEFAULT_LMBDA if lmbda is None else lmbda


def serve(
    base: str,
    memdec: str | None = None,
    lmbda: float | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    device: str = "auto",
    queue: RequestQueue = RequestQueue(),
    model_name: str | None = None,
    router: str | None = None,
    decoding: Literal["eager", "static"] = "eager",
) -> None:
    """Serve base (+ Memory Decoder) over HTTP: OpenAI /v1/completions and /v1/chat/completions, streamed, batched.

    Args:
        base: the base LM (name, path or ``embedded:base-small``); its tokenizer must be saved with it.
        memdec: the trained Memory Decoder directory; omitted, the base is served alone.
        lmbda: the decoder's weight λ in the mixture (default 0.3); only with --memdec, and not with --router.
        port: the port to listen on.
        host: the interface to listen on (``0.0.0.0`` for every interface).
        device: ``auto`` (the GPU if there is one), ``cpu``, ``cuda`` or ``cuda:N``.
        queue: how concurrent requests are batched, and how long one may wait.
        model_name: the name clients send as ``model`` (default: the models' directory names joined by ``+``).
        router: a router directory (``memdec fit-router``) of this base and decoder: λ per token from it instead of
            --lmbda, the decoder skipped where it routes λ under its threshold.
        decoding: ``eager``: ``generate()`` of the mixture; ``static``: the same tokens from static KV caches and
            one compiled step a token (CUDA graphs on a GPU; every batch up to --queue.max_batch_size runs as one
            graph; prompt + max_tokens within 2,048 positions); not with --router.
    """
    from lightning_memdec.kernels.scoring import check_lmbda

    lmbda = check_lmbda(served_lmbda(lmbda, memdec, router))
    if decoding not in ("eager", "static"):
        raise ValueError(f"--decoding must be eager or static, got {decoding!r}.")
    if decoding == "static" and router is not None:
        raise ValueError("--decoding static decodes at a fixed λ; a --router skips the decoder per token: use eager.")
    try:
        import litserve as ls

        from lightning_memdec.apps.abandoned_jobs import AbandonedJobs
        from lightning_memdec.apps.openai_spec import OpenAICompletionsSpec
        from lightning_memdec.apps.serve_worker import MixtureAPI
    except ImportError as err:
        raise ImportError(f"memdec serve needs LitServe: pip install 'lightning_memdec[serve]' ({err}).") from err
    check_listen(host, port)
    model = served_model(base, memdec, model_name, decoding)
    check_router(router, base, memdec, model.tokenizer)
    abandoned = AbandonedJobs.temporary()  # jobs whose client went away, for the worker to end
    spec = OpenAICompletionsSpec(model, jobs_in_flight=queue.max_batch_size, abandoned=abandoned)
    api = MixtureAPI(base, memdec, lmbda, device, spec, router=router, decoding=decoding, context=model.context,
                     vocab=len(model.tokenizer), abandoned=abandoned, max_batch_size=queue.max_batch_size,
                     batch_timeout=queue.batch_timeout)  # fmt: skip
    accelerator = "cpu" if device == "cpu" else ("auto" if device == "auto" else "cuda")
    server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=queue.timeout)
    from starlette.exceptions import HTTPException

    server.app.add_exception_handler(HTTPException, openai_error)
    if threading.current_thread() is threading.main_thread():
        # `kill PID` shuts the server down as Ctrl-C does: else its HTTP and inference processes live on, orphaned
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(host=host, port=port, generate_client_file=False)
    finally:
        abandoned.remove()


async def openai_error(request, exc):
    """FastAPI's own refusals (unknown path 404, wrong method 405) in OpenAI's error body, as every other error."""
    from fastapi.responses import JSONResponse

    from lightning_memdec.apps.openai_protocol import RequestError

    error = RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found"
                         if exc.status_code == 404 else "http_error")  # fmt: skip
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))
