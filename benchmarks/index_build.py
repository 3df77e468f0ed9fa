"""Benchmark: `memdec build-index` (one process) vs `memdec build-index-sharded` on 2 CPU ranks (DDP, gloo).

Run: ``python benchmarks/index_build.py [--n 300000 --dim 256 --factory IVF512,PQ32 --train_size 20000]``. Both
commands run as subprocesses on the same synthetic datastore (benchmarks/scale.py's Gaussian mixture), with the
same factory, training sample and seed, so both train the same tables once (the sharded build on rank 0) and differ
in how the N keys are added: one process, or two ranks each adding half the chunks, then a merge on rank 0. The
wall time is the whole command (start-up, training, adding, merge, recall, publication); the two index files are
checked byte-identical after each round; with ``--repeats`` the rounds alternate which side runs first. Prints
``name: number`` lines, the last being ``index_build_speedup`` (median one-process seconds / median 2-rank seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import report  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI
from scale import run_stage, write_store

from lightning_memdec.io.readers import INDEX


def main(
    n: int = 300_000,
    dim: int = 256,
    factory: str = "IVF512,PQ32",
    train_size: int = 20_000,
    chunk_keys: int = 32_768,
    repeats: int = 1,
    workdir: str = "bench-index-build",
) -> None:
    """Build the index of ``n`` synthetic keys both ways, ``repeats`` rounds in alternating order (on a shared
    machine the load drifts: each side then runs early and late); report each run, the medians and the speed-up."""
    root = Path(workdir)
    store = write_store(root / f"store-{n}-{dim}", n, dim, centres=256, spread=0.5, seed=0)
    common = ["--datastore", str(store), "--plan.factory", factory, "--plan.train_size", str(train_size)]
    common += ["--overwrite", "true"]
    common += ["--recall_queries", "256", "--recall_k", "64"]
    ranks = ["--chunk_keys", str(chunk_keys), "--hardware.accelerator", "cpu", "--hardware.devices", "2"]
    ranks += ["--hardware.strategy", "ddp"]
    commands = {"one_process": ["build-index", *common], "two_ranks": ["build-index-sharded", *common, *ranks]}
    seconds, peaks = {side: [] for side in commands}, {side: [] for side in commands}
    for round_ in range(repeats):
        for side in list(commands)[:: 1 if round_ % 2 == 0 else -1]:
            wall, peak, _ = run_stage([*commands[side], "--out", str(root / side)], root / side)
            seconds[side].append(wall)
            peaks[side].append(peak)
            report(f"round{round_}_{side}_seconds", wall)
        if (root / "one_process" / INDEX).read_bytes() != (root / "two_ranks" / INDEX).read_bytes():
            raise SystemExit("the sharded index differs from the one-process index: the benchmark compared other work")
    report("keys", n)
    report("dim", dim)
    report("factory", factory)
    report("index_files_identical", 1)
    for side in commands:
        report(f"{side}_seconds", float(np.median(seconds[side])))
        report(f"{side}_peak_rss_mb", max(peaks[side]) / 2**20)  # two_ranks: rank 0, the process run_stage waits on
        report(f"{side}_keys_per_s", n / float(np.median(seconds[side])))
    report("index_build_speedup", float(np.median(seconds["one_process"]) / np.median(seconds["two_ranks"])))


if __name__ == "__main__":
    CLI(main, as_positional=False)
