"""Benchmark: the train loader's batches, targets padded on the host (before) vs carried as CSR (now).

Run: ``python benchmarks/loader.py [--window 1024 --k 1024 --batch 8 --windows 64 --num_workers 1 ...]``.
A random-token corpus and synthetic targets of the real shapes (k neighbours a position, aggregated by token: a
Zipf-like support, from a few tokens to several hundred) are written to ``--workdir`` as a corpus and a targets
directory, then read by the package's ``WindowTargetsDataset`` both ways:

* host (before): each window's rows padded to ``[W, support]`` in the worker, the batch padded again to its
  largest support (``HostPaddedDataset`` / ``host_padded_collate``, the code before the change, kept here);
* csr (now): the kept entries and a count per position (``collate``); the loss's dense rows are built after the
  host-to-device copy by ``pad_targets``, timed apart here on the CPU (``pad_targets_ms``).

Both loaders are the real ones (``EvenShardSampler``, ``--num_workers`` worker processes) and are timed interleaved
(median of ``--repeats`` rounds of ``--batches`` batches). The script checks that the two padded batches are equal,
then prints ``name: number`` lines, the last two the headline: ``batch_bytes_ratio`` (bytes a batch moves, host ÷
csr) and ``loader_speedup`` (csr batches/s ÷ host batches/s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import report  # benchmarks/ is the script's directory, first on sys.path
from gpu import random_corpus
from torch.utils.data import DataLoader

from lightning_memdec.evaluation.latency import median_times
from lightning_memdec.io.artifact_dirs import base_meta, publish, start_work_dir
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import Targets
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.training.datamodule import (
    EvenShardSampler,
    WindowTargetsDataset,
    collate,
    pad_targets,
)


def zipf_rows(n: int, k: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` positions' targets: k neighbours' tokens drawn Zipf-like (exponent 1.1-2.5 per position), aggregated by
    token, probabilities their shares, each row sorted by probability. Returns (counts, ids int32, probs fp16)."""
    ranks = np.minimum(rng.zipf(rng.uniform(1.1, 2.5, (n, 1)), (n, k)), vocab) - 1
    tokens = np.sort((ranks * 7919 + rng.integers(0, vocab, (n, 1))) % vocab, axis=1)  # a token order per position
    first = np.ones_like(tokens, dtype=bool)
    first[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    row, col = np.nonzero(first)
    last_of_row = np.append(row[1:] != row[:-1], True)
    shares = np.where(last_of_row, k, np.append(col[1:], 0)) - col  # run lengths: neighbours per token
    order = np.lexsort((-shares, row))
    return first.sum(1), tokens[first][order].astype(np.int32), (shares[order] / k).astype(np.float16)


@exclusive_output
def synthetic_targets(out: Path, corpus: Path, k: int, seed: int, chunk: int = 2048) -> Path:
    """A targets directory for every position of ``corpus``, rows from :func:`zipf_rows`."""
    if (out / "meta.json").is_file():
        return out
    c = Corpus(corpus)
    rng, n, vocab = np.random.default_rng(seed), c.num_positions, c.tokenizer["vocab_size"]
    parts = [zipf_rows(min(chunk, n - s), k, vocab, rng) for s in range(0, n, chunk)]
    counts, ids, probs = (np.concatenate(p) for p in zip(*parts))
    work = start_work_dir(out, {"synthetic_targets": str(corpus), "k": k, "seed": seed}, overwrite=True)
    np.save(work / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    np.save(work / "ids.npy", ids)
    np.save(work / "probs.npy", probs)
    meta = base_meta("targets", num_positions=n, nnz=len(ids), k=k, tokenizer=c.tokenizer,
                     corpus_sha256=c.meta["content_sha256"], synthetic="zipf")  # fmt: skip
    return publish(work, out, meta)


class HostPaddedDataset(WindowTargetsDataset):
    """Before: a window's CSR rows padded on the host to ``[W, support]`` (the former ``__getitem__``)."""

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        item, start = self.window_item(j)
        ids, probs = self.padded_rows(self._open()[1], start)
        return {**item, "target_ids": torch.from_numpy(ids), "target_probs": torch.from_numpy(probs)}

    def padded_rows(self, targets: Targets, start: int) -> tuple[np.ndarray, np.ndarray]:
        """The former ``_target_rows``."""
        w = self.window
        offsets = np.asarray(targets.offsets[start : start + w + 1])
        lo, hi = int(offsets[0]), int(offsets[-1])
        counts = np.diff(offsets)
        rows = np.repeat(np.arange(w), counts)
        cols = np.arange(hi - lo) - np.repeat(offsets[:-1] - lo, counts)
        support = int(counts.max())
        if self.max_support is not None:
            support = min(support, self.max_support)
        keep = cols < support
        ids = np.zeros((w, support), dtype=np.int32)
        probs = np.zeros((w, support), dtype=np.float16)
        ids[rows[keep], cols[keep]] = targets.ids[lo:hi][keep]
        probs[rows[keep], cols[keep]] = targets.probs[lo:hi][keep]
        if self.max_support is not None and support < counts.max():
            p32 = probs.astype(np.float32)
            probs = (p32 / p32.sum(1, keepdims=True)).astype(np.float16)
        return ids, probs


def host_padded_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The former ``collate``: the support padded to the batch's largest with probability-0 entries."""
    support = max(item["target_ids"].shape[1] for item in items)
    pad = lambda t: torch.nn.functional.pad(t, (0, support - t.shape[1]))
    return {
        "input_ids": torch.stack([i["input_ids"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "target_ids": torch.stack([pad(i["target_ids"]) for i in items]),
        "target_probs": torch.stack([pad(i["target_probs"]) for i in items]),
        "loss_mask": torch.stack([i["loss_mask"] for i in items]),
        "start": torch.stack([i["start"] for i in items]),
    }


def batch_bytes(batch: dict) -> int:
    """What a batch moves through the workers, pinned memory and the host-to-device copy: its tensors' bytes."""
    return sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))


def endless(dataset, collate_fn, batch: int, num_workers: int):
    """The real loader (shuffled EvenShardSampler, its own generator), epoch after epoch, workers kept."""
    sampler = EvenShardSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    while True:
        yield from loader


def check_equal(host: dict, csr: dict) -> None:
    padded = pad_targets(csr)
    assert set(padded) == set(host)
    for key, value in host.items():
        assert padded[key].dtype == value.dtype and torch.equal(padded[key], value), key


def main(
    workdir: Path = Path("runs/bench-loader"),
    window: int = 1024,
    k: int = 1024,
    batch: int = 8,
    windows: int = 64,
    max_support: int | None = None,
    num_workers: int = 1,
    batches: int = 8,
    repeats: int = 5,
    seed: int = 0,
) -> float:
    """Write the synthetic corpus and targets, time both loaders, check their batches agree, print the figures."""
    w = Path(workdir)
    corpus = random_corpus(w / f"corpus-{windows}x{window}", windows * window + 1, seed)
    targets = synthetic_targets(w / f"targets-{windows}x{window}-k{k}", corpus, k, seed)
    make = lambda cls: cls(corpus, targets, window, window, max_support)
    host_ds, csr_ds = make(HostPaddedDataset), make(WindowTargetsDataset)
    host = endless(host_ds, host_padded_collate, batch, num_workers)
    csr = endless(csr_ds, collate, batch, num_workers)
    first_host, first_csr = next(host), next(csr)  # the same windows: the same sampler order
    check_equal(first_host, first_csr)
    seconds = median_times({"host": lambda: [next(host) for _ in range(batches)],
                            "csr": lambda: [next(csr) for _ in range(batches)]}, repeats, warmup=1)  # fmt: skip
    pad_s = median_times({"pad": lambda: pad_targets(first_csr)}, repeats, warmup=1)["pad"]
    counts = np.diff(Targets(targets).offsets[:])
    host_mb, csr_mb = batch_bytes(first_host) / 1e6, batch_bytes(first_csr) / 1e6
    figures = {
        "window": window, "k": k, "batch": batch, "num_workers": num_workers, "threads": torch.get_num_threads(),
        "support_mean": float(counts.mean()), "support_max": int(counts.max()),
        "batch_support": int(first_csr["target_support"]),
        "host_batch_mbytes": host_mb, "csr_batch_mbytes": csr_mb,
        "host_loader_batches_per_s": batches / seconds["host"], "csr_loader_batches_per_s": batches / seconds["csr"],
        "pad_targets_ms": 1000 * pad_s,
        "batch_bytes_ratio": host_mb / csr_mb,
        "loader_speedup": seconds["host"] / seconds["csr"],
    }  # fmt: skip
    for name, value in figures.items():
        report(name, value)
    return figures["loader_speedup"]


if __name__ == "__main__":
    from jsonargparse import CLI  # only the command line needs it; `main` can be imported without

    CLI(main)
