"""Batched, streamed generation: prompts of different lengths and token budgets through one ``generate()`` call.

A server batches concurrent requests, and each wants its own number of new tokens and its tokens as they come.
``generate()`` already does the work for any causal LM (base alone, :class:`InterpolatedLM`); this module only
left-pads the prompts, stops each row at its own budget (a per-row stopping criterion) and hands every decoding
step's new tokens out of the generating thread through a streamer. With ``do_sample=False`` a row's tokens are
``model.generate(prompt, max_new_tokens=budget, do_sample=False)``'s for that prompt alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lightning_memdec.hf.left_padding import left_pad


class StepStreamer(BaseStreamer):
    """Receives ``generate()``'s new tokens (one per row per step) and queues them for another thread."""

    def __init__(self):
        self.steps: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)


class RowBudgets(StoppingCriteria):
    """Stops each row once it has ``budgets[row]`` new tokens (``generate()`` pads finished rows after that)."""

    def __init__(self, prompt_width: int, budgets: list[int]):
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(budgets)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_width
        return made >= self.budgets.to(input_ids.device)


def stream_generate(
    model, prompts: list[list[int]], budgets: list[int], eos_token_ids: set[int], **generate_kwargs
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token id, or None for a row already finished.

    A row finishes after an end-of-sequence id (which is yielded) or its budget of new tokens. ``generate_kwargs``
    (``do_sample``, ``temperature``, ``top_p`` …) go to ``model.generate`` unchanged, so they hold for every row.
    """
    if len(prompts) != len(budgets) or not prompts or min(budgets) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError(f"need one non-empty prompt and a budget ≥ 1 per row, got {len(prompts)} and {budgets}.")
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos_token_ids))
    input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompts, pad))
    streamer, failure = StepStreamer(), []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max(budgets),
                    stopping_criteria=StoppingCriteriaList([RowBudgets(input_ids.shape[1], budgets)]),
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
        out: list[int | None] = []
        for row, token in enumerate(step):
            out.append(None if finished[row] else token)
            if not finished[row]:
                made[row] += 1
                finished[row] = token in eos_token_ids or made[row] >= budgets[row]
        yield out
    worker.join()
    if failure:
        raise failure[0]
