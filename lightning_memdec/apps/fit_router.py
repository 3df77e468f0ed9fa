"""``memdec fit-router``: fit a per-token λ for one base + Memory Decoder on held-out domain and general text.

The base and the decoder score both texts once over sliding windows (the windows of ``memdec evaluate``); the
router is then trained on those per-position arrays (:mod:`apps.router_training`) and published atomically as
a small artefact (:mod:`inference.router_artifact`). Use valid splits, never the test text it will be judged on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from lightning_memdec.apps.router_training import (
    RouterData,
    Routing,
    fit_within_general_budget,
    held_out_ppls,
    train_router,
)
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.evaluation.split_tokens import text_tokens
from lightning_memdec.hf.loading import (
    check_fits_context,
    context_length,
    find_tokenizer,
    load_causal_lm,
    model_config,
    torch_device,
)
from lightning_memdec.inference.interpolated_lm import mixture_vocab
from lightning_memdec.inference.router import Router, router_scorer
from lightning_memdec.inference.router_artifact import router_meta, save_router_weights
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.io.artifact_dirs import ArtifactError, check_writable_dir, publish, start_work_dir
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.tokenizer_identity import tokenizer_info
from lightning_memdec.kernels.scoring import mixed_perplexity, sweep_lambda

__all__ = ["fit_router", "held_out_summary", "text_positions"]

# No hidden layer (λ logistic in the standardised features): it beat one hidden layer of 64 on held-out valid text in
# all four cases of docs/results/router_fit_data.txt (the rule fixed before that run), and fits in seconds on CPU.
WIDTH = 0
BATCH_WINDOWS = 4
DEFAULT_WINDOW = 1024  # as memdec evaluate's (paper: 1024), unless the models' context is shorter


@exclusive_output
def fit_router(
    base: str,
    memdec: str,
    domain: str,
    general: str,
    out: Path,
    routing: Routing = Routing(),
    window: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Fit a learned per-token λ (a router) for a base + Memory Decoder; writes router.safetensors + meta.json.

    Args:
        base: the base LM (name, directory or embedded:base-small) whose hidden states the router reads.
        memdec: the trained Memory Decoder directory.
        domain: held-out domain text (a corpus directory, text file or embedded:<domain>/valid); not test text.
        general: held-out general text, same forms (e.g. embedded:general/valid).
        out: output directory.
        routing: the skip threshold and how much general perplexity may rise (the router kept).
        window: tokens of context per window (scored with stride window / 2, as ``memdec evaluate``); default:
            1024, or the models' context where it is shorter (the shipped bases: 512).
        max_tokens: use only the first this many tokens of each text.
        device: cpu, cuda, cuda:1, … or auto.
        overwrite: replace an existing ``out``.
    """
    threshold, general_tolerance = routing.threshold, routing.general_tolerance
    configs = [model_config(ref) for ref in (base, memdec)]
    if window is None:
        window = min([DEFAULT_WINDOW, *(c for c in map(context_length, configs) if c is not None)])
    if window < 2:  # one context token and one scored: refused before the models load, not after
        raise ValueError(f"--window must be 2 or more tokens, got {window}.")
    check_writable_dir(out, "--out")
    if Path(out).exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    for ref, config in zip((base, memdec), configs):
        check_fits_context(window, config, ref)
    tok = find_tokenizer(base)
    if tok is None:
        raise ValueError(f"--base {base} has no tokenizer saved with it; save its tokenizer into the directory.")
    texts = [text_tokens(spec, tok, max_tokens) for spec in (domain, general)]  # a missing text: before any model
    dev = torch_device(device)
    base_model, memdec_model = (load_causal_lm(ref).to(dev).eval() for ref in (base, memdec))
    vocab = mixture_vocab(base_model, memdec_model, tok, find_tokenizer(memdec, memdec_model))
    kinds = [text_positions(spec, tokens, tok.eos_token_id, (base_model, memdec_model), vocab, window)
             for spec, tokens in zip((domain, general), texts)]  # fmt: skip
    if general_tolerance is None:
        router, training = train_router(kinds, WIDTH, threshold)
    else:
        router, training = fit_within_general_budget(kinds, WIDTH, threshold, general_tolerance)
    settings = {"domain": str(domain), "general": str(general), "window": window, "max_tokens": max_tokens,
                "general_tolerance": general_tolerance}  # fmt: skip
    training |= settings | {"positions": {"domain": len(kinds[0].base), "general": len(kinds[1].base)},
                            "held_out": held_out_summary(router, kinds)}  # fmt: skip
    meta = router_meta(router, str(base), str(memdec), tokenizer_info(tok, str(base)), training)
    texts_used = {f"{kind}_tokens": tokens_sha256(tokens) for kind, tokens in zip(("domain", "general"), texts)}
    work = start_work_dir(out, {"base": meta["base"], "memdec": meta["memdec"], "threshold": threshold, **settings,
                                **texts_used}, overwrite)  # fmt: skip
    save_router_weights(router, work)
    return publish(work, out, meta)


def tokens_sha256(tokens: np.ndarray) -> str:
    """The token ids a text gave the router, hashed: its identity in the run settings, so a text changed at the same
    path (or spec) after a stop inside publish is another run, refused, not called done with the old text's router."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i8").tobytes()).hexdigest()[:16]


def text_positions(spec: str, tokens: np.ndarray, eos_id: int, models: tuple, vocab: int, window: int) -> RouterData:
    """One text's router features and both models' gold log-probs, per position, with its documents."""
    base, memdec = models
    window = min(window, len(tokens) - 1)
    stride = max(1, window // 2)
    features, decoder = router_scorer(base, None, vocab, features=True), lm_scorer(memdec, vocab, "memdec")
    scored = sliding_gold_log_probs(tokens, window, stride, BATCH_WINDOWS, features, "base features")
    decoded = sliding_gold_log_probs(tokens, window, stride, BATCH_WINDOWS, decoder, "memdec")
    offsets = split_document_offsets(spec, tokens, eos_id)
    return RouterData(scored["features"], scored["base"], decoded["memdec"], offsets)


@torch.no_grad()
def held_out_summary(router: Router, kinds: list[RouterData]) -> dict:
    """Per kind, on the held-out positions: perplexity of the base, of the best fixed λ (chosen on both kinds'
    held-out positions together), of the router, and the share of positions it skips. Selection figures: early
    stopping and the domain weight were chosen on these positions too; ``memdec evaluate`` compares on test."""
    held = [kind.split()[1] for kind in kinds]
    both = lambda attr: np.concatenate([getattr(h, attr) for h in held])  # noqa: E731
    best_lambda = sweep_lambda(both("base"), both("memdec"))[0]
    out: dict = {"best_fixed_lambda": best_lambda}
    for name, kind, h in zip(("domain", "general"), kinds, held):
        base, mem = torch.as_tensor(h.base, dtype=torch.float64), torch.as_tensor(h.memdec, dtype=torch.float64)
        lmbda = router.routed(torch.as_tensor(h.features)).double()
        out[name] = held_out_ppls(router, kind) | {
            "fixed_ppl": mixed_perplexity(base, mem, best_lambda),
            "router_skip_fraction": float((lmbda == 0).double().mean()),
        }
    return out
