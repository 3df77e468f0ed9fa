"""Router design, chosen on held-out valid text: which router should ``memdec fit-router`` train?

docs/results/router_goals.txt found the shipped router (one hidden layer of 64 over the base's last hidden state,
entropy and top log-prob) worse than the best fixed λ on contracts (+7.5 and +11.1 perplexity, intervals clear of
zero) although its mean λ matched the fixed one: per-token variation fitted on ~12k tokens of one contract did not
carry over to other contracts. This script trains, on exactly router_goals.py's data (domain valid + general valid,
the same windows), routers of lower capacity and one that also reads the decoder's certainty, and prints for each

* ``held_out_nll``: the mixed NLL on the held-out tenth of each valid kind (train_router's early-stopping data, the
  kinds weighted alike), **the selection criterion** (valid text only);
* the test figures router_goals.py prints (domain and general test, base / fixed λ / router, intervals), for the
  record: they are not used to choose.

Designs (``--designs``): ``mlp64`` (the shipped one), ``linear`` (no hidden layer: logistic in the features),
``mlp64_decoder`` (``mlp64`` plus the decoder's entropy and top log-prob: it can no longer skip the decoder).
Scored arrays are cached as .npz under ``--cache`` (no pickle), so a rerun only retrains routers.

    nice -n 10 python docs/results/router_design.py /work/runs/final-biomed /work/runs/final-law \
        --cache /work/runs/router-design > docs/results/router_design.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lightning_memdec.apps.router_training import RouterData, mixed_nll, train_router
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.hf.loading import find_tokenizer, load_causal_lm
from lightning_memdec.inference.router import base_features, base_forward, router_scorer
from lightning_memdec.inference.sliding_window import sliding_gold_log_probs
from lightning_memdec.kernels.scoring import gold_log_probs, mix_log_probs, perplexity, sweep_lambda

BASES = ("embedded:base-small", "embedded:base-large")
THRESHOLD = 0.05
WINDOW, STRIDE, BATCH = 256, 128, 8  # router_goals.py's
DESIGNS = {"mlp64": (64, False), "linear": (0, False), "mlp64_decoder": (64, True)}  # (width, decoder features)
TEXTS = ("domain-valid", "general-valid", "domain-test", "general-test")


def texts(run: Path) -> dict[str, str]:
    c = run / "corpora"
    return {"domain-valid": str(c / "domain-valid"), "general-valid": "embedded:general/valid",
            "domain-test": str(c / "domain-test"), "general-test": str(c / "general-test")}  # fmt: skip


def decoder_scorer(model, vocab: int):
    """The decoder's gold log-probs and its certainty (entropy, top log-prob: base_features' last two columns)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        log_probs, hidden, out = base_forward(model, input_ids, vocab, use_cache=False)
        return {
            "memdec": gold_log_probs(out.logits, labels, vocab),
            "certainty": base_features(hidden, log_probs)[..., -2:],
        }

    return score


def cached(path: Path, compute) -> dict[str, np.ndarray]:
    """``compute()``'s arrays, saved to / loaded from ``path`` (.npz, no pickle)."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def scored(model_ref, tokens: dict, vocab: int, scorer, path: Path) -> dict[str, dict[str, np.ndarray]]:
    def compute():
        model = load_causal_lm(model_ref).eval()
        score = scorer(model, vocab)
        out = {}
        for name, t in tokens.items():
            for key, arr in sliding_gold_log_probs(t, WINDOW, STRIDE, BATCH, score, desc=name).items():
                out[f"{name}/{key}"] = arr
        return out

    flat = cached(path, compute)
    return {name: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(name + "/")} for name in tokens}


def router_inputs(base: dict, dec: dict, with_decoder: bool) -> np.ndarray:
    return np.concatenate([base["features"], dec["certainty"]], 1) if with_decoder else base["features"]


def measure(tag: str, base: dict, dec: dict, offsets: dict) -> None:
    from router_goals import with_interval  # the same interval printing as router_goals.py

    lam, _ = sweep_lambda(base["domain-valid"]["base"], dec["domain-valid"]["memdec"])
    print(f"{tag} fixed_lambda (chosen on domain valid): {lam:g}")
    for design, (width, with_decoder) in DESIGNS.items():
        kinds = [
            RouterData(router_inputs(base[s], dec[s], with_decoder), base[s]["base"], dec[s]["memdec"])
            for s in ("domain-valid", "general-valid")
        ]
        router, info = train_router(kinds, width, THRESHOLD)
        held = [k.split()[1] for k in kinds]
        with torch.no_grad():
            nll = [
                mixed_nll(torch.as_tensor(h.base), torch.as_tensor(h.memdec), router(torch.as_tensor(h.features)))
                .double()
                .mean()
                .item()
                for h in held
            ]
        print(f"{tag} {design} epochs: {info['epochs']}, held_out_nll (kinds alike): {np.mean(nll):.4f} "
              f"(domain {nll[0]:.4f}, general {nll[1]:.4f})")  # fmt: skip
        for split in ("domain-test", "general-test"):
            b = torch.as_tensor(base[split]["base"], dtype=torch.float64)
            m = torch.as_tensor(dec[split]["memdec"], dtype=torch.float64)
            with torch.no_grad():
                routed = router.routed(torch.as_tensor(router_inputs(base[split], dec[split], with_decoder))).double()
            arrays = {"base": b.numpy(), "fixed_lambda": mix_log_probs(b, m, lam).numpy(),
                      "router": mix_log_probs(b, m, routed).numpy()}  # fmt: skip
            for key, text in with_interval(arrays, offsets[split]).items():
                if key.startswith("router") or design == "mlp64":  # base and fixed λ once per base
                    print(f"{tag} {design} {split} {key}: {text}")
            rise = perplexity(arrays["router"]) / perplexity(arrays["base"]) - 1
            print(f"{tag} {design} {split} router mean_lambda: {routed.mean():.3f}, vs base: {100 * rise:+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quickstart run directories")
    parser.add_argument("--cache", type=Path, required=True, help="directory for the scored arrays (.npz)")
    args = parser.parse_args()
    for run in args.runs:
        memdec_dir = run / "models" / "memdec"
        tok = find_tokenizer(str(memdec_dir))
        spec = texts(run)
        cap = len(text_tokens(spec["domain-valid"], tok))
        tokens = {name: text_tokens(s, tok, cap) for name, s in spec.items()}
        offsets = {
            s: split_document_offsets(spec[s], tokens[s], tok.eos_token_id) for s in ("domain-test", "general-test")
        }
        dec = scored(memdec_dir, tokens, len(tok), decoder_scorer, args.cache / run.name / "memdec.npz")
        for base_ref in BASES:
            name = base_ref.split(":")[-1]
            feats = lambda model, vocab: router_scorer(model, None, vocab, features=True)  # noqa: E731
            base = scored(base_ref, tokens, len(tok), feats, args.cache / run.name / f"{name}.npz")
            measure(f"{run.name} {name}", base, dec, offsets)


if __name__ == "__main__":
    main()
