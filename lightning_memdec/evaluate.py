"""Evaluation: sliding-window perplexity of base LMs alone, + Memory Decoder, + kNN-LM; λ sweeps; latency.

Every scorer is run once per split and kept as per-position log-probabilities of the gold next token
(``log p(x_{i+1} | x_{≤i})`` for each position ``i``; see :mod:`lightning_memdec.scoring`). Mixtures at any λ are
computed from those arrays, so a λ sweep costs no extra model call, and the decoder's array is shared by every base
of the same tokenizer (cross-model evaluation). The report is written by :mod:`lightning_memdec.report`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_memdec.artifacts import check_same_tokenizer, describe_tokenizer, tokenizer_info
from lightning_memdec.assets import load_tokenizer, read_documents, resolve_text
from lightning_memdec.corpus import Corpus, encode_documents
from lightning_memdec.interpolate import InterpolatedLM
from lightning_memdec.knnlm import KNNLM, knnlm_scorer
from lightning_memdec.models import find_tokenizer, load_causal_lm, tokenizer_name
from lightning_memdec.report import write_report
from lightning_memdec.scoring import (
    DEFAULT_LAMBDA_GRID,
    check_lambda_grid,
    check_lmbda,
    lm_scorer,
    mixed_perplexity,
    perplexity,
    sliding_gold_log_probs,
    sweep_lambda,
)
from lightning_memdec.timing import model_latency

__all__ = ["evaluate", "text_tokens"]


# -- text -> tokens ----------------------------------------------------------------------------------------------------


def text_tokens(spec: str | Path, tokenizer, max_tokens: int | None = None, batch_documents: int = 256) -> np.ndarray:
    """Token ids of a corpus directory, a text file or ``embedded:<domain>/<split>``, as ``memdec tokenize`` makes them.

    Text is tokenized on the fly: documents (blank-line separated) each followed by EOS, capped at ``max_tokens``.
    A corpus directory must have been tokenized with ``tokenizer``.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (one scored position), got {max_tokens}.")
    info = tokenizer_info(tokenizer, tokenizer_name(tokenizer))
    path = Path(str(spec))
    if path.is_dir():
        corpus = Corpus(path)
        check_same_tokenizer(corpus.tokenizer, f"corpus {path}", info, "the base LM")
        tokens = np.asarray(corpus.tokens[:max_tokens], dtype=np.int64)
    else:
        docs = read_documents(resolve_text(spec))
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {describe_tokenizer(info)} has no EOS token to separate documents.")
        pieces = encode_documents(docs, tokenizer, max_tokens, batch_documents)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(tokens) < 2:
        raise ValueError(f"{spec} holds no text to score (fewer than 2 tokens); give a non-empty text or corpus.")
    return tokens


# -- scoring helpers ---------------------------------------------------------------------------------------------------


def _check_context(model, window: int, what: str) -> None:
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos is not None and window > max_pos:
        raise ValueError(f"window {window} exceeds the {max_pos} positions of {what}; lower --window (and --stride).")


# -- the stage ---------------------------------------------------------------------------------------------------------


def evaluate(
    bases: list[str],
    test: str,
    out: Path,
    memdec: str | None = None,
    valid: str | None = None,
    datastore: str | None = None,
    index: str | None = None,
    k: int = 1024,
    temperature: float = 16.0,
    exact_distances: bool = False,
    nprobe: int | None = None,
    lmbda: float | None = None,
    knn_lmbda: float | None = None,
    lambda_grid: list[float] | None = None,
    window: int = 1024,
    stride: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    latency: bool = False,
    latency_repeats: int = 5,
) -> dict[str, Any]:
    """Perplexity of each base LM alone, with the Memory Decoder, and with kNN-LM; writes report.md/json and a λ plot.

    Long mostly by its signature and Args (one per ``memdec evaluate`` flag); the body is the loop over bases.

    Args:
        bases: base LMs (names or directories); several = cross-model evaluation of one decoder.
        test: test text: a corpus directory, a text file, or embedded:<domain>/<split>.
        out: output directory for report.md, report.json and lambda_curve.png.
        memdec: the Memory Decoder (directory or name); omitted: no MemDec columns.
        valid: validation text (same forms as test), for choosing λ by a sweep when it is not given.
        datastore: datastore directory for the kNN-LM rows (with index); used with the base that built it.
        index: index directory over that datastore.
        k: kNN-LM neighbours per query (paper: 1024).
        temperature: kNN-LM softmax temperature over squared L2 distances (paper: 16).
        exact_distances: recompute exact distances from the stored keys (IVF-PQ distances are approximate).
        nprobe: IVF lists visited per query (default: the index's).
        lmbda: the decoder's weight λ; omitted: chosen per base on valid by a sweep over lambda_grid.
        knn_lmbda: kNN-LM's λ; omitted: chosen on valid, or lmbda when there is no valid split.
        lambda_grid: candidate λs for the sweep (default 0.05, 0.10, …, 0.95).
        window: tokens of context per window (paper: 1024).
        stride: new positions scored per window (paper: 512); each has >= window - stride + 1 tokens of context.
        batch_size: windows per forward pass.
        max_tokens: score only the first this many tokens of each split.
        tokenizer: tokenizer for bases whose directory has none.
        device: cpu, cuda, cuda:1, … or auto (cuda when available).
        latency: also time one forward pass of base / +MemDec / +kNN-LM on the first test batch (first base).
        latency_repeats: timed repeats (median reported).
    """
    bases = [bases] if isinstance(bases, str) else list(bases)
    names = _base_names(bases)
    lmbda, knn_lmbda = _checked_lambdas(memdec, valid, datastore, index, lmbda, knn_lmbda)
    grid = check_lambda_grid(DEFAULT_LAMBDA_GRID if lambda_grid is None else lambda_grid)
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}.")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    knn_base = _datastore_base(datastore, bases) if datastore is not None else None
    splits = {"test": test, **({"valid": valid} if valid is not None else {})}

    decoder = decoder_tok = None
    if memdec is not None:
        decoder = load_causal_lm(memdec).to(dev).eval()
        decoder_tok = find_tokenizer(memdec, decoder)
        _check_context(decoder, window, f"the Memory Decoder {memdec}")
    token_cache: dict[tuple[str, str], np.ndarray] = {}
    decoder_cache: dict[tuple[str, str], np.ndarray] = {}
    rows, curves, positions, latency_report = [], {}, {}, None
    for base_ref, name in zip(bases, names):
        base = load_causal_lm(base_ref).to(dev).eval()
        _check_context(base, window, f"base {base_ref}")
        tok = load_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(base_ref, base)
        if tok is None:
            raise ValueError(f"base {base_ref} has no tokenizer in its directory; pass --tokenizer NAME_OR_DIR.")
        fp = tokenizer_info(tok, tokenizer_name(tok))["fingerprint"]
        vocab = len(tok)
        mixed = None
        if decoder is not None:  # refuses a decoder of another tokenizer, naming both
            mixed = InterpolatedLM(
                base, decoder, 0.5 if lmbda is None else lmbda, base_tokenizer=tok, memdec_tokenizer=decoder_tok or tok
            )
        knnlm = None
        if base_ref == knn_base:
            knnlm = KNNLM(
                base,
                datastore,
                index,
                k=k,
                temperature=temperature,
                lmbda=0.25 if knn_lmbda is None else knn_lmbda,
                exact_distances=exact_distances,
                tokenizer=tok,
                nprobe=nprobe,
            )
        lp: dict[str, dict[str, np.ndarray]] = {}
        for split, spec in splits.items():
            if (fp, split) not in token_cache:
                token_cache[fp, split] = text_tokens(spec, tok, max_tokens)
            tokens = token_cache[fp, split]
            positions.setdefault(split, int(len(tokens) - 1))
            if knnlm is not None:
                _warn_if_datastore_text(tokens, knnlm.store.meta, split, spec)
            score = knnlm_scorer(knnlm) if knnlm is not None else lm_scorer(base, vocab, "base")
            lp[split] = sliding_gold_log_probs(tokens, window, stride, batch_size, score, desc=f"{name} {split}")
            if decoder is not None:
                if (fp, split) not in decoder_cache:
                    decoder_cache[fp, split] = sliding_gold_log_probs(
                        tokens, window, stride, batch_size, lm_scorer(decoder, vocab, "memdec"), desc=f"memdec {split}"
                    )["memdec"]
                lp[split]["memdec"] = decoder_cache[fp, split]
        rows.append(_row(name, base_ref, lp, lmbda, knn_lmbda, grid))
        curves[name] = _curve(lp, grid)
        if latency and latency_report is None:
            latency_report = _first_batch_latency(
                name,
                base,
                token_cache[fp, "test"],
                window,
                batch_size,
                vocab,
                mixed,
                knnlm,
                rows[-1],
                latency_repeats,
                dev,
            )
        del base, mixed, knnlm
    report = {
        "bases": bases,
        "memdec": memdec,
        "test": test,
        "valid": valid,
        "datastore": datastore,
        "index": index,
        "k": k if datastore else None,
        "temperature": temperature if datastore else None,
        "window": window,
        "stride": stride,
        "max_tokens": max_tokens,
        "positions": positions,
        "lambda_grid": grid,
        "rows": rows,
        "curves": curves,
        "latency": latency_report,
    }
    write_report(report, Path(out))
    return report


def _base_names(bases: list[str]) -> list[str]:
    """Report names of the bases (last path components), which must tell them apart."""
    if not bases:
        raise ValueError("no base LM given; pass --bases NAME_OR_DIR (several for cross-model evaluation).")
    names = [_short_name(b) for b in bases]
    if len(set(names)) != len(names):
        raise ValueError(f"bases must have distinct names (last path components), got {names}.")
    return names


def _checked_lambdas(memdec, valid, datastore, index, lmbda, knn_lmbda) -> tuple[float | None, float | None]:
    """The decoder's and kNN-LM's λ (None: swept on valid); refuses settings that leave a λ unknowable."""
    if (datastore is None) != (index is None):
        raise ValueError("kNN-LM needs both --datastore and --index (or neither).")
    lmbda = None if lmbda is None else check_lmbda(lmbda)
    knn_lmbda = None if knn_lmbda is None else check_lmbda(knn_lmbda)
    if knn_lmbda is None and valid is None:
        knn_lmbda = lmbda
    if valid is None and ((memdec is not None and lmbda is None) or (datastore is not None and knn_lmbda is None)):
        raise ValueError(
            "λ is neither given nor choosable: pass --lmbda (and --knn_lmbda), or --valid to sweep λ on it."
        )
    return lmbda, knn_lmbda


def _first_batch_latency(name, base, tokens, window, batch_size, vocab, mixed, knnlm, row, repeats, device):
    """Forward-pass latency of base / + MemDec / + kNN-LM on the first test batch, each mixture at its chosen λ."""
    w = min(window, len(tokens) - 1)
    n_rows = max(1, min(batch_size, (len(tokens) - 1) // w))
    ids = torch.as_tensor(tokens[: n_rows * w].reshape(n_rows, w))
    if mixed is not None:
        mixed.lmbda = row["memdec_lambda"]
    if knnlm is not None:
        knnlm.lmbda = row["knnlm_lambda"]
    return {
        "base": name,
        "input_shape": list(ids.shape),
        "device": str(device),
        **model_latency(base, ids, vocab, mixed, knnlm, repeats=repeats),
    }


def _warn_if_datastore_text(tokens: np.ndarray, meta: dict, split: str, spec: str) -> None:
    """Scoring the datastore's own text lets every position retrieve itself: p_kNN(gold) ≈ 1, a meaningless λ."""
    path = Path(str(meta.get("corpus", "")))
    if not (path / "meta.json").is_file():
        return
    stored = Corpus(path).tokens
    n = min(len(tokens), len(stored))
    if n >= 2 and np.array_equal(np.asarray(stored[:n], dtype=np.int64), tokens[:n]):
        warnings.warn(
            f"the {split} text {spec} is (the start of) the corpus the datastore was built from ({path}): every "
            "position retrieves its own entry, so kNN-LM perplexity and any λ chosen on it are meaningless; "
            "evaluate on held-out text.",
            stacklevel=3,
        )


def _short_name(ref: str) -> str:
    return Path(str(ref).rstrip("/")).name or str(ref)


def _datastore_base(datastore: str, bases: list[str]) -> str:
    """The base that built the datastore (kNN-LM queries must come from it)."""
    from lightning_memdec.artifacts import read_meta

    built_with = str(read_meta(datastore, kind="datastore")["model"])

    def same(ref: str) -> bool:
        if Path(ref).exists() and Path(built_with).exists():
            return Path(ref).resolve() == Path(built_with).resolve()
        return ref == built_with or _short_name(ref) == _short_name(built_with)

    matches = [b for b in bases if same(b)]
    if not matches:
        raise ValueError(
            f"datastore {datastore} was built with {built_with}, which is none of the bases {bases}; kNN-LM needs the "
            "base that built its datastore, so add it to --bases (or build a datastore with one of them)."
        )
    return matches[0]


def _row(name, base_ref, lp, lmbda, knn_lmbda, grid) -> dict[str, Any]:
    test = lp["test"]
    row: dict[str, Any] = {"base": name, "base_path": str(base_ref), "base_ppl": perplexity(test["base"])}
    for key, other, given in (("memdec", "memdec", lmbda), ("knnlm", "knn", knn_lmbda)):
        if other not in test:
            row.update({f"{key}_ppl": None, f"{key}_lambda": None, f"{key}_lambda_from": None})
            continue
        if given is None:
            chosen, _ = sweep_lambda(lp["valid"]["base"], lp["valid"][other], grid)
            row[f"{key}_lambda_from"] = "valid"
            row[f"{key}_valid_ppl"] = mixed_perplexity(lp["valid"]["base"], lp["valid"][other], chosen)
        else:
            chosen = given
            row[f"{key}_lambda_from"] = "given"
        row[f"{key}_lambda"] = chosen
        row[f"{key}_ppl"] = mixed_perplexity(test["base"], test[other], chosen)
    row["memdec_alone_ppl"] = perplexity(test["memdec"]) if "memdec" in test else None
    row["knn_alone_ppl"] = perplexity(test["knn"]) if "knn" in test else None
    return row


def _curve(lp, grid) -> dict[str, Any]:
    """Mixed perplexity against λ (with the endpoints) on valid when there is one, else on test."""
    split = "valid" if "valid" in lp else "test"
    lambdas = sorted({0.0, 1.0, *grid})
    curve: dict[str, Any] = {"split": split, "lambda": lambdas}
    for key, other in (("memdec", "memdec"), ("knnlm", "knn")):
        if other in lp[split]:
            curve[key] = [mixed_perplexity(lp[split]["base"], lp[split][other], x) for x in lambdas]
    return curve
