"""Benchmark: cross-vocabulary transfer of a Memory Decoder (family A = gpt2 tokenizer → family B = gpt-neox-20b).

Run: ``python benchmarks/cross_vocab.py [--workdir /tmp/memdec_cross_vocab ...]``. Prints ``name: number`` lines,
``own_short_recovery``, ``random_recovery``, then ``overlap_recovery`` last. Every stage is reused when rerun.

The two families are built the same way, at the same budget, by ``quickstart(pretrain_bases=True)`` with each
tokenizer: small and large bases pretrained from scratch on the embedded general corpus, a teacher (the large base
fine-tuned on the embedded biomedical domain), its kNN targets, and a Memory Decoder trained from the family's own
small base for S steps. Then, all on family B's targets with the same loss, learning rate and batch:

- **reference**: B's own decoder (from B's small base, the full budget S): what training in B's vocabulary gives;
- **overlap**: A's decoder moved to B's vocabulary (``transfer_vocab(init="overlap")``), trained 10 % of S;
- **random**: the same with ``init="random"`` (the paper's re-initialised embeddings and head), 10 % of S;
- **own_short**: B's own decoder from B's small base, 10 % of S: what the transfer's budget buys without a source
  decoder (the control a transfer must beat to be worth its source).

Each decoder is mixed with each of B's bases at the λ chosen on the domain valid split;
``recovery = (base − transferred) / (base − reference)`` on the domain test split: the share of the reference
decoder's perplexity gain the transferred one reaches with a tenth of the budget (goal: overlap ≥ 0.8 and above
random and own_short). The printed recoveries are the mean over B's bases; per-base lines come first.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from jsonargparse import CLI

from lightning_memdec.apps.quickstart import quickstart, train_model
from lightning_memdec.apps.quickstart_stages import Budget, gold_log_probs
from lightning_memdec.kernels.scoring import mixed_perplexity, perplexity, sweep_lambda
from lightning_memdec.training.vocab_transfer import transfer_vocab

SPLITS = ("domain-valid", "domain-test")


def recovery(base: float, transferred: float, reference: float) -> float:
    gain = base - reference
    return float("nan") if gain == 0 else (base - transferred) / gain


def family(out: Path, tokenizer: str, sizes: dict) -> Path:
    """One family's quickstart run (bases, teacher, targets, its own decoder); reused when finished."""
    if not (out / "report.json").is_file():
        quickstart(out=out, tokenizer=tokenizer, pretrain_bases=True, budget=Budget(**sizes))
    return out


def main(
    workdir: Path = Path("/tmp/memdec_cross_vocab"),
    tokenizer_a: str = "gpt2",
    tokenizer_b: str = "gpt-neox-20b",
    general_tokens: int = 200_000,
    domain_tokens: int = 60_000,
    eval_tokens: int = 6_000,
    window: int = 128,
    batch_size: int = 8,
    base_steps: int = 200,
    teacher_steps: int = 40,
    memdec_steps: int = 200,
    k: int = 64,
    budget_fraction: float = 0.1,
) -> None:
    """Train family A's and B's decoders, move A's to B (overlap / random init, 10 % budget), compare on B's bases.

    Args:
        workdir: run directory; finished stages are reused.
        tokenizer_a: tokenizer of the source family.
        tokenizer_b: tokenizer of the target family.
        general_tokens: general-corpus tokens for pretraining each family's bases.
        domain_tokens: domain train tokens (datastores, targets, decoder training).
        eval_tokens: tokens of each valid/test split scored (the quickstart's valid_tokens and test_tokens).
        window: context length of every model and stage.
        batch_size: windows per training step.
        base_steps: pretraining steps of each base LM.
        teacher_steps: fine-tuning steps of each teacher.
        memdec_steps: S, the budget of each family's own decoder (the reference in B).
        budget_fraction: steps of the transferred decoders as a fraction of S.
    """
    stdout = sys.stdout  # the `name: number` lines alone: the stages' reports and progress bars go to stderr

    def emit(line: str) -> None:
        print(line, file=stdout, flush=True)

    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        w = Path(workdir)
        sizes = {
            "general_tokens": general_tokens, "domain_tokens": domain_tokens, "valid_tokens": eval_tokens,
            "test_tokens": eval_tokens,
            "window": window, "batch_size": batch_size, "small_base_steps": base_steps, "large_base_steps": base_steps,
            "teacher_steps": teacher_steps, "memdec_steps": memdec_steps, "k": k,
        }  # fmt: skip
        a, b = family(w / "a", tokenizer_a, sizes), family(w / "b", tokenizer_b, sizes)
        report_b = json.loads((b / "report.json").read_text())
        a_decoder = a / "models" / "memdec"
        steps = json.loads((a_decoder / "meta.json").read_text())["global_step"]
        transfer_steps = max(1, round(budget_fraction * steps))
        budget = Budget(**{key: v for key, v in sizes.items() if key not in ("small_base_steps", "large_base_steps")})
        corpora = b / "corpora"
        targets = (b / "targets" / "train", b / "targets" / "valid")
        decoders = {"reference": b / "models" / "memdec"}
        x = w / "transfer"
        data = (corpora / "domain-train", corpora / "domain-valid", budget)
        lr = report_b["run"]["budget"]["decoder_lr"]  # the reference decoder's learning rate
        starts = {"own_short": b / "models" / "base-small"}  # the reference's own start
        for init in ("random", "overlap"):
            starts[init] = x / "moved" / init
            if not (starts[init] / "meta.json").is_file():
                transfer_vocab(str(a_decoder), tokenizer_b, starts[init], init=init, seed=0)
        for name, start in starts.items():
            decoders[name] = train_model(name, x, *data, transfer_steps, str(start), 0.5, targets, lr=lr)
        coverage = json.loads((x / "moved" / "overlap" / "meta.json").read_text())["coverage"]

        def gold(model: Path, split: str, name: str):
            return gold_log_probs(model, corpora / split, budget, x / "scores" / f"{name}-{split}.npy")

        scores = {name: {s: gold(d, s, name) for s in SPLITS} for name, d in decoders.items()}
        recoveries: dict[str, list[float]] = {"own_short": [], "random": [], "overlap": []}
        emit(f"transfer: {tokenizer_a} -> {tokenizer_b}")
        emit(f"reference_steps: {steps}")
        emit(f"transfer_steps: {transfer_steps}")
        emit(f"coverage_copied: {coverage['copied_fraction']:.4f}")
        for base in ("base-small", "base-large"):
            base_lp = {s: gold(b / "models" / base, s, base) for s in SPLITS}
            base_ppl = perplexity(base_lp["domain-test"])
            mixed = {}
            for name, lp in scores.items():
                lam, _ = sweep_lambda(base_lp["domain-valid"], lp["domain-valid"])
                mixed[name] = mixed_perplexity(base_lp["domain-test"], lp["domain-test"], lam)
                emit(f"{base}_{name}_lambda: {lam:g}")
            emit(f"{base}_ppl: {base_ppl:.2f}")
            for name, ppl in mixed.items():
                emit(f"{base}_{name}_ppl: {ppl:.2f}")
            for init in recoveries:
                r = recovery(base_ppl, mixed[init], mixed["reference"])
                recoveries[init].append(r)
                emit(f"{base}_{init}_recovery: {r:.3f}")
        emit(f"seconds: {time.perf_counter() - t0:.0f}")
        for name, values in recoveries.items():  # the headline, overlap, last
            emit(f"{name}_recovery: {sum(values) / len(values):.3f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
