"""Benchmark: the LM head's product on this CPU, as torch computes it vs the same product transposed.

Run: ``python benchmarks/lm_head.py [--rows 2048 --dim 128 --vocab 50257]``.

The LM head is most of a small decoder's work on a CPU (a training step of the shipped base-small spends about two
thirds of its CPU time in ``aten::mm``). ``F.linear(h, W)`` computes logits ``[N, V]`` = h ``[N, d]`` · Wᵀ; the same
numbers come out of ``W · hᵀ`` ``[V, N]`` (the transposed layout). BLAS libraries partition the two shapes
differently, so their speed can differ on one CPU. This times, interleaved (median of ``repeats``), in one process:

- ``linear``: ``torch.nn.functional.linear(h, W)``, what every HF causal LM's head does;
- ``transposed``: ``torch.mm(W, h.T)``, the same product laid out ``[V, N]``;
- ``linear_logsumexp`` / ``transposed_logsumexp``: each followed by the log-sum-exp over the vocabulary that every
  score and loss needs (over the last dim of ``[N, V]``, over the first of ``[V, N]``).

Both layouts are checked equal (float32 rounding) first. Prints ``name: value`` lines: each way's seconds and the
products' GFLOP/s (2·N·d·V FLOPs), ``transposed_head_speedup`` (the product alone), and the headline
``transposed_with_logsumexp_speedup`` last: what a scorer or loss reading ``[V, N]`` logits could gain at most.
Nothing in the package uses the transposed layout.
"""

from __future__ import annotations

import torch
from common import report
from jsonargparse import CLI

from lightning_memdec.evaluation.latency import median_times


def main(rows: int = 2048, dim: int = 128, vocab: int = 50257, repeats: int = 5, seed: int = 0) -> None:
    """Time both layouts of one head product.

    Args:
        rows: positions N whose logits are computed at once (a batch of 8 windows of 256: 2048).
        dim: hidden size d (base-small 128, base-large 256, GPT-2 small 768).
        vocab: vocabulary size V (GPT-2: 50257).
        repeats: timed rounds of each way, interleaved; medians are reported.
        seed: random seed of the hidden states and weights.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=generator)  # [N, d]
    weight = torch.randn(vocab, dim, generator=generator) / dim**0.5  # [V, d], nn.Linear's layout
    linear = torch.nn.functional.linear(hidden, weight)  # [N, V]
    transposed = torch.mm(weight, hidden.T)  # [V, N]
    torch.testing.assert_close(transposed.T, linear, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(transposed.logsumexp(0), linear.logsumexp(-1), rtol=1e-5, atol=1e-5)
    del linear, transposed
    seconds = median_times(
        {
            "linear": lambda: torch.nn.functional.linear(hidden, weight),
            "transposed": lambda: torch.mm(weight, hidden.T),
            "linear_logsumexp": lambda: torch.nn.functional.linear(hidden, weight).logsumexp(-1),
            "transposed_logsumexp": lambda: torch.mm(weight, hidden.T).logsumexp(0),
        },
        repeats=repeats,
    )
    flops = 2.0 * rows * dim * vocab
    report("rows", rows)
    report("dim", dim)
    report("vocab", vocab)
    report("torch_threads", torch.get_num_threads())
    for way in ("linear", "transposed"):
        report(f"{way}_seconds", seconds[way])
        report(f"{way}_gflops", flops / seconds[way] / 1e9)
    report("transposed_head_speedup", seconds["linear"] / seconds["transposed"])
    report("linear_logsumexp_seconds", seconds["linear_logsumexp"])
    report("transposed_logsumexp_seconds", seconds["transposed_logsumexp"])
    report("transposed_with_logsumexp_speedup", seconds["linear_logsumexp"] / seconds["transposed_logsumexp"])


if __name__ == "__main__":
    CLI(main)
