"""The inference worker of ``memdec serve``: loads the model on its device, streams tokens for batches of jobs.

LitServe starts it in its own process and hands it the batches it collects; each batch is generated through
``generate()`` of :class:`InterpolatedLM` (or of the base alone), or with ``decoding="static"`` through a
:class:`StaticGenerator` of the same models (static caches, one compiled step a token for every batch size up to
the queue's), and every step's tokens go back as they come, with their log-probabilities where a request asks
(eager decoding only) and, for ``echo``, its prompt's first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import litserve as ls
import torch

from lightning_memdec.apps.abandoned_jobs import AbandonedJobs
from lightning_memdec.apps.openai_protocol import CompletionText
from lightning_memdec.inference.streamed_generation import stream_generate
from lightning_memdec.inference.token_log_probs import prompt_log_probs

log = logging.getLogger(__name__)


class MixtureAPI(ls.LitAPI):
    """The inference worker: loads the model on its device and streams tokens for a batch of token jobs."""

    def __init__(self, base: str, memdec: str | None, lmbda: float, device: str, spec, router=None,
                 decoding: str = "eager", context: int | None = None, vocab: int | None = None,
                 abandoned: AbandonedJobs | None = None, **batching):  # fmt: skip
        super().__init__(spec=spec, **batching)
        self.base, self.memdec, self.lmbda, self.requested_device = base, memdec, lmbda, device
        self.router, self.decoding, self.context, self.vocab = router, decoding, context, vocab
        self.abandoned = abandoned

    def setup(self, device: str) -> None:
        from lightning_memdec.hf.loading import find_tokenizer, torch_device

        # LitServe picks "cuda:0" for accelerator "cuda"; a device the user named with its index wins
        chosen = self.requested_device if ":" in self.requested_device or self.requested_device == "cpu" else device
        self.model = load_generator(self.base, self.memdec, self.lmbda, torch_device(chosen), self.router)
        if self.decoding == "static":
            self.model = static_generator(self.model, self.memdec is not None, self.max_batch_size, self.vocab)
            self.model.warm_up()  # compiled before the first request, not during it
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.tokenizer = find_tokenizer(self.base)  # a row ends where its reply's text meets a stop string

    def decode_request(self, request, **kwargs):
        return request

    def batch(self, inputs):
        return list(inputs)

    def predict(self, jobs, **kwargs):
        batched = isinstance(jobs, list)  # max_batch_size 1: LitServe passes the job itself
        steps = generate_steps(self.model, jobs if batched else [jobs], self.eos_token_ids, self.context, self.vocab,
                               self.tokenizer, self.abandoned)  # fmt: skip
        for step in steps:
            yield step if batched else step[0]

    def encode_response(self, output, **kwargs):
        yield from output


def generate_steps(
    model,
    jobs: list[dict],
    eos_token_ids: set[int],
    context: int | None = None,
    vocab: int | None = None,
    tokenizer=None,
    abandoned: AbandonedJobs | None = None,
) -> Iterator[list[dict]]:
    """Per decoding step, one dict per job: ``{"token": id, "end": bool, "batch": rows in its generate() call}``
    while it runs, else ``{}``; ``{"error": message}`` for the jobs of a ``generate()`` call that failed (their
    requests get a 500 naming it; the other calls still run).

    A job's ``"adjust"`` (OpenAI's logit bias and penalties, :func:`~openai_protocol.logit_adjustments`) changes its
    row's choices alone. A job with ``"logprobs": k`` (not None) gets ``"logprob"`` and ``"top"`` (k ``[id, log
    p]``) with each token; one with ``"echo"`` first gets ``{"prompt": [None, (log p, top), …], "batch": …}``, its
    prompt tokens scored (:func:`~lightning_memdec.inference.token_log_probs.prompt_log_probs`), and may ask for no
    new tokens. The jobs go in :func:`generate_calls`: those of one call are generated together, the calls one after
    another; a call with a ``seed`` seeds torch's generators first. A job's row ends at the token where its text
    meets one of its ``"stop"`` strings (by ``tokenizer``, the reply's rule: :class:`CompletionText`), or once its
    ``"uid"`` is marked in ``abandoned`` (its client went away), so the call goes on only while some row's reply
    does.
    """
    for rows, settings in generate_calls(jobs, context):
        try:
            echoed = [row for row in rows if jobs[row].get("echo")]
            if echoed:
                out: list[dict] = [{} for _ in jobs]
                for row in echoed:
                    top = jobs[row].get("logprobs") or 0
                    out[row] = {"prompt": prompt_log_probs(model, jobs[row]["prompt_ids"], top, vocab),
                                "batch": len(rows)}  # fmt: skip
                yield out
            generating = [row for row in rows if jobs[row]["max_tokens"] > 0]  # echo may ask for no new tokens
            if generating:
                yield from generated_steps(model, jobs, generating, settings, eos_token_ids, vocab, tokenizer,
                                           abandoned)  # fmt: skip
        except Exception as err:  # as a message, not the exception LitServe would pickle; the traceback is logged
            log.error("generation failed for a batch of %d: %s: %s", len(rows), type(err).__name__, err, exc_info=err)
            yield [{"error": f"{type(err).__name__}: {err}"} if row in rows else {} for row in range(len(jobs))]


def generated_steps(model, jobs: list[dict], rows: list[int], settings: dict, eos_token_ids: set[int], vocab,
                    tokenizer=None, abandoned: AbandonedJobs | None = None):  # fmt: skip
    """The steps of one ``generate()`` call of ``rows`` (see :func:`generate_steps`); a seeded call draws from
    generators seeded with it, and the others' draws go on as if it had not run."""
    settings = dict(settings)
    seed = settings.pop("seed", None)
    on_gpu = seed is not None and model.device.type != "cpu"
    devices, device_type = ([model.device.index or 0], model.device.type) if on_gpu else ([], None)
    with torch.random.fork_rng(devices=devices, enabled=seed is not None, device_type=device_type):
        if seed is not None:  # the call holds this job alone (generate_calls): its draws are its seed's
            torch.manual_seed(seed)
        yield from call_steps(model, jobs, rows, settings, eos_token_ids, vocab, tokenizer, abandoned)


def call_steps(model, jobs: list[dict], rows: list[int], settings: dict, eos_token_ids: set[int], vocab,
               tokenizer=None, abandoned: AbandonedJobs | None = None):  # fmt: skip
    asked = [jobs[row].get("logprobs") for row in rows]
    top = max((k for k in asked if k is not None), default=None)
    prompts = [jobs[row]["prompt_ids"] for row in rows]
    budgets = [jobs[row]["max_tokens"] for row in rows]
    ends = [row_end(jobs[row], tokenizer, abandoned) for row in rows]
    adjustments = [jobs[row].get("adjust") for row in rows]
    for step in stream_generate(model, prompts, budgets, eos_token_ids, top_logprobs=top, vocab=vocab, ends=ends,
                                adjustments=adjustments, **settings):  # fmt: skip
        out: list[dict] = [{} for _ in jobs]
        for row, k, token in zip(rows, asked, step):
            if token is not None:
                out[row] = {"token": token.id, "end": token.id in eos_token_ids, "batch": len(rows)}
                if k is not None:
                    out[row] |= {"logprob": token.log_prob, "top": token.top[:k]}
        yield out


def row_end(job: dict, tokenizer, abandoned: AbandonedJobs | None = None):
    """The test that ends a job's row at the token where its text meets a stop string or once the job is marked
    abandoned, or None (no stop strings, no marks to look for)."""
    stop_end = None
    if job.get("stop"):
        if tokenizer is None:
            raise ValueError("a job with stop strings needs the tokenizer (generate_steps' tokenizer=).")
        stop_end = CompletionText(tokenizer, job["stop"], job["max_tokens"]).ends_at
    uid = job.get("uid")
    if abandoned is None or uid is None:
        return stop_end
    return lambda token: abandoned.take(uid) or (stop_end is not None and stop_end(token))


def generate_calls(jobs: list[dict], context: int | None) -> Iterator[tuple[list[int], dict]]:
    """The batch's jobs as ``generate()`` calls (rows, sampling settings): one call has one set of settings (greedy
    and sampled jobs go apart), and its rows are left-padded to its longest prompt and decoded up to its largest
    budget, which must fit the ``context`` (each request alone was checked to fit): a job that would overflow it
    starts the next call. A seeded job is a call of its own: its draws depend on its seed alone."""
    groups: dict[tuple, list[int]] = {}
    for row, job in enumerate(jobs):
        groups.setdefault(tuple(sorted(job["sampling"].items())), []).append(row)
    for settings, rows in groups.items():
        call, width, budget = [], 0, 0
        for row in rows:
            prompt, tokens = len(jobs[row]["prompt_ids"]), jobs[row]["max_tokens"]
            overflows = context is not None and max(width, prompt) + max(budget, tokens) > context
            if call and (overflows or "seed" in jobs[row]["sampling"]):
                yield call, dict(settings)
                call, width, budget = [], 0, 0
            call.append(row)
            width, budget = max(width, prompt), max(budget, tokens)
        yield call, dict(settings)


def static_generator(model, mixed: bool, batch_rows: int, vocab: int | None = None):
    """A :class:`StaticGenerator` of ``model`` (an ``InterpolatedLM`` when ``mixed``, else the base, decoding over
    the tokenizer's ``vocab`` ids, not a padded head's): the same ``generate()`` interface, every batch of up to
    ``batch_rows`` prompts decoded as that many rows (one graph)."""
    from lightning_memdec.inference.static_generation import StaticGenerator

    if mixed:
        return StaticGenerator.from_interpolated(model, batch_rows=batch_rows)
    return StaticGenerator(model, batch_rows=batch_rows, vocab_size=vocab)


def load_generator(base: str, memdec: str | None, lmbda: float, device, router: str | None = None):
    """The model requests are generated with: ``InterpolatedLM(base, memdec, lmbda, router=router)``, or the base
    alone."""
    from lightning_memdec.hf.loading import load_causal_lm
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    model = load_causal_lm(base) if memdec is None else InterpolatedLM(base, memdec, lmbda, router=router)
    model.generation_config = protocol_generation_config(model.generation_config)
    return model.to(device).eval()


def protocol_generation_config(config):
    """The model's generation config with only its token ids kept: a request's settings are OpenAI's and nothing
    else, not the top-k, repetition penalty or temperature a model's generation_config.json may carry."""
    from transformers import GenerationConfig

    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{name: getattr(config, name, None) for name in ids})
