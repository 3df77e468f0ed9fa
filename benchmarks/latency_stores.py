"""Datastores and indexes of several sizes for benchmarks/latency.py: real keys, then synthetic ones around them.

The smallest size is all real: the shipped ``embedded:general/train`` text through this package's own stages
(``tokenize`` → ``build_datastore`` with the base LM). Encoding millions of positions with the base takes longer than
the benchmark's budget on 2 CPU cores, so larger sizes keep those R real entries and add synthetic ones: entry
``i ≥ R`` copies a real entry ``s`` drawn uniformly at random (its key and its value) and adds Gaussian noise of
``noise_scale`` × the real keys' per-dimension standard deviation to the key, stored in fp16 like real keys. The
synthetic entries are made in fixed blocks from seeded generators, so a smaller store is a prefix of a larger one.

What this keeps real is what sets search cost: N, d, the index layout (``build_index(factory="auto")`` plans it from
N and d exactly as ``memdec build-index --plan.factory auto`` does) and keys distributed like the base's hidden states,
so the IVF lists are as (un)balanced as real ones. It does not make the extra entries meaningful: these stores are for
timing only.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, Windows

BLOCK = 65_536  # synthetic entries made per seeded generator


def save_gpt2(path: Path, n_embd: int, n_layer: int, n_head: int, seed: int, n_positions: int = 1024) -> Path:
    """A random-init GPT-2-architecture LM with the GPT-2 tokenizer (timing depends on shapes, not on weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.io.embedded import load_tokenizer

    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257, n_positions=n_positions)
        GPT2LMHeadModel(cfg).save_pretrained(path)
        load_tokenizer("gpt2").save_pretrained(path)
    return path


def stage(what: str, out: Path, build) -> Path:
    """Build an artefact once (the stages refuse to overwrite, so a cached one is reused as is)."""
    start = time.perf_counter()
    if not (out / "meta.json").is_file():
        build()
        print(f"{what}_build_seconds: {time.perf_counter() - start:.1f}", flush=True)
    else:
        print(f"{what}: cached in {out}", flush=True)
    return out


def real_datastore(workdir: Path, base_dir: Path, entries: int, window: int, stride: int) -> Path:
    """``entries`` real positions of embedded:general/train keyed by the base, through the package's stages."""
    from lightning_memdec.io.token_corpus import tokenize
    from lightning_memdec.stages.datastore import build_datastore

    tokens = entries + 1
    corpus = workdir / f"corpus-{tokens}"
    stage("corpus", corpus, lambda: tokenize(["embedded:general/train"], corpus, "gpt2", max_tokens=tokens))
    out = workdir / f"datastore-{base_dir.name}-{tokens}-{window}-{stride}"
    windows, cpu = Windows(window=window, stride=stride, batch_size=8), Hardware(accelerator="cpu")
    build = partial(build_datastore, corpus, str(base_dir), out, windows=windows, hardware=cpu)
    return stage(f"datastore_{entries}", out, build)


def key_std(keys: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Per-dimension standard deviation of fp16 keys [N, d], accumulated in float64 block by block."""
    total = np.zeros(keys.shape[1])
    square = np.zeros(keys.shape[1])
    for start in range(0, len(keys), block):
        part = np.asarray(keys[start : start + block], dtype=np.float64)
        total += part.sum(0)
        square += (part**2).sum(0)
    mean = total / len(keys)
    return np.sqrt(np.maximum(square / len(keys) - mean**2, 0.0)).astype(np.float32)


@exclusive_output
def synthetic_datastore(real_dir: Path, out: Path, entries: int, noise_scale: float, seed: int) -> Path:
    """The real store's entries followed by synthetic ones up to ``entries`` (see the module docstring)."""
    from numpy.lib.format import open_memmap

    from lightning_memdec.io.artifact_dirs import publish, start_work_dir
    from lightning_memdec.io.readers import KEYS, VALUES, Datastore

    real = Datastore(real_dir)
    n_real, dim = len(real), real.dim
    if entries <= n_real:
        raise ValueError(f"a synthetic store needs more than the {n_real} real entries, got {entries}.")
    how = {"real_entries": n_real, "noise_scale": noise_scale, "seed": seed, "block": BLOCK}
    work = start_work_dir(out, {"real": str(real_dir), "entries": entries, **how}, overwrite=True)
    keys = open_memmap(work / KEYS, mode="w+", dtype=np.float16, shape=(entries, dim))
    values = np.empty(entries, dtype=np.int32)
    keys[:n_real] = real.keys
    values[:n_real] = real.values
    sigma = noise_scale * key_std(real.keys)
    for block, start in enumerate(range(n_real, entries, BLOCK)):
        rng = np.random.default_rng([seed, block])
        source = rng.integers(0, n_real, size=BLOCK)
        noise = rng.standard_normal((BLOCK, dim), dtype=np.float32)
        rows = min(BLOCK, entries - start)
        source, noise = np.sort(source[:rows]), noise[:rows]  # sorted: gathers from the memmap read forwards
        keys[start : start + rows] = (real.keys[source].astype(np.float32) + sigma * noise).astype(np.float16)
        values[start : start + rows] = real.values[source]
    keys.flush()
    del keys
    np.save(work / VALUES, values)
    return publish(work, out, {**real.meta, "num_entries": entries, "synthetic": {**how, "from": str(real_dir)}})


def stores_by_size(
    workdir: Path, base_dir: Path, sizes: list[int], window: int, stride: int, noise_scale: float, seed: int
) -> dict[int, Path]:
    """One datastore per size: the smallest all real, the others real + synthetic (cached in ``workdir``)."""
    sizes = sorted(set(sizes))
    real = real_datastore(workdir, base_dir, sizes[0], window, stride)
    stores = {sizes[0]: real}
    for n in sizes[1:]:
        out = workdir / f"{real.name}-synthetic-{n}-noise{noise_scale:g}-seed{seed}"
        stores[n] = stage(f"datastore_{n}", out, partial(synthetic_datastore, real, out, n, noise_scale, seed))
    return stores


def index_for(size: int, store: Path, memory_gb: float, nprobe: int, seed: int) -> Path:
    """``build_index(factory="auto")`` over one store, with the plan's training sample under ``memory_gb``.

    The budget only sizes the k-means sample; a budget so small that the plan would halve nlist is refused, so the
    index searched is the one ``memdec build-index --plan.factory auto`` builds with its default budget.
    """
    from lightning_memdec.io.readers import Datastore
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.retrieval.index_plan import plan_index

    dim = Datastore(store).dim
    planned, default = plan_index(size, dim, memory_gb=memory_gb).factory, plan_index(size, dim).factory
    if planned != default:
        raise ValueError(f"--index_memory_gb {memory_gb} changes auto's plan for {size} keys ({planned} instead of "
                         f"{default}): give at least enough for 39 training keys per list.")  # fmt: skip
    out = store.with_name(f"index-{store.name}-auto-mem{memory_gb:g}-nprobe{nprobe}")
    build = partial(build_index, store, out, IndexSettings(memory_gb=memory_gb, nprobe=nprobe, seed=seed))
    return stage(f"index_{size}", out, build)
