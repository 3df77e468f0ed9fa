"""Benchmark: cross-vocabulary transfer of a Memory Decoder (tokenizer A = gpt2 → tokenizer B = gpt-neox-20b).

Run: ``python benchmarks/cross_vocab.py [--workdir /tmp/memdec_cross_vocab --memdec_steps 60 ...]``.
Prints ``name: number`` lines, the last being ``overlap_recovery``. Every stage writes under ``--workdir``
and is reused when rerun (the quickstart's own skip-finished-stages logic).

What is compared, all on the B domain (embedded biomed, tokenised with gpt-neox-20b):

1. Family A: ``quickstart(tokenizer="gpt2")`` at a small budget; its ``models/memdec`` is the source decoder
   (the small A base continued for S = ``memdec_steps`` steps on A's kNN targets).
2. Family B: ``quickstart(tokenizer="gpt-neox-20b")`` at the same budget gives the B corpora, the B bases
   (pretrained on the embedded general corpus), the B teacher and the B kNN targets (train and valid).
3. Three decoders, all trained on the same B targets with the same loss (beta), learning rate and batch:

   - ``full``: "trained from scratch on B with the full budget" read as: a decoder of exactly the
     transferred decoder's shape (the A decoder's config, B's vocabulary size), random init, no
     pretraining, trained for S steps;
   - ``overlap``: ``transfer_vocab(A decoder, "gpt-neox-20b", init="overlap")``, then round(0.1·S) steps;
   - ``random``: the same with ``init="random"`` (the paper's re-initialisation of embeddings and head).

   The quickstart's own B memdec (continued from the pretrained B small base for S steps) is printed too
   (``b_memdec_from_base_ppl``) as a stronger reference, but recovery is measured against ``full``.
4. Each decoder is scored with ``_gold`` on the B domain valid and test splits; λ is chosen per decoder and
   per base on valid (``sweep_lambda``) and the test perplexity of base + decoder at that λ is reported for
   the B small base (the headline) and the B large base (``large_*`` lines).

``recovery = (base_ppl − X_ppl) / (base_ppl − full_ppl)``: the share of the full-budget decoder's perplexity
gain that the 10%-budget transferred decoder recovers (> 1 means it beats ``full``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jsonargparse import CLI

from lightning_memdec.quickstart import SMALL_BASE, Budget, quickstart, train_model
from lightning_memdec.scoring import corpus_gold_log_probs
from lightning_memdec.vocab import transfer_vocab


def _recovery(base: float, x: float, full: float) -> float:
    gain = base - full
    return float("nan") if gain == 0 else (base - x) / gain


def main(
    workdir: Path = Path("/tmp/memdec_cross_vocab"),
    tokenizer_a: str = "gpt2",
    tokenizer_b: str = "gpt-neox-20b",
    general_tokens: int = 100_000,
    domain_tokens: int = 30_000,
    eval_tokens: int = 4_000,
    window: int = 64,
    batch_size: int = 8,
    base_steps: int = 40,
    teacher_steps: int = 20,
    memdec_steps: int = 60,
    k: int = 16,
    beta: float = 0.5,
    lr: float = 1e-3,
    budget_fraction: float = 0.1,
) -> None:
    """Train the A decoder, transfer it to B (overlap / random init) and compare with a full-budget B decoder.

    Args:
        workdir: run directory; finished stages are reused.
        tokenizer_a: tokenizer of the source family (the quickstart's).
        tokenizer_b: tokenizer of the target family.
        general_tokens: general-corpus tokens for pretraining the bases (both families).
        domain_tokens: domain train tokens (datastores, targets, decoder training).
        eval_tokens: tokens of each valid/test split scored.
        window: context length of every model and stage.
        batch_size: windows per training step.
        base_steps: pretraining steps of each base LM.
        teacher_steps: fine-tuning steps of each teacher.
        memdec_steps: S, the A decoder's budget and the full B decoder's budget.
        k: neighbours per position for the kNN targets.
        beta: KL weight of the Memory Decoder loss.
        lr: learning rate of the three B decoders (the quickstart's memdec rate).
        budget_fraction: steps of the transferred decoders as a fraction of S.
    """
    from lightning_memdec.scoring import mixed_perplexity, perplexity, sweep_lambda

    t0 = time.perf_counter()
    workdir = Path(workdir)
    sizes = dict(
        general_tokens=general_tokens,
        domain_tokens=domain_tokens,
        eval_tokens=eval_tokens,
        window=window,
        batch_size=batch_size,
        small_base_steps=base_steps,
        large_base_steps=base_steps,
        teacher_steps=teacher_steps,
        memdec_steps=memdec_steps,
        k=k,
        beta=beta,
    )
    budget = Budget(
        general_tokens,
        domain_tokens,
        eval_tokens,
        window,
        batch_size,
        base_steps,
        base_steps,
        teacher_steps,
        memdec_steps,
        k,
    )
    a, b = workdir / "a", workdir / "b"
    quickstart(out=a, tokenizer=tokenizer_a, **sizes)
    a_seconds = time.perf_counter() - t0
    quickstart(out=b, tokenizer=tokenizer_b, **sizes)
    b_seconds = time.perf_counter() - t0 - a_seconds

    a_decoder = a / "models" / "memdec"
    a_steps = json.loads((a_decoder / "meta.json").read_text())["global_step"]
    transfer_steps = max(1, round(budget_fraction * a_steps))
    c = b / "corpora"
    dt, dv = c / "domain-train", c / "domain-valid"
    tt, tv = b / "targets" / "train", b / "targets" / "valid"
    x = workdir / "x"

    moved = {}
    for init in ("overlap", "random"):
        out = x / "transferred" / init
        if not (out / "meta.json").is_file():
            transfer_vocab(str(a_decoder), tokenizer_b, out, init=init, seed=0)
        moved[init] = out
    cfg = json.loads((moved["overlap"] / "config.json").read_text())
    # same shape as the transferred decoders: the A decoder's architecture with B's vocabulary
    full_cfg = {**SMALL_BASE, **{f: cfg[f] for f in ("n_embd", "n_layer", "n_head", "vocab_size")}}
    coverage = json.loads((moved["overlap"] / "meta.json").read_text())["coverage"]

    t_train = time.perf_counter()
    decoders = {
        "full": train_model(
            "full", x, dt, dv, budget, a_steps, full_cfg, beta=beta, train_targets=tt, val_targets=tv, lr=lr
        ),
        "overlap": train_model(
            "overlap",
            x,
            dt,
            dv,
            budget,
            transfer_steps,
            str(moved["overlap"]),
            beta=beta,
            train_targets=tt,
            val_targets=tv,
            lr=lr,
        ),
        "random": train_model(
            "random",
            x,
            dt,
            dv,
            budget,
            transfer_steps,
            str(moved["random"]),
            beta=beta,
            train_targets=tt,
            val_targets=tv,
            lr=lr,
        ),
    }
    train_seconds = time.perf_counter() - t_train
    steps_done = {n: json.loads((d / "meta.json").read_text())["global_step"] for n, d in decoders.items()}

    sc = x / "scores"
    splits = ("domain-valid", "domain-test")
    gold = {
        n: {s: corpus_gold_log_probs(d, c / s, window, cache=sc / f"{n}-{s}.npy") for s in splits}
        for n, d in decoders.items()
    }
    b_memdec = b / "models" / "memdec"
    gold["b_memdec_from_base"] = {
        s: corpus_gold_log_probs(b_memdec, c / s, window, cache=b / "scores" / f"memdec-{s}.npy") for s in splits
    }
    results = {}
    for base in ("base-small", "base-large"):
        ref = b / "models" / base
        bl = {s: corpus_gold_log_probs(ref, c / s, window, cache=b / "scores" / f"{base}-{s}.npy") for s in splits}
        row = {"base": perplexity(bl["domain-test"])}
        for n, g in gold.items():
            lam, _ = sweep_lambda(bl["domain-valid"], g["domain-valid"])
            row[n] = mixed_perplexity(bl["domain-test"], g["domain-test"], lam)
            row[f"{n}_lambda"] = lam
        results[base] = row

    print(f"a_tokenizer: {tokenizer_a}")
    print(f"b_tokenizer: {tokenizer_b}")
    print(f"a_steps: {a_steps}")
    print(f"b_transfer_steps: {transfer_steps}")
    print(f"full_steps: {steps_done['full']}")
    print(f"coverage_copied: {coverage['copied_fraction']:.4f}")
    print(f"coverage_averaged: {coverage['averaged_fraction']:.4f}")
    print(f"coverage_fallback: {coverage['fallback_fraction']:.4f}")
    print(f"test_positions: {len(gold['full']['domain-test'])}")
    for n in ("full", "overlap", "random"):
        print(f"{n}_alone_ppl: {perplexity(gold[n]['domain-test']):.3f}")
    large = results["base-large"]
    print(f"large_base_ppl: {large['base']:.3f}")
    for n in ("full", "random", "overlap", "b_memdec_from_base"):
        print(f"large_{n}_ppl: {large[n]:.3f}")
    print(f"large_random_recovery: {_recovery(large['base'], large['random'], large['full']):.3f}")
    print(f"large_overlap_recovery: {_recovery(large['base'], large['overlap'], large['full']):.3f}")
    print(f"a_quickstart_seconds: {a_seconds:.1f}")
    print(f"b_quickstart_seconds: {b_seconds:.1f}")
    print(f"b_decoders_train_seconds: {train_seconds:.1f}")
    print(f"total_seconds: {time.perf_counter() - t0:.1f}")
    small = results["base-small"]
    print(f"b_memdec_from_base_ppl: {small['b_memdec_from_base']:.3f}")
    for n in ("full", "random", "overlap"):
        print(f"{n}_lambda: {small[n + '_lambda']:.2f}")
    print(f"base_ppl: {small['base']:.3f}")
    print(f"full_ppl: {small['full']:.3f}")
    print(f"random_ppl: {small['random']:.3f}")
    print(f"overlap_ppl: {small['overlap']:.3f}")
    print(f"random_recovery: {_recovery(small['base'], small['random'], small['full']):.3f}")
    print(f"overlap_recovery: {_recovery(small['base'], small['overlap'], small['full']):.3f}")


if __name__ == "__main__":
    CLI(main)
