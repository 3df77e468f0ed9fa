"""Benchmark: decoding latency of base + Memory Decoder vs base + kNN-LM as the datastore grows, on this machine's CPU.

Run: ``python benchmarks/latency.py --sizes [200000,1000000,4000000] --plot docs/img/latency-vs-datastore.png``
(those sizes are the default; ``--tiny true`` is a one-minute CPU run for CI). Random-init weights: timing depends on
shapes, not on what the models know.

What it builds, cached in ``--workdir`` (a second run skips building):

- a GPT-2-architecture base LM (512 d × 6 layers, 44.6M parameters per token) and a GPT-2-architecture decoder with
  about a tenth of its FLOPs per token, counted as 2 × (parameters used per token, LM head included;
  position-embedding lookups excluded);
- one kNN-LM datastore per size, keyed by the base's last-block MLP input (d = 512, fp16): the smallest from real text
  (``embedded:general/train`` through ``tokenize`` → ``build_datastore``), larger ones that real store plus synthetic
  entries (a real entry's key + Gaussian noise of ``--noise_scale`` × the real keys' per-dimension std, the entry's
  value copied; see ``latency_stores.py``): search cost depends on N, d and the index plan, not on what keys mean;
- one index per size from ``build_index(factory="auto")``: IVF with ~4·√N lists, PQ64, nprobe 32, as
  ``memdec build-index --plan.factory auto`` plans it. Only the k-means training sample is smaller than with the default
  8 GiB budget (``--index_memory_gb`` 0.625: 327k keys, 40 per list at 4M, 80 at 1M, all 200k at 200k) so that
  training fits the time budget; nlist, PQ and nprobe are auto's, and the recall each index reaches is printed.

What it times, per size: one greedy decoding step with KV caches (one new token for every sequence), the prompt's
processing excluded (generating 1 + n tokens minus generating 1, over n; medians of interleaved repeats; the prompt
pass would otherwise be a large, method-dependent share of a short large-batch run). **Batch 1** is one sequence: the
latency a user waits per generated token. **Large batch** is ``--large_batch`` sequences decoded together (serving
throughput: the models get matrix products, FAISS gets that many queries per call). MemDec's overhead is
``InterpolatedLM.generate`` over ``base.generate``; kNN-LM's is ``KNNLM.generate_greedy`` (one retrieval of k
neighbours per token, dense p_kNN, mix) over the same loop with λ = 0 (no retrieval), so each method is divided by the
base under its own decoding loop. ``search_ms`` is the FAISS search alone for that many queries (one call). The floor
of MemDec's overhead is 1 + FLOPs(decoder) / FLOPs(base): the decoder's extra work if it ran as efficiently as the base.

Prints ``name: value`` lines; per size ``size_{N}_memdec_overhead`` / ``size_{N}_knnlm_overhead`` (batch 1) and their
``large_batch`` twins, then ``flops_floor``, ``memdec_to_floor`` and, last, the headline
``knnlm_to_memdec_extra_cost`` = (knnlm_overhead − 1) / (memdec_overhead − 1) at batch 1 and the largest size.
"""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path

import torch
from common import report
from jsonargparse import CLI
from latency_stores import index_for, save_gpt2, stores_by_size

TINY = {"sizes": [2000, 8000], "n_embd": 64, "n_layer": 2, "decoder_embd": 16, "decoder_layers": 1, "k": 64,
        "large_batch": 4, "prompt_tokens": 8, "new_tokens": 4, "large_new_tokens": 2, "repeats": 1,
        "datastore_window": 64, "datastore_stride": 64}  # fmt: skip
GOAL = 4.0


def flops_per_token(model) -> int:
    """2 × parameters used per token: every weight matrix once (the tied LM head as the output projection)."""
    params = sum(p.numel() for p in model.parameters())
    lookups = sum(p.numel() for n, p in model.named_parameters() if n.endswith("wpe.weight"))
    return 2 * (params - lookups)


def index_settings(index) -> dict:
    """nlist, PQ bytes per code and nprobe of a loaded ``KeyIndex`` (0 for a Flat index), and its measured recall."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index.index)
        nlist, nprobe = int(ivf.nlist), int(ivf.nprobe)
        pq_m = int(faiss.downcast_index(ivf).pq.M) if hasattr(faiss.downcast_index(ivf), "pq") else 0
    except RuntimeError:
        nlist, nprobe, pq_m = 0, 0, 0
    recall = index.meta.get("recall") or {}
    return {"factory": index.meta["factory"], "nlist": nlist, "pq_m": pq_m, "nprobe": nprobe,
            "train": index.meta.get("train_size", 0), f"recall_at_{recall.get('k')}": recall.get("recall")}  # fmt: skip


def search_ms(knnlm, prompts: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one FAISS search of k neighbours for one query per row (the prompts' last keys)."""
    _, keys = knnlm.base_forward(prompts)
    queries = keys[:, -1].float().numpy()
    from lightning_memdec.evaluation.latency import median_times

    search = {"search": lambda: knnlm.key_index.search(queries, knnlm.k)}
    return 1000 * median_times(search, repeats=max(3, repeats), warmup=1)["search"]


def decoding_runners(models: dict, ids: torch.Tensor, new_tokens: int) -> dict:
    """Callables generating ``new_tokens`` greedily for every row (no early stop, KV caches on): Hugging Face
    ``generate`` for the base and ``InterpolatedLM``, ``KNNLM.generate_greedy`` for the kNN-LM loop."""
    from lightning_memdec.inference.knnlm import KNNLM

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  eos_token_id=None, pad_token_id=0)  # fmt: skip

    def runner(model):
        if isinstance(model, KNNLM):
            return lambda: model.generate_greedy(ids, new_tokens)
        return lambda: model.generate(ids, **kwargs)

    return {name: runner(model) for name, model in models.items()}


@torch.no_grad()
def step_ms(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Milliseconds per decoding step (one new token for every row), the prompt's processing excluded: the median
    time of generating 1 + ``new_tokens`` tokens minus that of generating 1, over ``new_tokens``. All runs of all
    models are interleaved, so a change in machine load hits each alike."""
    from lightning_memdec.evaluation.latency import median_times

    runners = {f"{name}/long": fn for name, fn in decoding_runners(models, ids, 1 + new_tokens).items()}
    runners.update({f"{name}/short": fn for name, fn in decoding_runners(models, ids, 1).items()})
    seconds = median_times(runners, repeats, warmup=1)
    return {name: 1000 * (seconds[f"{name}/long"] - seconds[f"{name}/short"]) / new_tokens for name in models}


def time_size(n: int, models: dict, store: Path, index: Path, prompts: dict, cfg: dict) -> dict:
    """Decoding overheads of base + MemDec and base + kNN-LM over this store, at batch 1 and the large batch."""
    from lightning_memdec.inference.knnlm import KNNLM
    from lightning_memdec.retrieval.faiss_index import KeyIndex

    base, mixed, tok = models["base"], models["mixed"], models["tokenizer"]
    key_index = KeyIndex(index)
    knn_args = dict(k=cfg["k"], temperature=cfg["temperature"], tokenizer=tok)
    knnlm = KNNLM(base, store, key_index, lmbda=cfg["lmbda"], **knn_args)
    knn_base = KNNLM(base, knnlm.store, key_index, lmbda=0.0, **knn_args)  # the same loop without retrieval
    out = {"settings": index_settings(key_index)}
    runners = {"base": base, "base+memdec": mixed, "base_loop": knn_base, "base+knnlm_loop": knnlm}
    for case, ids in prompts.items():
        new = cfg["new_tokens"] if case == "batch1" else cfg["large_new_tokens"]
        ms = step_ms(runners, ids, new, cfg["repeats"])
        out[case] = {
            "ms_per_step": ms,
            "memdec": ms["base+memdec"] / ms["base"],
            "knnlm": ms["base+knnlm_loop"] / ms["base_loop"],
            "search_ms": search_ms(knnlm, ids, cfg["repeats"]),
        }
    return out


def print_size(n: int, result: dict) -> None:
    for key, value in result["settings"].items():
        report(f"size_{n}_{key}", value)
    for case, prefix in (("batch1", ""), ("large_batch", "large_batch_")):
        r = result[case]
        steps = ", ".join(f"{name} {ms:.2f}" for name, ms in r["ms_per_step"].items())
        report(f"size_{n}_{prefix or 'batch1_'}ms_per_step", steps)
        report(f"size_{n}_{prefix}search_ms", r["search_ms"])
        report(f"size_{n}_{prefix}memdec_overhead", r["memdec"])
        report(f"size_{n}_{prefix}knnlm_overhead", r["knnlm"])


def extra_cost(knnlm: float, memdec: float) -> float:
    """(knnlm − 1) / (memdec − 1), as measured (negative if noise put MemDec under the base; inf at exactly 1)."""
    return (knnlm - 1) / (memdec - 1) if memdec != 1 else float("inf")


def plot_overheads(results: dict, floor: float, large_batch: int, path: Path, title: str) -> None:
    """Overhead vs datastore size (log x): both methods at batch 1 (solid) and the large batch (dashed), the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for case, style, label in (("batch1", "-o", "batch 1"), ("large_batch", "--s", f"batch {large_batch}")):
        for method, colour, name in (("knnlm", "tab:orange", "kNN-LM"), ("memdec", "tab:blue", "MemDec")):
            ys = [results[n][case][method] for n in sizes]
            ax.plot(sizes, ys, style, color=colour, label=f"base + {name}, {label}")
    ax.axhline(floor, color="grey", linestyle=":", label=f"MemDec floor 1 + FLOPs ratio = {floor:.3f}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("datastore entries (IVF-PQ planned by build-index --plan.factory auto)")
    ax.set_ylabel("time per generated token ÷ base's")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", flush=True)


def tiny_settings(settings: dict) -> dict:
    """--tiny's values for the settings left at their defaults: one given on the command line (--k 32) is kept."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(main).parameters.items()}
    return {name: value for name, value in TINY.items() if settings[name] == defaults[name]}


def main(
    workdir: Path = Path("/tmp/memdec-latency-bench"),
    sizes: list[int] = [200_000, 1_000_000, 4_000_000],  # noqa: B006  (jsonargparse reads the default)
    tiny: bool = False,
    n_embd: int = 512,
    n_layer: int = 6,
    decoder_embd: int = 88,
    decoder_layers: int = 2,
    datastore_window: int = 256,
    datastore_stride: int = 256,
    noise_scale: float = 0.25,
    index_memory_gb: float = 0.625,
    nprobe: int = 32,
    k: int = 1024,
    temperature: float = 16.0,
    lmbda: float = 0.25,
    large_batch: int = 32,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    large_new_tokens: int = 16,
    repeats: int = 7,
    seed: int = 0,
    plot: Path | None = None,
):
    """Time base + MemDec and base + kNN-LM decoding over datastores of several sizes (see the module docstring).

    Args:
        workdir: where models, datastores and indexes are built (and reused on the next run).
        sizes: datastore entries; the smallest is all real, the others add synthetic entries to it.
        tiny: small models, sizes 2,000 and 8,000, a few steps: a seconds-long CPU run for CI.
        n_embd: base hidden size (also the key dimension d).
        n_layer: base layers.
        decoder_embd: decoder hidden size.
        decoder_layers: decoder layers.
        datastore_window: context window used to compute the real keys.
        datastore_stride: stride of those windows (= window: each position computed once).
        noise_scale: synthetic keys' noise, in units of the real keys' per-dimension std.
        index_memory_gb: build_index's memory budget for the IVF training sample (refused if it would change nlist).
        nprobe: IVF lists visited per query (build-index's default, what auto plans with).
        k: kNN-LM neighbours per query (paper: 1024).
        temperature: kNN-LM temperature (paper: 16).
        lmbda: mixture weight (any value > 0 costs the same).
        large_batch: sequences decoded together in the large-batch case.
        prompt_tokens: prompt length.
        new_tokens: greedily generated tokens per batch-1 run (no early stop).
        large_new_tokens: generated tokens per large-batch run.
        repeats: timed repeats of each runner (median, interleaved).
        seed: weight initialisation and synthetic-key seed.
        plot: write the overhead-vs-size figure here (PNG).
    """
    settings = dict(locals())  # the arguments alone: taken before the imports below add names
    import faiss

    from lightning_memdec.evaluation.evaluate import text_tokens
    from lightning_memdec.hf.loading import load_causal_lm
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM
    from lightning_memdec.io.embedded import load_tokenizer

    cfg = settings | (tiny_settings(settings) if tiny else {})
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report("threads", f"torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}")
    base_dir = save_gpt2(workdir / f"base-{cfg['n_embd']}x{cfg['n_layer']}", cfg["n_embd"], cfg["n_layer"], 8, seed)
    dec_shape = (cfg["decoder_embd"], cfg["decoder_layers"])
    dec_dir = save_gpt2(workdir / "memdec-{}x{}".format(*dec_shape), *dec_shape, 4, seed + 1)
    window, stride = cfg["datastore_window"], cfg["datastore_stride"]
    stores = stores_by_size(workdir, base_dir, cfg["sizes"], window, stride, noise_scale, seed)
    indexes = {n: index_for(n, store, index_memory_gb, nprobe, seed) for n, store in stores.items()}
    report("build_seconds", time.perf_counter() - start)

    base = load_causal_lm(base_dir).eval()
    decoder = load_causal_lm(dec_dir).eval()
    tok = load_tokenizer(str(base_dir))
    models = {"base": base, "tokenizer": tok,
              "mixed": InterpolatedLM(base, decoder, lmbda, base_tokenizer=tok, memdec_tokenizer=tok)}  # fmt: skip
    b, p = cfg["large_batch"], cfg["prompt_tokens"]
    tokens = text_tokens("embedded:general/test", tok, max_tokens=(b + 1) * p)
    prompts = {"batch1": torch.as_tensor(tokens[:p][None]), "large_batch": torch.as_tensor(tokens[p:].reshape(b, p))}
    floor = 1 + flops_per_token(decoder) / flops_per_token(base)
    report("base", f"GPT-2 {cfg['n_embd']}d x {cfg['n_layer']} layers, {flops_per_token(base) / 2e6:.1f}M params/token")
    report("decoder", "GPT-2 {}d x {} layers, {:.2f}M params/token".format(*dec_shape, flops_per_token(decoder) / 2e6))
    report("knnlm", f"k {cfg['k']}, T {temperature}, lambda {lmbda}, keys d {cfg['n_embd']} fp16")
    steps = f"batch 1 over {cfg['new_tokens']} steps, batch {b} over {cfg['large_new_tokens']}"
    report("timing", f"ms per greedy step (KV caches, prompt of {p} excluded): {steps}; medians of {cfg['repeats']}")

    results = {}
    for n in sorted(stores):
        results[n] = time_size(n, models, stores[n], indexes[n], prompts, cfg)
        print_size(n, results[n])
    report("seconds_total", time.perf_counter() - start)
    if plot is not None:
        shapes = f"base {flops_per_token(base) / 2e6:.1f}M params/token; k {cfg['k']}"
        plot_overheads(results, floor, b, plot, f"CPU, {torch.get_num_threads()} threads; {shapes}")
    summary(results, floor)


def summary(results: dict, floor: float) -> None:
    """The floor, MemDec against it, and the kNN-LM/MemDec extra-cost ratios at the largest size (batch 1 last)."""
    largest = results[max(results)]
    report("flops_floor", floor)
    report("memdec_overhead_median_over_sizes", statistics.median(r["batch1"]["memdec"] for r in results.values()))
    report("large_batch_memdec_to_floor", largest["large_batch"]["memdec"] / floor)
    large = extra_cost(largest["large_batch"]["knnlm"], largest["large_batch"]["memdec"])
    report("knnlm_to_memdec_extra_cost_large_batch", large)
    report("memdec_to_floor", largest["batch1"]["memdec"] / floor)
    headline = extra_cost(largest["batch1"]["knnlm"], largest["batch1"]["memdec"])
    report("goal_extra_cost", f"{'met' if headline >= GOAL else 'missed'} ({headline:.2f} vs goal >= {GOAL:g})")
    report("knnlm_to_memdec_extra_cost", headline)


if __name__ == "__main__":
    CLI(main, as_positional=False)
