"""Benchmark: PyTorch's CPU allocator with and without transparent huge pages (``THP_MEM_ALLOC_ENABLE``).

Run: ``python benchmarks/cpu_allocator.py [--rounds 2 --steps 6]``.

A decoder training step and a scoring forward each allocate several fresh ``[B, T, V]`` fp32 buffers (logits, the
loss's ``exp(z - max z)``, the head's gradient: 0.41 GB each at 8 x 256 x 50,257); glibc maps such buffers afresh and
the kernel backs them 4 KiB page by page on first touch. With ``THP_MEM_ALLOC_ENABLE=1`` PyTorch aligns allocations
of 2 MiB and more to 2 MiB and asks for huge pages (``madvise``), 512x fewer faults. torch reads the variable once, at
its first allocation, so each setting runs in its own child process (``--role child``), the two interleaved over
``rounds``; ``import lightning_memdec`` sets the default to 1 unless the environment already says, so the ``off``
child sets it to 0 explicitly.

Each child times, on the embedded bases' configurations (fresh weights, seed 0): ``train`` = one Memory Decoder
training step (base-small, 8 x 256 tokens, forward, ``memdec_loss`` against k = 256 sparse targets, backward, AdamW)
and ``score`` = one no-grad forward of base-large with full-width logits and their log-softmax; median seconds over
``steps`` after one warm-up; its peak resident memory (``ru_maxrss``). Both settings must give the same training
losses (checked before any figure is printed). Prints ``name: value`` lines, the headline ``train_step_speedup`` =
seconds(off) / seconds(on) last.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import report
from jsonargparse import CLI

BATCH, WINDOW, NEIGHBOURS = 8, 256, 256


def child(steps: int) -> None:
    """Time the two workloads in this process (its allocator setting fixed at start-up); one JSON line on stdout."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_memdec.io.embedded import resolve_model
    from lightning_memdec.kernels.memdec_loss import memdec_loss

    def model(name: str):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(f"embedded:{name}")))

    gen = torch.Generator().manual_seed(0)
    vocab = 50257
    tokens = torch.randint(0, vocab, (BATCH, WINDOW + 1), generator=gen)  # [B, T+1]
    ids = torch.randint(0, vocab, (BATCH, WINDOW, NEIGHBOURS), generator=gen).int()  # [B, T, k]
    probs = torch.rand(BATCH, WINDOW, NEIGHBOURS, generator=gen)
    probs = (probs / probs.sum(-1, keepdim=True)).half()  # [B, T, k], as the targets are stored

    decoder = model("base-small").train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    losses = []

    def train_step() -> None:
        logits = decoder(input_ids=tokens[:, :-1]).logits  # [B, T, V]
        loss = memdec_loss(logits, tokens[:, 1:], ids, probs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    scorer = model("base-large").eval()

    @torch.no_grad()
    def score() -> None:
        scorer(input_ids=tokens[:, :-1]).logits.log_softmax(-1)  # [B, T, V]

    seconds = {}
    for name, fn in {"train": train_step, "score": score}.items():
        times = []
        for _ in range(steps + 1):  # the first is warm-up
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "losses": losses, "peak_rss_mb": peak_mb}))


def run_child(setting: str, steps: int) -> dict:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--role", "child", "--steps", str(steps)],
                         env=env, check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main(role: str = "compare", rounds: int = 2, steps: int = 6) -> None:
    """Compare the allocator settings (``role=compare``), or measure one in this process (``role=child``).

    Args:
        role: ``compare`` (the parent) or ``child`` (one setting, started by the parent).
        rounds: child processes per setting, interleaved (off, on, off, on, ...).
        steps: timed repetitions of each workload per child, after one warm-up.
    """
    if role == "child":
        child(steps)
        return
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name, setting in (("off", "0"), ("on", "1")):
            runs[name].append(run_child(setting, steps))
    if runs["off"][0]["losses"] != runs["on"][0]["losses"]:
        raise SystemExit(f"the settings trained differently: {runs['off'][0]['losses']} vs {runs['on'][0]['losses']}")
    import torch

    report("torch_threads", torch.get_num_threads())
    report("batch_tokens", BATCH * WINDOW)
    seconds = {}
    for name, results in runs.items():
        for work in ("score", "train"):
            seconds[work, name] = statistics.median(r["seconds"][work] for r in results)
            report(f"{work}_seconds_thp_{name}", seconds[work, name])
        report(f"peak_rss_mb_thp_{name}", max(r["peak_rss_mb"] for r in results))
    report("score_speedup", seconds["score", "off"] / seconds["score", "on"])
    report("train_step_speedup", seconds["train", "off"] / seconds["train", "on"])


if __name__ == "__main__":
    CLI(main)
