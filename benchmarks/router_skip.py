"""Benchmark: greedy generation of base + Memory Decoder with a router, with and without skipping the decoder.

Run: ``python benchmarks/router_skip.py --base embedded:base-large --memdec DIR --router DIR`` (a fitted router), or
without ``--router`` a planted one: a random router whose threshold is set so that about ``--skip_target`` of the
prompt's positions fall under it (timing depends on how often the decoder runs, not on what the router knows).

Three generators, timed side by side (medians of interleaved repeats, ``evaluation.latency.median_times``), batch 1,
``--new_tokens`` greedy tokens after a ``--prompt_tokens`` prompt of ``--text``:

- ``fixed``: a fixed λ (the decoder runs at every step);
- ``router_no_skip``: the router with threshold 0 (λ per token, the decoder at every step);
- ``router_skip``: the router with its threshold (the decoder skipped where λ is under it, catching up later).

Prints ``name: value`` lines: each generator's tokens/s, the share of steps whose decoder was skipped, and, last, the
headline ``skip_speedup`` = time(router_no_skip) / time(router_skip).
"""

from __future__ import annotations

import copy

import torch
from common import report
from jsonargparse import CLI

from lightning_memdec.evaluation.latency import median_times
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.router import Router, router_scorer


def planted_router(lm: InterpolatedLM, prompt: torch.Tensor, skip_target: float) -> Router:
    """A random router with its threshold at the ``skip_target`` quantile of its λ over the prompt's positions."""
    torch.manual_seed(0)
    router = Router(lm.base.config.get_text_config().hidden_size, 64)
    with torch.no_grad():
        features = router_scorer(lm.base, None, lm.config.vocab_size, features=True)(prompt, prompt)["features"]
        router.set_standardisation(features[0])
        router.threshold = float(router(features[0]).quantile(skip_target))
    return router.eval()


def decoder_steps(lm: InterpolatedLM, prompt: torch.Tensor, new_tokens: int) -> int:
    """How many generation steps ran the decoder (its forward calls)."""
    calls = []
    hook = lm.memdec.register_forward_hook(lambda *args: calls.append(1))
    try:
        lm.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        hook.remove()
    return len(calls)


def main(
    base: str = "embedded:base-large",
    memdec: str = "embedded:base-small",
    router: str | None = None,
    text: str = "embedded:general/valid",
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    skip_target: float = 0.5,
    lmbda: float = 0.3,
    repeats: int = 5,
) -> None:
    """Time greedy generation: fixed λ, router without skipping, router skipping the decoder."""
    torch.set_grad_enabled(False)
    fixed = InterpolatedLM(base, memdec, lmbda)
    prompt = torch.as_tensor(text_tokens(text, fixed.tokenizer, prompt_tokens)[None, :prompt_tokens])
    chosen = router or planted_router(fixed, prompt, skip_target)
    skipping = InterpolatedLM(fixed.base, fixed.memdec, lmbda, router=chosen)
    no_skip = copy.deepcopy(skipping.router)
    no_skip.threshold = 0.0
    always = InterpolatedLM(fixed.base, fixed.memdec, lmbda, router=no_skip)
    generators = {"fixed": fixed, "router_no_skip": always, "router_skip": skipping}
    run = {k: (lambda m=m: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
           for k, m in generators.items()}  # fmt: skip
    seconds = median_times(run, repeats=repeats)
    report("base", base)
    report("memdec", memdec)
    report("router", router or f"planted (threshold at the {skip_target:g} quantile of its λ on the prompt)")
    report("router_threshold", skipping.router.threshold)
    report("prompt_tokens", prompt_tokens)
    report("new_tokens", new_tokens)
    for name, s in seconds.items():
        report(f"{name}_tokens_per_s", new_tokens / s)
    report("decoder_skipped_share", 1 - decoder_steps(skipping, prompt, new_tokens) / new_tokens)
    report("skip_speedup", seconds["router_no_skip"] / seconds["router_skip"])


if __name__ == "__main__":
    CLI(main, as_positional=False)
