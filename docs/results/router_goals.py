"""Issue 21's router goals, measured on the quickstart runs: per base, domain perplexity with the router ≤ the best
fixed λ's, and general perplexity with the router within 5 % of the base alone (de-duplicated test splits).

For each quickstart run whose decoder is trained (``models/memdec``) and each base: every text is scored once over
the quickstart's sliding windows (window 256, stride 128) — the decoder's gold log-probs (shared by the bases), the
base's gold log-probs and router features from one base pass — then a router is trained as ``memdec fit-router``
trains it (:func:`apps.router_training.train_router`, threshold 0.05) on the run's domain-valid split + general
valid text (``embedded:general/valid``, the same number of tokens), never on test text. On the run's domain-test
and general-test splits: the base alone, the best fixed λ (chosen on domain valid from the default grid, as the
quickstart chooses it) and the router, each with a 95 % bootstrap interval over documents (evaluation.intervals),
and the paired interval of router − fixed.

    nice -n 15 python docs/results/router_goals.py /work/runs/final-biomed /work/runs/final-law \
        > docs/results/router_goals.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lightning_memdec.apps.router_training import RouterData, train_router
from lightning_memdec.evaluation.intervals import bootstrap_perplexities, document_sums, interval
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.hf.loading import find_tokenizer, load_causal_lm
from lightning_memdec.inference.router import router_scorer
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity, sweep_lambda

BASES = ("embedded:base-small", "embedded:base-large")
THRESHOLD = 0.05
WINDOW, STRIDE, BATCH = 256, 128, 8
WIDTH = 64


def texts(run: Path) -> dict[str, str]:
    c = run / "corpora"
    return {"domain-valid": str(c / "domain-valid"), "general-valid": "embedded:general/valid",
            "domain-test": str(c / "domain-test"), "general-test": str(c / "general-test")}  # fmt: skip


def score_all(model, tokens: dict[str, np.ndarray], vocab: int, features: bool) -> dict[str, dict]:
    score = router_scorer(model, None, vocab, features=True) if features else lm_scorer(model, vocab, "memdec")
    return {name: sliding_gold_log_probs(t, WINDOW, STRIDE, BATCH, score, desc=name) for name, t in tokens.items()}


def with_interval(arrays: dict[str, np.ndarray], offsets: np.ndarray) -> dict[str, str]:
    keys = list(arrays)
    draws = bootstrap_perplexities([document_sums(arrays[k], offsets) for k in keys])
    out = {k: f"{perplexity(arrays[k]):.2f} {[round(x, 2) for x in interval(draws[i])]}" for i, k in enumerate(keys)}
    diff = perplexity(arrays["router"]) - perplexity(arrays["fixed_lambda"])
    paired = interval(draws[keys.index("router")] - draws[keys.index("fixed_lambda")])
    out["router - fixed_lambda (paired)"] = f"{diff:.2f} {[round(x, 2) for x in paired]}"
    return out


def measure(run: Path, base_ref: str, memdec: dict, tokens: dict, offsets: dict, vocab: int) -> None:
    tag = f"{run.name} {base_ref.split(':')[-1]}"
    base = load_causal_lm(base_ref).eval()
    scored = score_all(base, tokens, vocab, features=True)
    kinds = [RouterData(scored[s]["features"], scored[s]["base"], memdec[s]["memdec"]) for s in
             ("domain-valid", "general-valid")]  # fmt: skip
    router, info = train_router(kinds, WIDTH, THRESHOLD)
    lam, _ = sweep_lambda(scored["domain-valid"]["base"], memdec["domain-valid"]["memdec"])
    print(f"{tag} fixed_lambda (chosen on domain valid): {lam:g}")
    print(f"{tag} router epochs: {info['epochs']}, threshold: {THRESHOLD:g}")
    rows = {}
    for split in ("domain-test", "general-test"):
        b = torch.as_tensor(scored[split]["base"], dtype=torch.float64)
        m = torch.as_tensor(memdec[split]["memdec"], dtype=torch.float64)
        with torch.no_grad():
            routed = router.routed(torch.as_tensor(scored[split]["features"])).double()
        arrays = {"base": b.numpy(), "fixed_lambda": mix_log_probs(b, m, lam).numpy(),
                  "router": mix_log_probs(b, m, routed).numpy()}  # fmt: skip
        for key, text in with_interval(arrays, offsets[split]).items():
            print(f"{tag} {split} {key}: {text}")
        print(
            f"{tag} {split} router mean_lambda: {routed.mean():.3f}, skipped share: {(routed == 0).double().mean():.3f}"
        )
        rows[split] = {k: perplexity(v) for k, v in arrays.items()}
    d, g = rows["domain-test"], rows["general-test"]
    rise = g["router"] / g["base"] - 1
    fixed_rise = g["fixed_lambda"] / g["base"] - 1
    print(f"{tag} general-test router vs base: {100 * rise:+.1f} % (fixed λ: {100 * fixed_rise:+.1f} %)")
    print(f"{tag} goal domain router <= fixed λ: {d['router'] <= d['fixed_lambda']}")
    print(f"{tag} goal general within 5 % of base: {rise <= 0.05}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quickstart run directories")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "models" / "memdec" / "meta.json").is_file():
            print(f"{run.name}: no trained decoder yet (models/memdec), skipped", flush=True)
            continue
        memdec_model = load_causal_lm(run / "models" / "memdec").eval()
        tok = find_tokenizer(str(run / "models" / "memdec"), memdec_model)
        spec = texts(run)
        cap = len(text_tokens(spec["domain-valid"], tok))
        tokens = {name: text_tokens(s, tok, cap) for name, s in spec.items()}
        offsets = {
            s: split_document_offsets(spec[s], tokens[s], tok.eos_token_id) for s in ("domain-test", "general-test")
        }
        memdec = score_all(memdec_model, tokens, len(tok), features=False)
        for name, t in tokens.items():
            print(f"{run.name} {name}: {len(t)} tokens ({spec[name]})")
        for base in BASES:
            measure(run, base, memdec, tokens, offsets, len(tok))


if __name__ == "__main__":
    main()
