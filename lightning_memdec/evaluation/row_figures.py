"""The figures behind a report row's perplexities: the overlap audit of each split, each perplexity outside repeated
spans, bootstrap intervals over documents and paired intervals of the key differences (as ``memdec evaluate`` uses
them; the definitions are in :mod:`evaluation.overlap` and :mod:`evaluation.intervals`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_memdec.evaluation.intervals import bootstrap_perplexities, document_sums, interval
from lightning_memdec.evaluation.overlap import WARN_SHARE, audit_overlap, normalised_pieces, split_document_offsets
from lightning_memdec.io.artifact_dirs import read_meta
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

__all__ = [
    "KEY_DIFFERENCES",
    "overlap_references",
    "audit_splits",
    "overlap_report",
    "row_figures",
    "row_log_probs",
    "outside_overlap",
    "row_intervals",
    "general_figures",
]
log = logging.getLogger(__name__)

#: The comparisons a report row states a paired interval for: (row key, row key), difference = first − second.
KEY_DIFFERENCES = (("memdec_ppl", "knnlm_ppl"), ("memdec_ppl", "ce_only_ppl"), ("memdec_ppl", "base_ppl"),
                   ("router_ppl", "memdec_ppl"), ("router_ppl", "base_ppl"))  # fmt: skip
_MIXED = (("memdec_ppl", "memdec_lambda", "memdec"), ("ce_only_ppl", "ce_only_lambda", "ce_only"),
          ("knnlm_ppl", "knnlm_lambda", "knn"))  # fmt: skip
_ALONE = (("memdec_alone_ppl", "memdec"), ("ce_only_alone_ppl", "ce_only"), ("knn_alone_ppl", "knn"))


def row_log_probs(row: dict[str, Any], test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row key (``base_ppl``, ``memdec_ppl``, …): log p(gold) per test position, each mixture at the row's λ."""
    base = torch.as_tensor(test["base"], dtype=torch.float64)
    arrays = {"base_ppl": base.numpy()}
    for key, lam, other in _MIXED:
        if other in test and row.get(lam) is not None:
            mixed = mix_log_probs(base, torch.as_tensor(test[other], dtype=torch.float64), row[lam])
            arrays[key] = mixed.numpy()
    if "router_lambda" in test and "memdec" in test:  # the decoder mixed at the router's λ, position by position
        routed = torch.as_tensor(test["router_lambda"], dtype=torch.float64)
        arrays["router_ppl"] = mix_log_probs(base, torch.as_tensor(test["memdec"], dtype=torch.float64), routed).numpy()
    arrays |= {key: np.asarray(test[other], dtype=np.float64) for key, other in _ALONE if other in test}
    return arrays


def outside_overlap(arrays: dict[str, np.ndarray], inside: np.ndarray) -> dict[str, float | None]:
    """Each perplexity on the positions outside repeated spans (None when every position is inside one)."""
    keep = ~np.asarray(inside, dtype=bool)
    return {key: perplexity(lp[keep]) if keep.any() else None for key, lp in arrays.items()}


def row_intervals(arrays: dict[str, np.ndarray], offsets: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """Bootstrap intervals over documents of every perplexity and paired intervals of :data:`KEY_DIFFERENCES`.

    ``keep`` restricts every figure to some positions (e.g. outside repeated spans); all rows share the draws.
    """
    keys = list(arrays)
    draws = bootstrap_perplexities([document_sums(arrays[k], offsets, keep) for k in keys])
    out: dict[str, Any] = {"intervals": {k: interval(draws[i]) for i, k in enumerate(keys)}, "differences": {}}
    for first, second in KEY_DIFFERENCES:
        if first in arrays and second in arrays:
            chosen = slice(None) if keep is None else np.asarray(keep, dtype=bool)
            point = perplexity(arrays[first][chosen]) - perplexity(arrays[second][chosen])
            diff = draws[keys.index(first)] - draws[keys.index(second)]
            out["differences"][f"{first} - {second}"] = {"difference": point, "interval": interval(diff)}
    return out


def overlap_references(overlap_with, knn_corpus, datastores: list[str], decoders: list[str] = ()) -> list[str]:
    """The texts to audit against: the given ones, else the kNN corpus, the corpora of the datastores and the
    training corpus a decoder's meta.json names (a `memdec fit` export trained on kNN targets)."""
    if overlap_with is not None:
        return [str(overlap_with)] if isinstance(overlap_with, (str, Path)) else [str(s) for s in overlap_with]
    refs = [] if knn_corpus is None else [str(knn_corpus)]
    named = [read_meta(store, kind="datastore").get("corpus") for store in datastores]
    for decoder in filter(None, decoders):
        if (Path(decoder) / "meta.json").is_file():  # a hub name or a plain HF directory names none
            named.append(read_meta(decoder).get("corpus"))
    for corpus in named:  # one corpus named twice (a relative --knn.corpus, a datastore's absolute path): once
        if corpus and (Path(corpus) / "meta.json").is_file() and not any(_same_path(corpus, r) for r in refs):
            refs.append(str(corpus))
    return refs


def _same_path(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def audit_splits(
    splits: dict[str, tuple], training: list[np.ndarray], tokenizer, ngram: int, refs: list[str]
) -> dict[str, tuple]:
    """Per split (``{split: (spec, tokens)}``): its document offsets and its audit (None without training text),
    exact token spans and normalised word spans (near-duplicates); logs a warning for every split whose share of
    positions inside repeated spans exceeds :data:`WARN_SHARE`."""
    out = {}
    eos_id = tokenizer.eos_token_id
    pieces = normalised_pieces(tokenizer) if training else None
    for split, (spec, tokens) in splits.items():
        offsets = split_document_offsets(spec, tokens, eos_id)
        audit = audit_overlap(tokens, offsets, training, eos_id, ngram, pieces) if training else None
        if audit is not None and audit.share > WARN_SHARE:
            log.warning(
                "%.1f %% of the %s positions (%d of %d; %d whole documents) repeat %d-token (or %d-word normalised) "
                "spans of the training / datastore text %s: perplexities on them are inflated by memorisation and "
                "retrieval of the same text; read the figures outside repeated spans, or de-duplicate the splits.",
                100 * audit.share, split, audit.inside.sum(), audit.inside.size, audit.documents_verbatim, ngram,
                audit.ngram_words, refs,
            )  # fmt: skip
        out[split] = (offsets, audit)
    return out


def overlap_report(audits: dict[str, Any], refs: list[str]) -> dict[str, Any] | None:
    """report.json's audit: per split, counts and the share of positions inside repeated spans (first tokenizer)."""
    if not refs or not audits:
        return None
    first = next(iter(audits.values()))
    return {"against": refs, **{split: audit.summary() for split, (_, audit) in first.items()}}


def row_figures(row: dict[str, Any], test: dict[str, np.ndarray], audits: dict[str, Any]) -> dict[str, Any]:
    """A row's intervals on all positions and, with an audit, its perplexities and intervals outside repeated spans."""
    offsets, audit = audits["test"]
    arrays = row_log_probs(row, test)
    figures: dict[str, Any] = {"all_positions": row_intervals(arrays, offsets)}
    if audit is not None:
        keep = ~audit.inside
        figures["outside_overlap"] = {
            "ppl": outside_overlap(arrays, audit.inside),
            **(row_intervals(arrays, offsets, keep) if keep.any() else {}),
        }
    return figures


def general_figures(row: dict[str, Any], lp: dict[str, np.ndarray], offsets: np.ndarray) -> dict[str, Any]:
    """A base's perplexities on a general (out-of-domain) split: alone, + MemDec at the row's domain λ and MemDec
    alone, each with its bootstrap interval over documents (what plugging the decoder in costs off its domain)."""
    arrays = row_log_probs({"memdec_lambda": row.get("memdec_lambda")}, lp)
    figures: dict[str, Any] = {"base": row["base"], "memdec_lambda": row.get("memdec_lambda")}
    figures |= {key: perplexity(values) for key, values in arrays.items()}
    return figures | {"all_positions": row_intervals(arrays, offsets)}
