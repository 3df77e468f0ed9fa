"""lm-evaluation-harness bridge (optional extra ``eval``): any lm_eval task on a base LM + Memory Decoder.

Importing this module registers the lm_eval model ``memdec`` (it imports ``lm_eval``; nothing else in the package
imports this module, so the package works without the extra). Its ``model_args`` are ``base=…,decoder=…,lmbda=…``
(plus ``batch_size``, ``max_length``, ``device``, ``tokenizer``); every log-probability is the mixture of
:class:`~lightning_memdec.inference.interpolated_lm.InterpolatedLM`, ``log((1 − λ)·p_base + λ·p_mem)``::

    import lm_eval
    from lm_eval.tasks import TaskManager
    import lightning_memdec.evaluation.lm_eval_bridge  # registers "memdec"

    results = lm_eval.simple_evaluate(
        model="memdec", model_args="base=embedded:base-large,decoder=runs/memdec/hf_model,lmbda=0.3",
        tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks/"),
    )

or :func:`run_lm_eval` for the same call. Requests are encoded by lm_eval's ``TemplateLM`` as its HF model encodes
them (a context's trailing whitespace moved onto the continuation, the pair tokenized whole and split; an empty
context is the EOS token), without special tokens; contexts are cut on the left to the models' positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from lightning_memdec.hf.left_padding import left_padded_batches
from lightning_memdec.hf.loading import context_length
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.token_corpus import position_windows

__all__ = ["MemDecLM", "run_lm_eval"]


@register_model("memdec")
class MemDecLM(TemplateLM):
    """A base causal LM + Memory Decoder (same tokenizer) as an lm_eval model; ``lmbda`` = 0 is the base alone."""

    def __init__(
        self,
        base: str,
        decoder: str,
        lmbda: float = 0.0,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str = "cpu",
        tokenizer: str | None = None,
        **_ignored,
    ):
        super().__init__()
        tok = load_tokenizer(tokenizer) if tokenizer else None
        self.model = InterpolatedLM(str(base), str(decoder), float(lmbda), tokenizer=tok).to(device)
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer found for {base} / {decoder}; pass tokenizer=NAME_OR_DIR.")
        limits = [context_length(self.model.base), context_length(self.model.memdec), max_length]
        self.max_length = int(min(x for x in limits if x))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.eos = self.tokenizer.eos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tok_encode(text)

    # -- scoring -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_tokens(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Σ log p_mix(continuation | context) and whether it is the greedy continuation, for each (ctx, cont)."""
        longest = max((len(cont) for _, cont in rows), default=0)
        if longest > self.max_length:
            raise ValueError(
                f"a continuation of {longest} tokens is longer than the models' {self.max_length} "
                "positions (max_length): it cannot be scored in one window; shorten the task's targets."
            )
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)  # an empty continuation has probability 1
        scored = [i for i, (_, cont) in enumerate(rows) if cont]
        inputs = [((rows[i][0] or [self.eos]) + rows[i][1])[-(self.max_length + 1) : -1] for i in scored]
        for batch, ids, mask in left_padded_batches(inputs, self.batch_size, self.eos):
            width = ids.shape[1]
            log_probs = self.model.log_probs(ids.to(self.model.device), mask.to(self.model.device)).cpu()
            for r, j in enumerate(batch):
                cont = torch.as_tensor(rows[scored[j]][1])
                lp = log_probs[r, width - len(cont) :]
                out[scored[j]] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """lm_eval's encoded requests ``((context, continuation), context ids, continuation ids)``, scored."""
        return self.score_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p_mix of every token of the text after EOS, in disjoint windows of ``max_length`` positions."""
        results = []
        for req in tqdm(requests, desc="memdec rolling", disable=disable_tqdm, leave=False):
            tokens = [self.eos] + self.encode(req.args[0])
            n = len(tokens) - 1  # tokens scored; an empty text has none and scores 0 (log 1)
            if n == 0:
                results.append(0.0)
                continue
            window = min(self.max_length, n)  # a text shorter than the context is one window
            windows = position_windows(n, window, window)
            rows = []
            for start, first in zip(windows.starts.tolist(), windows.score_from.tolist()):
                end = min(start + self.max_length, n)
                rows.append((tokens[start : start + first + 1], tokens[start + first + 1 : end + 1]))
            results.append(sum(lp for lp, _ in self.score_tokens([r for r in rows if r[1]])))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the request's sampling) continuation from the mixture, cut at the first ``until`` string."""
        results = []
        for req in tqdm(requests, desc="memdec generate", disable=disable_tqdm, leave=False):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            ids = (self.encode(context) or [self.eos])[-max(1, self.max_length - max_new) :]
            do_sample = bool(kwargs.pop("do_sample", False))
            extra = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if k in kwargs} if do_sample else {}
            out = self.model.generate(torch.tensor([ids], device=self.model.device), max_new_tokens=max_new,
                                      do_sample=do_sample, **extra)  # fmt: skip
            text = self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "memdec")).replace("/", "__")


def run_lm_eval(
    base: str,
    decoder: str,
    tasks: list[str],
    lmbda: float = 0.0,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    **simple_evaluate_kwargs,
) -> dict:
    """``lm_eval.simple_evaluate`` on base + MemDec at λ; ``include_path`` adds a folder of task YAMLs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = MemDecLM(base, decoder, lmbda, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path)) if include_path is not None else TaskManager()
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                   **simple_evaluate_kwargs)  # fmt: skip
