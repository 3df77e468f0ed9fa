"""Benchmark: does memory stay flat as the store grows? Index build and two-rank targets at N and 4N entries.

Run: ``python benchmarks/scale.py [--n 1000000] [--workdir DIR]`` (about 20 minutes on 2 quiet cores at the default
N = 1 M; ``--n 20000`` is the tiny CI mode). Needs Linux (/proc) for the memory figures.

What is built, per size S in (N, 4N):

1. **a synthetic datastore** of S keys, d = 256, fp16: a Gaussian mixture (``--centres`` random centres, unit noise
   around centres spread ``--spread``), so an IVF index has structure to find; values are Zipf-distributed token ids
   (vocabulary 50,257), independent of the keys. Written in blocks through the package's own format (``keys.npy``,
   ``values.npy``, ``meta.json`` published like ``build-datastore``'s), so the stages accept it. A query datastore of
   ``--queries`` keys from the same mixture (another seed) is the same for both sizes.
2. **``memdec build-index --plan.factory auto``** in a subprocess: the plan is printed (``#`` lines). Only the training
   sample is set by hand (``--train_per_list`` keys per IVF list, FAISS's minimum 39 by default, not the plan's
   39–256 within 8 GiB): at 4 M entries the plan's 2 M-key k-means over 8,192 lists alone takes longer than this
   whole benchmark may on two cores. ``index_entries_per_s`` = S ÷ the subprocess's wall time (start-up, training,
   adding, the recall measurement and writing included). ``recall_at_k`` is what build-index measured and stored in
   the index's meta.json: recall@k of the index at ``--nprobe`` against exact search, 256 stored keys as queries.
3. **``memdec build-targets --search.backend faiss``** on 2 processes (``--hardware.accelerator cpu
   --hardware.devices 2 --hardware.strategy ddp``) for the query datastore (targets for ``--queries`` positions
   against the S-entry store, k = ``--k``, T = 16, the
   index's nprobe). A fixed query set, not every stored position: targets for 4 M positions at nprobe 8 take longer
   than this benchmark may, and what grows with the store is each query's search and the store the ranks read, not
   the number of queries. ``targets_queries_per_s`` = queries ÷ the subprocess's wall time (DDP start-up, index
   loading on each rank and the merge included).

Memory: each rank of build-targets records at exit its ``VmHWM`` (the kernel's peak resident set: anonymous and
file-backed pages together, the honest "peak RSS") and, sampled every 20 ms, its peak ``RssAnon`` and ``RssFile``
(mapped file pages count in RSS once touched; the split shows which dominates; RssFile includes ~120 MB of shared
libraries). Each rank holds the whole index by design; its size in RAM is measured as the rank's RSS growth across
the module's setup, which loads it (``index_in_ram_mb``: the file plus IVF-PQ's precomputed table, nlist × m × 256
floats, which grows with √N). ``peak_rss_ex_index_mb`` = VmHWM − that. The headline, last: ``peak_rss_ratio`` = the
larger rank's peak RSS excluding the index at 4N ÷ the same at N (goal ≤ 1.5: per-rank memory O(chunk), not O(N)).
Python, torch, Lightning and FAISS alone take several hundred MB per rank, in both numerator and denominator, so
``targets_growth_ex_index_mb`` (the difference) and ``peak_rss_ratio_with_index`` are printed too. build-index runs
in one process: its peak RSS (``wait4``) holds the index, the training sample and the recall measurement's exact
search (its 1 GiB CPU budget); printed for information.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
from common import report  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI

from lightning_memdec.io.artifact_dirs import base_meta, publish, start_work_dir
from lightning_memdec.io.npy_rows import NpyAppender
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import INDEX, KEYS, VALUES
from lightning_memdec.retrieval.index_plan import MIN_TRAIN_PER_LIST, plan_index

HERE = Path(__file__).resolve().parent
VOCAB = 50257
TOKENIZER = {"name": "synthetic", "vocab_size": VOCAB, "fingerprint": "synthetic-zipf", "eos_token_id": VOCAB - 1}
MB = 2**20


def proc_status() -> dict[str, int]:
    """This process's memory lines of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(rest.split()[0]) * 1024
    return out


class RankMemory(L.Callback):
    """Passed to build-targets with ``--callbacks+``: each rank writes ``rank<r>.json`` at exit with its VmHWM, its
    sampled peak RssAnon / RssFile, and its RSS before and after the module's setup (which loads the FAISS index:
    the difference is the index as held in RAM, precomputed tables included) — callbacks' setup runs first."""

    def __init__(self, out: str, interval: float = 0.02):
        self.out, self.interval = Path(out), interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.before = self.baseline = 0

    def setup(self, trainer, pl_module, stage):
        self.rank, self.before = trainer.global_rank, proc_status()["VmRSS"]
        threading.Thread(target=self.sample, daemon=True).start()
        atexit.register(self.write)

    def on_predict_start(self, trainer, pl_module):
        self.baseline = proc_status()["VmRSS"]

    def sample(self):
        while True:
            status = proc_status()
            for name in self.peak:
                self.peak[name] = max(self.peak[name], status[name])
            time.sleep(self.interval)

    def write(self):
        record = {"vm_hwm": proc_status()["VmHWM"], "before_setup": self.before, "baseline": self.baseline}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps({**record, **self.peak}))


@exclusive_output
def write_store(out: Path, n: int, dim: int, centres: int, spread: float, seed: int, block: int = 1 << 16) -> Path:
    """A datastore directory of ``n`` Gaussian-mixture keys and Zipf values, written ``block`` rows at a time."""
    if (out / "meta.json").is_file():
        return out
    work = start_work_dir(out, {"synthetic": n, "dim": dim, "seed": seed}, overwrite=True)
    means = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32) * spread  # shared
    freq = 1.0 / (np.arange(VOCAB) + 2.7) ** 1.1
    rng = np.random.default_rng(seed)
    with NpyAppender(work / KEYS, np.float16, (dim,), n) as keys, NpyAppender(work / VALUES, np.int32, (), n) as values:
        for lo in range(0, n, block):
            rows = min(block, n - lo)
            keys.append(means[rng.integers(0, centres, rows)] + rng.standard_normal((rows, dim), dtype=np.float32))
            values.append(rng.choice(VOCAB, size=rows, p=freq / freq.sum()))
    meta = base_meta(
        "datastore", model="synthetic:gaussian-mixture", model_type="synthetic", layer="none", dim=dim,
        key_dtype="float16", precision="32", num_entries=n, window=1, stride=1, corpus=f"synthetic:{seed}",
        corpus_sha256=f"synthetic-{seed}-{n}", tokenizer=TOKENIZER,
    )  # fmt: skip
    return publish(work, out, meta)


def run_stage(args: list[str], log: Path, extra_path: Path | None = None) -> tuple[float, int, str]:
    """Run ``python -m lightning_memdec ARGS``; (wall seconds, the child's peak RSS from ``wait4``, its stdout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in [extra_path, env.get("PYTHONPATH")] if p])
    start = time.perf_counter()
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "lightning_memdec", *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # not child.wait(): wait4 gives this child's own rusage
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"memdec {args[0]} failed:\n{log.with_suffix('.err').read_text()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, log.with_suffix(".out").read_text()


def index_stage(store: Path, out: Path, n: int, dim: int, train_per_list: int, nprobe: int, recall_k: int) -> dict:
    plan = plan_index(n, dim)
    train = min(n, train_per_list * plan.nlist) if plan.nlist else 0
    args = [
        "build-index",
        "--datastore",
        str(store),
        "--out",
        str(out),
        "--plan.factory",
        "auto",
        "--plan.nprobe",
        str(nprobe),
        "--recall_queries",
        "256",
        "--recall_k",
        str(recall_k),
        "--overwrite",
        "true",
    ]
    args += ["--plan.train_size", str(train)] if train else []
    seconds, peak, stdout = run_stage(args, out.parent / out.name)
    for line in stdout.splitlines():
        if line.startswith(("index plan", "  ")):
            print(f"# {line}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "peak": peak, "recall": meta["recall"], "bytes": (out / INDEX).stat().st_size,
            "train": meta["train_size"]}  # fmt: skip


def targets_stage(store: Path, index: Path, queries: Path, out: Path, k: int, chunk: int) -> dict:
    memory = out.parent / f"{out.name}-memory"
    callback = json.dumps({"class_path": "scale.RankMemory", "init_args": {"out": str(memory)}})
    args = ["build-targets", "--datastore", str(store), "--index", str(index), "--queries", str(queries), "--out",
            str(out), "--knn.k", str(k), "--knn.temperature", "16", "--search.backend", "faiss",
            "--search.chunk_size", str(chunk), "--hardware.accelerator", "cpu", "--hardware.devices", "2",
            "--hardware.strategy", "ddp", "--overwrite", "true",
            "--callbacks+", callback]  # fmt: skip
    seconds, _, _ = run_stage(args, out.parent / out.name, extra_path=HERE)
    ranks = [json.loads((memory / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"seconds": seconds, "ranks": ranks, "nnz": json.loads((out / "meta.json").read_text())["nnz"]}


def main(
    n: int = 1_000_000,
    dim: int = 256,
    queries: int = 50_000,
    k: int = 64,
    nprobe: int = 8,
    train_per_list: int = MIN_TRAIN_PER_LIST,
    centres: int = 2048,
    spread: float = 1.0,
    chunk_size: int = 4096,
    workdir: Path = Path("scale-bench"),
    seed: int = 0,
) -> None:
    """Build index and targets at n and 4n synthetic entries; print rates, recall and per-rank peak RSS.

    Args:
        n: entries of the smaller store (the larger has 4n). 20000 is the tiny mode for CI.
        dim: key dimension.
        queries: positions targets are built for (a separate query datastore, the same for both sizes).
        k: neighbours per query.
        nprobe: IVF lists probed (build-index stores it; targets use it).
        train_per_list: IVF training keys per list (39: FAISS's minimum; the plan would take up to 256).
        centres: Gaussian-mixture centres of the synthetic keys.
        spread: standard deviation of the centres (the noise around each is 1).
        chunk_size: query positions per targets chunk.
        workdir: where stores, indexes and targets go (about 2.6 GB at n = 1 M; reused when present).
        seed: seed of the synthetic data.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    qstore = write_store(workdir / f"queries-{queries}", queries, dim, centres, spread, seed + 1000)
    report("dim", dim)
    report("queries", queries)
    report("k", k)
    report("nprobe", nprobe)
    excluding, with_index = {}, {}
    for size in (n, 4 * n):
        start = time.perf_counter()
        store = write_store(workdir / f"store-{size}", size, dim, centres, spread, seed)
        report(f"n{size}_store_write_seconds", time.perf_counter() - start)
        built = index_stage(store, workdir / f"index-{size}", size, dim, train_per_list, nprobe, k)
        report(f"n{size}_index_train_keys", built["train"])
        report(f"n{size}_index_entries_per_s", size / built["seconds"])
        report(f"n{size}_recall_at_{built['recall']['k']}", built["recall"]["recall"])
        report(f"n{size}_index_file_mb", built["bytes"] / MB)
        report(f"n{size}_index_build_peak_rss_mb", built["peak"] / MB)
        t = targets_stage(store, workdir / f"index-{size}", qstore, workdir / f"targets-{size}", k, chunk_size)
        report(f"n{size}_targets_queries_per_s", queries / t["seconds"])
        report(f"n{size}_targets_mean_support", t["nnz"] / queries)
        for r, rank in enumerate(t["ranks"]):
            loaded = rank["baseline"] - rank["before_setup"]
            report(f"n{size}_targets_rank{r}_peak_rss_mb", rank["vm_hwm"] / MB)
            report(f"n{size}_targets_rank{r}_index_in_ram_mb", loaded / MB)
            report(f"n{size}_targets_rank{r}_peak_rss_ex_index_mb", (rank["vm_hwm"] - loaded) / MB)
            report(f"n{size}_targets_rank{r}_peak_anon_mb", rank["RssAnon"] / MB)
            report(f"n{size}_targets_rank{r}_peak_file_mb", rank["RssFile"] / MB)
            report(f"n{size}_targets_rank{r}_baseline_mb", rank["baseline"] / MB)
        with_index[size] = max(rank["vm_hwm"] for rank in t["ranks"])
        excluding[size] = max(rank["vm_hwm"] - rank["baseline"] + rank["before_setup"] for rank in t["ranks"])
    report("targets_growth_ex_index_mb", (excluding[4 * n] - excluding[n]) / MB)
    report("peak_rss_ratio_with_index", with_index[4 * n] / with_index[n])
    report("peak_rss_ratio", excluding[4 * n] / excluding[n])


if __name__ == "__main__":
    CLI(main)
