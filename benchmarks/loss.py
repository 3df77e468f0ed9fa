"""Benchmark: one training step's loss path, the paper's dense kNN targets vs `memdec_loss` on sparse ones.

Run: ``python benchmarks/loss.py [--vocab 50257 --batch 2 --seq_len 1024 --support 256 --device cpu ...]``.
Given the forward logits (a leaf requiring grad, on ``device``) and the kNN targets as stored (on the
CPU), each path computes β·KL + (1−β)·CE and runs backward:

* dense (the paper's code): per step, a ``[positions, V]`` fp32 target built row by row in a Python loop
  (as its data collator does), moved to ``device``, then
  ``F.kl_div(log_softmax, dense, reduction="batchmean")`` + ``F.cross_entropy``;
* sparse (this project): the stored int32 ids / fp16 probs moved to ``device``, then ``memdec_loss``.

Both run in one process, interleaved, after a warm-up round; times are medians. The script asserts that
losses and gradients agree, then prints ``name: number`` lines, the last being ``loss_speedup``. On CUDA
it also prints each path's peak allocated memory above the logits and their gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import report  # benchmarks/ is the script's directory, first on sys.path

from lightning_memdec.evaluation.latency import median_times
from lightning_memdec.kernels.memdec_loss import memdec_loss


def synthetic(batch: int, seq_len: int, vocab: int, support: int, seed: int):
    """Logits and kNN targets as stored: variable support per position, padded to `support` (id 0, p 0)."""
    g = torch.Generator().manual_seed(seed)
    n = batch * seq_len
    logits = 2 * torch.randn(batch, seq_len, vocab, generator=g)
    counts = torch.randint(support // 4, support + 1, (n,), generator=g)
    ids = torch.zeros(n, support, dtype=torch.int32)
    probs = torch.zeros(n, support)
    for i, c in enumerate(counts.tolist()):  # distinct ids per position, skewed probabilities
        ids[i, :c] = torch.randperm(vocab, generator=g)[:c].int()
        w = torch.rand(c, generator=g) ** 4
        probs[i, :c] = torch.sort(w / w.sum(), descending=True).values
    labels = ids[:, 0].long().clone()  # next token: usually the kNN's top token...
    other = torch.rand(n, generator=g) < 0.3
    labels[other] = torch.randint(0, vocab, (int(other.sum()),), generator=g)  # ...not always
    shape = (batch, seq_len)
    return logits, labels.view(shape), ids.view(*shape, support), probs.half().view(*shape, support), counts


def dense_step(logits, labels, ids, probs, counts, beta):
    """The paper's path: dense target rows written one position at a time, then kl_div + cross_entropy."""
    vocab, device = logits.shape[-1], logits.device
    flat_ids, flat_probs = ids.reshape(-1, ids.shape[-1]).long(), probs.reshape(-1, probs.shape[-1]).float()
    dense = torch.zeros(flat_ids.shape[0], vocab)
    for i, c in enumerate(counts.tolist()):
        dense[i][flat_ids[i, :c]] = flat_probs[i, :c]
    dense = dense.to(device)
    z = logits.view(-1, vocab)
    kl = F.kl_div(F.log_softmax(z, dim=-1), dense, reduction="batchmean")
    ce = F.cross_entropy(z, labels.to(device).reshape(-1))
    loss = beta * kl + (1 - beta) * ce
    loss.backward()
    return loss.detach()


def sparse_step(logits, labels, ids, probs, counts, beta):
    """This project's path: the loss from the stored sparse targets (every position carries loss)."""
    device = logits.device
    loss = memdec_loss(logits, labels.to(device), ids.to(device), probs.to(device), None, beta=beta).loss
    loss.backward()
    return loss.detach()


def timed(steps, logits, *args, repeats: int):
    """Median seconds of each step over `repeats` interleaved rounds, after one warm-up round.

    Interleaving spreads any load from other processes over both paths alike. Returns, per step,
    (seconds, loss, grad of its last run, peak bytes allocated on CUDA during its last run beyond what
    was allocated before it, or None on other devices).
    """
    cuda = logits.device.type == "cuda"
    results = {}

    def runner(k, step):
        def run():
            logits.grad = None
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            loss = step(logits, *args)
            peak = torch.cuda.max_memory_allocated() - base if cuda else None
            results[k] = (loss, logits.grad, peak)

        return run

    runners = {k: runner(k, step) for k, step in enumerate(steps)}
    seconds = median_times(runners, repeats, warmup=1, device=logits.device)
    return [(seconds[k], *results[k]) for k in runners]


def main(
    vocab: int = 50257,
    batch: int = 2,
    seq_len: int = 1024,
    support: int = 256,
    beta: float = 0.5,
    repeats: int = 5,
    seed: int = 0,
    threads: int = 0,
    device: str = "cpu",
) -> float:
    """Time both paths on the same step, check they agree, print the figures, return the speed-up.

    ``threads`` > 0 sets torch's intra-op threads (1 gives steadier numbers on a shared machine).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    logits, labels, ids, probs, counts = synthetic(batch, seq_len, vocab, support, seed)
    logits = logits.to(device).requires_grad_(True)
    positions = batch * seq_len
    args = (labels, ids, probs, counts, beta)

    (dense_s, dense_loss, dense_grad, dense_peak), (sparse_s, sparse_loss, sparse_grad, sparse_peak) = timed(
        (dense_step, sparse_step), logits, *args, repeats=repeats
    )

    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    scale = dense_grad.abs().max().item()
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6 * scale)

    dense_bytes = positions * vocab * 4  # fp32 [positions, V], as the paper's collator builds per step
    sparse_bytes = ids.numel() * ids.element_size() + probs.numel() * probs.element_size()
    assert ids.dtype == torch.int32 and probs.dtype == torch.float16
    figures = {
        "device": logits.device.type,
        "positions": positions,
        "vocab": vocab,
        "support": support,
        "threads": torch.get_num_threads(),
        "dense_loss": dense_loss.item(),
        "sparse_loss": sparse_loss.item(),
        "max_grad_abs_diff": (sparse_grad - dense_grad).abs().max().item(),
        "dense_target_bytes_fp32": dense_bytes,
        "sparse_target_bytes_int32_ids_fp16_probs": sparse_bytes,
    }
    if dense_peak is not None:
        logits_bytes = logits.numel() * logits.element_size()
        figures["logits_bytes"] = logits_bytes
        figures["dense_peak_bytes_above_logits_incl_grad"] = dense_peak
        figures["sparse_peak_bytes_above_logits_incl_grad"] = sparse_peak
    figures |= {
        "dense_seconds": dense_s,
        "sparse_seconds": sparse_s,
        "target_memory_ratio": dense_bytes / sparse_bytes,
        "loss_speedup": dense_s / sparse_s,
    }
    for name, value in figures.items():
        report(name, value, digits=6)
    return figures["loss_speedup"]


if __name__ == "__main__":
    from jsonargparse import CLI  # only the command line needs it; `main` can be imported without

    CLI(main)
