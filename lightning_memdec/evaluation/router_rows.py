"""The router's part of ``memdec evaluate``: the base a ``--mix.router`` belongs to, its columns in that base's row."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_memdec.hf.loading import find_tokenizer, model_identity, tokenizer_name
from lightning_memdec.inference.router_artifact import load_router
from lightning_memdec.io.artifact_dirs import ArtifactError, read_meta
from lightning_memdec.io.tokenizer_identity import tokenizer_info
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

__all__ = ["router_by_base", "router_columns"]


def router_by_base(router: str | None, memdec: str | None, models) -> dict:
    """``{base ref: Router}`` for the one base the router was fitted for, checked against it, --memdec and their
    tokenizer before any scoring; refused when no base (or no --memdec) is its."""
    if router is None:
        return {}
    if memdec is None:
        raise ValueError("--mix.router weighs the Memory Decoder per token: pass the --memdec it was fitted for.")
    recorded = read_meta(router, kind="router")["base"]
    for ref in (ref for ref, _, role in models if role == "base"):
        if model_identity(ref)["model_sha256"] == recorded.get("model_sha256"):
            tok = find_tokenizer(ref)
            fingerprint = None if tok is None else tokenizer_info(tok, tokenizer_name(tok))["fingerprint"]
            return {ref: load_router(router, ref, memdec, fingerprint)}
    raise ArtifactError(
        f"the router {router} was fitted for base {recorded.get('name')} (sha {recorded.get('model_sha256')}), which "
        "is none of --bases; add that base, or fit a router for these with `memdec fit-router`."
    )


def router_columns(test: dict[str, np.ndarray]) -> dict[str, Any]:
    """The decoder mixed at the router's per-position λ: its perplexity, mean λ and the share of skipped positions."""
    if "router_lambda" not in test or "memdec" not in test:
        return {}
    lam = torch.as_tensor(test["router_lambda"], dtype=torch.float64)
    as64 = lambda key: torch.as_tensor(test[key], dtype=torch.float64)  # noqa: E731
    return {
        "router_ppl": perplexity(mix_log_probs(as64("base"), as64("memdec"), lam)),
        "router_mean_lambda": float(lam.mean()),
        "router_skip_fraction": float((lam == 0).double().mean()),
    }
