"""Batched, streamed generation: prompts of different lengths and token budgets through one ``generate()`` call.

A server batches concurrent requests, and each wants its own number of new tokens and its tokens as they come.
``generate()`` already does the work for any causal LM (base alone, :class:`InterpolatedLM`); this module only
left-pads the prompts, stops each row at its own budget or where its own test says (a stop string met: a per-row
stopping criterion) and hands every decoding step's new tokens out of the generating thread through a streamer.
With ``do_sample=False`` a row's tokens are ``model.generate(prompt, max_new_tokens=budget, do_sample=False)``'s
for that prompt alone. Asked, each token comes with its log-probability and the most likely tokens at its step
(:mod:`token_log_probs`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lightning_memdec.hf.left_padding import left_pad
from lightning_memdec.hf.loading import output_rows
from lightning_memdec.inference.logit_adjustments import LogitAdjustments
from lightning_memdec.inference.token_log_probs import StepLogProbs, TokenizerIdsOnly, scored_tokens


@dataclass(frozen=True)
class StepToken:
    """A row's new token; with log-probs asked, its log p and the ``top`` most likely ``[[id, log p], …]``."""

    id: int
    log_prob: float | None = None
    top: list | None = None


class StepStreamer(BaseStreamer):
    """Receives ``generate()``'s new tokens (one per row per step) and queues them as :class:`StepToken` rows for
    another thread; with a :class:`StepLogProbs` recorder, each with its log-probs at that step."""

    def __init__(self, recorder: StepLogProbs | None = None, top: int = 0):
        self.steps: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.recorder, self.top = recorder, top

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        tokens = value.reshape(-1)
        if self.recorder is None:
            self.steps.put([StepToken(token) for token in tokens.tolist()])
            return
        scored = scored_tokens(self.recorder.last, tokens, self.top)  # the log-probs this step's tokens came from
        self.steps.put([StepToken(t, lp, top) for t, (lp, top) in zip(tokens.tolist(), scored)])

    def end(self) -> None:
        self.steps.put(None)


class RowEnds(StoppingCriteria):
    """Stops each row once it has ``budgets[row]`` new tokens or once ``ends[row]`` (fed each of its new tokens)
    says so (``generate()`` pads finished rows after that); ``ended_at[row]``: its count of new tokens then."""

    def __init__(self, prompt_width: int, budgets: list[int], ends: list[Callable[[int], bool] | None]):
        self.prompt_width, self.ends = prompt_width, ends
        self.budgets = torch.tensor(budgets)
        self.ended_at: list[int | None] = [None] * len(budgets)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_width
        if any(self.ends):
            tokens = input_ids[:, -1].tolist()
            for row, end in enumerate(self.ends):
                if end is not None and self.ended_at[row] is None and end(tokens[row]):
                    self.ended_at[row] = made
        ended = torch.tensor([at is not None for at in self.ended_at])
        return ((made >= self.budgets) | ended).to(input_ids.device)


def stream_generate(
    model,
    prompts: list[list[int]],
    budgets: list[int],
    eos_token_ids: set[int],
    top_logprobs: int | None = None,
    vocab: int | None = None,
    ends: list[Callable[[int], bool] | None] | None = None,
    adjustments: list[dict | None] | None = None,
    **generate_kwargs,
) -> Iterator[list[StepToken | None]]:
    """Yield, per decoding step, each row's new token, or None for a row already finished.

    A row finishes after an end-of-sequence id (which is yielded), its budget of new tokens, or the token for which
    ``ends[row]`` (called with each of the row's new tokens, in order) returns True (yielded too). ``generate_kwargs``
    (``do_sample``, ``temperature``, ``top_p`` …) go to ``model.generate`` unchanged, so they hold for every row.
    With ``vocab`` (the tokenizer's size) a head padded past it draws no padding id (a ``StaticGenerator`` decodes
    over its own ``vocab_size``). ``top_logprobs`` (a count) gives
    each token its log-probability and that many most likely tokens, normalised over the first ``vocab`` ids (all
    the head's when None). ``adjustments``: per row, OpenAI's logit bias and penalties
    (:class:`~lightning_memdec.inference.logit_adjustments.LogitAdjustments`), applied after the log-probabilities
    are taken: those are the model's own, as vLLM reports them.
    """
    if len(prompts) != len(budgets) or not prompts or min(budgets) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError(f"need one non-empty prompt and a budget ≥ 1 per row, got {len(prompts)} and {budgets}.")
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos_token_ids))
    input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompts, pad))
    recorder = None if top_logprobs is None else StepLogProbs(vocab)
    padded = vocab is not None and isinstance(model, PreTrainedModel) and output_rows(model) > vocab
    processors = ([TokenizerIdsOnly(vocab)] if padded else []) + ([] if recorder is None else [recorder])
    if adjustments is not None and any(adjustments):
        processors.append(LogitAdjustments(input_ids.shape[1], adjustments))
    if processors:
        generate_kwargs["logits_processor"] = LogitsProcessorList(processors)
    streamer, failure = StepStreamer(recorder, top_logprobs or 0), []
    row_ends = RowEnds(input_ids.shape[1], budgets, ends or [None] * len(prompts))

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max(budgets),
                    stopping_criteria=StoppingCriteriaList([row_ends]),
                    pad_token_id=pad,
                    streamer=streamer,
                    **generate_kwargs,
                )
        except Exception as error:  # re-raised in the consuming thread, where the caller can see it
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    made, finished = [0] * len(prompts), [False] * len(prompts)
    while (step := streamer.steps.get()) is not None and not all(finished):
        out: list[StepToken | None] = []
        for row, token in enumerate(step):
            # ended_at is set by the generating thread before it puts the next step (so before this one is read)
            ended_at = row_ends.ended_at[row]
            finished[row] = finished[row] or (ended_at is not None and made[row] >= ended_at)
            out.append(None if finished[row] else token)
            if not finished[row]:
                made[row] += 1
                finished[row] = token.id in eos_token_ids or made[row] >= budgets[row]
        yield out
    worker.join()
    if failure:
        raise failure[0]
