"""Benchmark: inference latency of base LM vs base + Memory Decoder vs base + kNN-LM, on this machine's CPU.

Run: ``python benchmarks/latency.py [--workdir DIR ...]``. What it builds (random-init weights are fine for timing):

- a GPT-2-architecture base LM and a GPT-2-architecture decoder with about a tenth of its FLOPs per token,
  counted as 2 × (parameters used per token, LM head included; position-embedding lookups excluded);
- a kNN-LM datastore of >= 200k entries made with this package's own stages (``tokenize`` → ``build_datastore``
  → ``build_index``) from the shipped ``embedded:general/train`` text run through the base, and an IVF-PQ index.

It times, on the same batch of real test text, a forward pass that yields next-token log-probabilities at every
position: base; base + MemDec (decoder forward + log-space mix); base + kNN-LM (the same forward with the key
hook, IVF-PQ search of k neighbours, dense p_kNN, mix). Runners are interleaved and the median is reported. Then
greedy generation with KV caches: base vs base + MemDec through ``generate()``, and a step loop with one retrieval
per token for kNN-LM vs the same loop without retrieval.

Batch size matters on CPU at this model size. The headline batch (1 × 128) keeps every [positions × vocabulary]
float32 tensor (25.7 MB) under glibc malloc's 32 MB mmap threshold, so such temporaries are recycled from the heap.
Above it (e.g. 4 × 256, printed as ``large_batch_*``) each V-wide temporary is mmap'ed and page-faulted afresh
(~0.4 s per GB here), which the decoder's extra log-softmax and the mix pay several times over; with a base this
small (44.6M parameters per token) that memory traffic, not the decoder's FLOPs, sets MemDec's overhead there.

Prints ``name: value`` lines, the last four being ``flops_ratio``, ``memdec_overhead``, ``knnlm_overhead`` and
``generate_ratio``. Artefacts are cached in ``--workdir`` (a second run skips building them).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from jsonargparse import CLI


def flops_per_token(model) -> int:
    """2 × parameters used per token: every weight matrix once (the tied LM head as the output projection)."""
    params = sum(p.numel() for p in model.parameters())
    lookups = sum(p.numel() for n, p in model.named_parameters() if n.endswith("wpe.weight"))
    return 2 * (params - lookups)


def save_gpt2(path: Path, n_embd: int, n_layer: int, n_head: int, seed: int, n_positions: int = 1024) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_memdec.assets import load_tokenizer

    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257, n_positions=n_positions)
        GPT2LMHeadModel(cfg).save_pretrained(path)
        load_tokenizer("gpt2").save_pretrained(path)
    return path


def stage(what: str, out: Path, build):
    """Build an artefact once (the stages refuse to overwrite, so a cached one is reused as is)."""
    start = time.perf_counter()
    if not (out / "meta.json").is_file():
        build()
        print(f"{what}_build_seconds: {time.perf_counter() - start:.1f}", flush=True)
    else:
        print(f"{what}: cached in {out}", flush=True)
    return out


def main(
    workdir: Path = Path("/tmp/memdec-latency-bench"),
    n_embd: int = 512,
    n_layer: int = 6,
    decoder_embd: int = 88,
    decoder_layers: int = 2,
    datastore_tokens: int = 200_001,
    datastore_window: int = 256,
    datastore_stride: int = 256,
    factory: str = "IVF512,PQ64np",
    train_size: int = 32_768,
    nprobe: int = 32,
    k: int = 1024,
    temperature: float = 16.0,
    lmbda: float = 0.25,
    batch: int = 1,
    seq: int = 128,
    repeats: int = 15,
    large_batch: int = 4,
    large_seq: int = 256,
    gen_batch: int = 4,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    gen_repeats: int = 5,
    seed: int = 0,
):
    """Time base vs base+MemDec vs base+kNN-LM (see the module docstring).

    Args:
        workdir: where models and pipeline artefacts are built (and reused on the next run).
        n_embd: base hidden size.
        n_layer: base layers.
        decoder_embd: decoder hidden size.
        decoder_layers: decoder layers.
        datastore_tokens: tokens of embedded:general/train in the datastore corpus (entries = tokens - 1).
        datastore_window: context window used to compute the datastore keys.
        datastore_stride: stride of those windows (= window: each position computed once, the cheapest on 2 cores).
        factory: FAISS index factory string.
        train_size: keys sampled to train the index.
        nprobe: IVF lists visited per query.
        k: kNN-LM neighbours per query (paper: 1024).
        temperature: kNN-LM temperature (paper: 16).
        lmbda: mixture weight (any value costs the same).
        batch: sequences per timed forward pass (the headline overheads).
        seq: tokens per sequence.
        repeats: timed repeats (median).
        large_batch: sequences of the second, large-batch measurement.
        large_seq: tokens per sequence there.
        gen_batch: prompts per generate() call.
        prompt_tokens: prompt length.
        new_tokens: greedily generated tokens (no early stop).
        gen_repeats: timed generate() repeats (median).
        seed: weight initialisation seed.
    """
    import faiss

    from lightning_memdec.assets import load_tokenizer
    from lightning_memdec.corpus import tokenize
    from lightning_memdec.datastore import build_datastore
    from lightning_memdec.evaluate import text_tokens
    from lightning_memdec.index import build_index
    from lightning_memdec.interpolate import InterpolatedLM
    from lightning_memdec.knnlm import KNNLM
    from lightning_memdec.models import load_causal_lm
    from lightning_memdec.timing import generation_throughput, model_latency

    workdir.mkdir(parents=True, exist_ok=True)
    print(f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}", flush=True)
    base_dir = save_gpt2(workdir / f"base-{n_embd}x{n_layer}", n_embd, n_layer, 8, seed)
    dec_dir = save_gpt2(workdir / f"memdec-{decoder_embd}x{decoder_layers}", decoder_embd, decoder_layers, 4, seed + 1)
    corpus = stage(
        "corpus",
        workdir / f"corpus-{datastore_tokens}",
        lambda: tokenize(
            ["embedded:general/train"], workdir / f"corpus-{datastore_tokens}", "gpt2", max_tokens=datastore_tokens
        ),
    )
    ds_dir = workdir / f"datastore-{base_dir.name}-{datastore_tokens}-{datastore_window}-{datastore_stride}"
    datastore = stage(
        "datastore",
        ds_dir,
        lambda: build_datastore(
            corpus,
            str(base_dir),
            ds_dir,
            window=datastore_window,
            stride=datastore_stride,
            batch_windows=8,
            accelerator="cpu",
        ),
    )
    ix_dir = workdir / f"index-{ds_dir.name}-{factory.replace(',', '_')}"
    index = stage(
        "index",
        ix_dir,
        lambda: build_index(datastore, ix_dir, factory=factory, train_size=train_size, nprobe=nprobe, seed=seed),
    )

    base = load_causal_lm(base_dir).eval()
    decoder = load_causal_lm(dec_dir).eval()
    tok = load_tokenizer(str(base_dir))
    mixed = InterpolatedLM(base, decoder, lmbda, base_tokenizer=tok, memdec_tokenizer=tok)
    knnlm = KNNLM(base, datastore, index, k=k, temperature=temperature, lmbda=lmbda, tokenizer=tok, nprobe=nprobe)
    n_ids = max(batch * seq, large_batch * large_seq)
    tokens = text_tokens("embedded:general/test", tok, max_tokens=n_ids + gen_batch * prompt_tokens)
    ids = torch.as_tensor(tokens[: batch * seq].reshape(batch, seq))
    prompts = torch.as_tensor(tokens[n_ids:].reshape(gen_batch, prompt_tokens))

    base_flops, dec_flops = flops_per_token(base), flops_per_token(decoder)
    print(f"base: GPT-2 {n_embd}d x {n_layer} layers, {base_flops / 2e6:.1f}M params per token", flush=True)
    print(
        f"decoder: GPT-2 {decoder_embd}d x {decoder_layers} layers, {dec_flops / 2e6:.2f}M params per token", flush=True
    )
    print(
        f"datastore: {len(knnlm.values)} entries x {knnlm.store.meta['dim']} dims (fp16), index {factory}, "
        f"nprobe {nprobe}, k {k}, T {temperature}",
        flush=True,
    )
    print(
        f"timing: embedded:general/test, median of interleaved repeats ({repeats}; large batch {max(1, repeats // 2)}; "
        f"generate {gen_repeats})",
        flush=True,
    )

    flops_ratio = dec_flops / base_flops
    big_ids = torch.as_tensor(tokens[: large_batch * large_seq].reshape(large_batch, large_seq))
    big = model_latency(base, big_ids, len(tok), mixed, knnlm, repeats=max(1, repeats // 2), warmup=1)
    print(
        f"large_batch: {large_batch} x {large_seq} tokens: seconds "
        + ", ".join(f"{key} {sec:.3f}" for key, sec in big["seconds"].items()),
        flush=True,
    )
    print(f"large_batch_memdec_overhead: {big['overhead']['base+memdec']:.3f}", flush=True)
    print(f"large_batch_knnlm_overhead: {big['overhead']['base+knnlm']:.3f}", flush=True)

    knn_base = KNNLM(base, knnlm.store, knnlm.key_index, k=k, temperature=temperature, lmbda=0.0, tokenizer=tok)
    gen = generation_throughput(
        {"base": base, "base+memdec": mixed, "base_loop": knn_base, "base+knnlm_loop": knnlm},
        prompts,
        new_tokens,
        gen_repeats,
    )
    print(
        f"generate: {gen_batch} prompts x {prompt_tokens} tokens, {new_tokens} new, greedy, KV cache; tokens/s "
        + ", ".join(f"{key} {tps:.1f}" for key, tps in gen.items()),
        flush=True,
    )
    print(f"knnlm_generate_ratio: {gen['base+knnlm_loop'] / gen['base_loop']:.3f}", flush=True)

    latency = model_latency(base, ids, len(tok), mixed, knnlm, repeats=repeats, warmup=1)
    print(
        f"batch: {batch} x {seq} tokens: seconds "
        + ", ".join(f"{key} {sec:.4f}" for key, sec in latency["seconds"].items()),
        flush=True,
    )
    memdec = latency["overhead"]["base+memdec"]
    knn = latency["overhead"]["base+knnlm"]
    goal_a = memdec <= 1 + flops_ratio + 0.10
    goal_b = (memdec - 1) <= (knn - 1) / 4
    print(f"goal_memdec_within_flops: {'met' if goal_a else 'missed'} ({memdec:.3f} <= {1 + flops_ratio + 0.10:.3f})")
    print(f"goal_quarter_of_knnlm: {'met' if goal_b else 'missed'} ({memdec - 1:.3f} <= {(knn - 1) / 4:.3f})")
    print(f"flops_ratio: {flops_ratio:.4f}")
    print(f"memdec_overhead: {memdec:.3f}")
    print(f"knnlm_overhead: {knn:.3f}")
    print(f"generate_ratio: {gen['base+memdec'] / gen['base']:.3f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
