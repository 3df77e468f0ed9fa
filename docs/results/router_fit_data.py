"""Router fitting data: 12k tokens of valid text (one stretch, router_goals.py's) against 100k (many documents).

router_design.txt found every router design behind the best fixed λ on contracts, and traced it to the data the
router is fitted and stopped on: 12k tokens of domain valid are one or two contracts, and the held-out tenth was the
end of one of them. ``memdec fit-router`` now holds out whole documents (apps.router_training); this script measures
what that and more valid text change. For each quickstart run and base, on exactly the same test text:

* ``valid 12k``: router (and the fixed λ) fitted / chosen on the run's 12k-token domain valid corpus + 12k tokens of
  general valid (router_goals.py's data);
* ``valid 100k``: the first 100k tokens of the domain's valid split + of general valid, so the fixed λ gets the
  same larger valid text as the router (a fair baseline).

Designs: ``mlp64`` (the shipped router) and ``linear`` (``Router(width=0)``); the rule, fixed before the run, picks
between them by held-out valid NLL (whole held-out documents, the kinds weighted alike) at 100k. Test: the run's
domain test corpus (100k tokens) and the first 100k tokens of ``embedded:general/test``, each perplexity with a 95 %
bootstrap interval over documents, router − fixed λ paired. Scored arrays are cached as .npz (no pickle).

    nice -n 10 python docs/results/router_fit_data.py /work/runs/final-biomed /work/runs/final-law \
        --cache /work/runs/router-fit-data > docs/results/router_fit_data.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lightning_memdec.apps.router_training import RouterData, mixed_nll, train_router
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.hf.loading import find_tokenizer
from lightning_memdec.inference.router import router_scorer
from lightning_memdec.inference.sliding_window import lm_scorer
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity, sweep_lambda

sys.path.insert(0, str(Path(__file__).parent))
from router_design import scored  # noqa: E402  (the same windows and .npz cache)
from router_goals import BASES, THRESHOLD, with_interval  # noqa: E402

DESIGNS = {"mlp64": 64, "linear": 0}
FITS = {"valid 12k": ("domain-valid-12k", "general-valid-12k"), "valid 100k": ("domain-valid", "general-valid")}
TOKENS = 100_000


def texts(run: Path) -> dict[str, tuple[str, int | None]]:
    """Each text's spec and token cap (None: the whole corpus)."""
    domain = json.loads((run / "report.json").read_text())["run"]["domain"]  # the domain the quickstart resolved
    valid = f"{domain}/valid" if domain.startswith("embedded:") else str(Path(domain) / "valid.txt")
    corpora = run / "corpora"
    return {
        "domain-valid-12k": (str(corpora / "domain-valid"), None),
        "general-valid-12k": ("embedded:general/valid", None),  # capped below to the domain corpus's length
        "domain-valid": (valid, TOKENS),
        "general-valid": ("embedded:general/valid", TOKENS),
        "domain-test": (str(corpora / "domain-test"), None),
        "general-test": ("embedded:general/test", TOKENS),
    }


def held_out_nll(router, kinds: list[RouterData]) -> float:
    """Mixed NLL on each kind's held-out documents, the kinds weighted alike (train_router's early-stopping data)."""
    with torch.no_grad():
        return float(np.mean([
            mixed_nll(torch.as_tensor(h.base), torch.as_tensor(h.memdec), router(torch.as_tensor(h.features)))
            .double().mean().item() for h in (k.split()[1] for k in kinds)
        ]))  # fmt: skip


def measure(tag: str, base: dict, dec: dict, offsets: dict) -> None:
    for fit, (domain, general) in FITS.items():
        lam, _ = sweep_lambda(base[domain]["base"], dec[domain]["memdec"])
        kinds = [
            RouterData(base[s]["features"], base[s]["base"], dec[s]["memdec"], offsets[s]) for s in (domain, general)
        ]
        print(f"{tag} [{fit}] fixed_lambda (chosen on domain valid): {lam:g}; positions {[len(k.base) for k in kinds]}")
        for design, width in DESIGNS.items():
            router, info = train_router(kinds, width, THRESHOLD)
            print(f"{tag} [{fit}] {design} epochs: {info['epochs']}, held-out documents "
                  f"{info['held_out_documents']} ({info['held_out_positions']} positions), "
                  f"held_out_nll: {held_out_nll(router, kinds):.4f}")  # fmt: skip
            for split in ("domain-test", "general-test"):
                b = torch.as_tensor(base[split]["base"], dtype=torch.float64)
                m = torch.as_tensor(dec[split]["memdec"], dtype=torch.float64)
                with torch.no_grad():
                    routed = router.routed(torch.as_tensor(base[split]["features"])).double()
                arrays = {"base": b.numpy(), "fixed_lambda": mix_log_probs(b, m, lam).numpy(),
                          "router": mix_log_probs(b, m, routed).numpy()}  # fmt: skip
                for key, text in with_interval(arrays, offsets[split]).items():
                    if key.startswith("router") or design == "mlp64":  # base and fixed λ once per fit
                        print(f"{tag} [{fit}] {design} {split} {key}: {text}")
                rise = perplexity(arrays["router"]) / perplexity(arrays["base"]) - 1
                print(f"{tag} [{fit}] {design} {split} router mean_lambda: {routed.mean():.3f}, "
                      f"vs base: {100 * rise:+.1f} %", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quickstart run directories")
    parser.add_argument("--cache", type=Path, required=True, help="directory for the scored arrays (.npz)")
    args = parser.parse_args()
    for run in args.runs:
        memdec_dir = run / "models" / "memdec"
        tok = find_tokenizer(str(memdec_dir))
        spec = texts(run)
        short = len(text_tokens(spec["domain-valid-12k"][0], tok))
        caps = {name: cap if name != "general-valid-12k" else short for name, (_, cap) in spec.items()}
        tokens = {name: text_tokens(s, tok, caps[name]) for name, (s, _) in spec.items()}
        offsets = {name: split_document_offsets(s, tokens[name], tok.eos_token_id) for name, (s, _) in spec.items()}
        for name, t in tokens.items():
            print(f"{run.name} {name}: {len(t)} tokens, {len(offsets[name]) - 1} documents ({spec[name][0]})")
        memdec_scorer = lambda model, vocab: lm_scorer(model, vocab, "memdec")  # noqa: E731
        dec = scored(memdec_dir, tokens, len(tok), memdec_scorer, args.cache / run.name / "memdec.npz")
        for base_ref in BASES:
            name = base_ref.split(":")[-1]
            feats = lambda model, vocab: router_scorer(model, None, vocab, features=True)  # noqa: E731
            base = scored(base_ref, tokens, len(tok), feats, args.cache / run.name / f"{name}.npz")
            measure(f"{run.name} {name}", base, dec, offsets)


if __name__ == "__main__":
    main()
