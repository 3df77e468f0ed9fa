"""Benchmark: `memdec build-index` (one process) vs `memdec build-index-sharded` on 2 CPU ranks (DDP, gloo).

Run: ``python benchmarks/index_build.py [--n 300000 --dim 256 --factory IVF512,PQ32 --train_size 20000]``. Both
commands run as subprocesses on the same synthetic datastore (benchmarks/scale.py's Gaussian mixture), with the
same factory, training sample and seed, so both train the same tables once (the sharded build on rank 0) and differ
in how the N keys are added: one process, or two ranks each adding half the chunks, then a merge on rank 0. The
wall time is the whole command (start-up, training, adding, merge, recall, publication); the two index files are
checked byte-identical first. Prints ``name: number`` lines, the last being ``index_build_speedup`` (one-process
seconds / 2-rank seconds).
"""

from __future__ import annotations

from pathlib import Path

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
    workdir: str = "bench-index-build",
) -> None:
    """Build the index of ``n`` synthetic keys both ways; report each wall time and the speed-up."""
    root = Path(workdir)
    store = write_store(root / f"store-{n}-{dim}", n, dim, centres=256, spread=0.5, seed=0)
    common = ["--datastore", str(store), "--factory", factory, "--train_size", str(train_size), "--overwrite", "true"]
    common += ["--recall_queries", "256", "--recall_k", "64"]
    one_s, one_peak, _ = run_stage(["build-index", *common, "--out", str(root / "one")], root / "one")
    ranks = ["--chunk_keys", str(chunk_keys), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    two_s, two_peak, _ = run_stage(["build-index-sharded", *common, *ranks, "--out", str(root / "two")], root / "two")
    if (root / "one" / INDEX).read_bytes() != (root / "two" / INDEX).read_bytes():
        raise SystemExit("the sharded index differs from the one-process index: the benchmark compared other work")
    report("keys", n)
    report("dim", dim)
    report("factory", factory)
    report("index_files_identical", 1)
    report("one_process_seconds", one_s)
    report("one_process_peak_rss_mb", one_peak / 2**20)
    report("two_ranks_seconds", two_s)
    report("two_ranks_rank0_peak_rss_mb", two_peak / 2**20)
    report("one_process_keys_per_s", n / one_s)
    report("two_ranks_keys_per_s", n / two_s)
    report("index_build_speedup", one_s / two_s)


if __name__ == "__main__":
    CLI(main, as_positional=False)
