"""Evaluation: sliding-window perplexity of base LMs alone, + Memory Decoder, + kNN-LM; λ sweeps; latency.

Every scorer is run once per split and kept as per-position log-probabilities of the gold next token
(``log p(x_{i+1} | x_{≤i})`` for each position ``i``; see :mod:`kernels.scoring`). Mixtures at any λ are
computed from those arrays, so a λ sweep costs no extra model call, and the decoder's array is shared by every base
of the same tokenizer (cross-model evaluation). The report is written by :mod:`lightning_memdec.evaluation.report`.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_memdec.evaluation.knn_temperature import check_temperatures, knn_temperatures_scorer, settle_temperature
from lightning_memdec.evaluation.latency import model_latency
from lightning_memdec.evaluation.report import REPORT_FILES, write_report
from lightning_memdec.evaluation.report_rows import lambda_curve, report_row
from lightning_memdec.evaluation.router_rows import router_by_base, router_columns
from lightning_memdec.evaluation.row_figures import audit_splits, overlap_references, overlap_report, row_figures
from lightning_memdec.evaluation.settings import Audit, Controls, EvaluateKNN, EvaluateMixing, Scoring
from lightning_memdec.evaluation.split_tokens import text_source, text_tokens
from lightning_memdec.hf.loading import (
    check_fits_context,
    find_tokenizer,
    load_causal_lm,
    model_config,
    model_identity,
    tokenizer_name,
    torch_device,
)
from lightning_memdec.inference.interpolated_lm import InterpolatedLM, mixture_vocab
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.router import router_scorer
from lightning_memdec.inference.sliding_window import lm_scorer, sliding_gold_log_probs
from lightning_memdec.io.artifact_dirs import check_writable_dir, keep_earlier_report
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, encoding_fingerprint, tokenizer_info
from lightning_memdec.kernels.scoring import (
    DEFAULT_LAMBDA_GRID,
    DEFAULT_TEMPERATURE_GRID,
    check_lambda_grid,
    check_lmbda,
)
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, Windows

__all__ = ["evaluate", "text_tokens"]
WINDOW_FLAG = "--scoring.window"  # the flag named when a window exceeds a model's context


@exclusive_output(replaces_out=False)  # two evaluations into one --out would interleave their report files
def evaluate(
    bases: list[str],
    test: str,
    out: Path,
    memdec: str | None = None,
    valid: str | None = None,
    controls: Controls = Controls(),
    knn: EvaluateKNN = EvaluateKNN(),
    mix: EvaluateMixing = EvaluateMixing(),
    scoring: Scoring = Scoring(batch_size=4),
    audit: Audit = Audit(),
) -> dict[str, Any]:
    """Perplexity of each base LM alone, with the Memory Decoder, and with kNN-LM; writes report.md/json and a λ plot.

    Long by its report and its loop over the models; the scoring is in :class:`_Scorer` and the helpers.

    Args:
        bases: base LMs (names or directories); several = cross-model evaluation of one decoder.
        test: test text: a corpus directory, a text file, or embedded:<domain>/<split>.
        out: output directory for report.md, report.json and lambda_curve.png.
        memdec: the Memory Decoder (directory or name); omitted: no MemDec columns.
        valid: validation text (same forms as test), for choosing λ (and the kNN temperature) by a sweep when they
            are not given.
        controls: the CE-only decoder and the teacher, reported beside MemDec.
        knn: kNN-LM rows: datastores, each used with the base (or teacher) that built it, or built from a corpus;
            and the search. The temperature is used as given without a valid split, else chosen on valid from
            --mix.temperature_grid.
        mix: the λs (given, or swept on valid), the kNN temperatures tried, and a router's per-token λ.
        scoring: sliding windows (paper: 1024 / 512), tokens scored, tokenizer and device.
        audit: forward-pass latency, and the overlap audit of the test text against the training text.
    """
    ce_only, teacher = controls.ce_only, controls.teacher
    datastore, index, knn_corpus = knn.datastore, knn.index, knn.corpus
    window, stride, batch_size = scoring.window, scoring.step, scoring.batch_size
    models = _models_to_score(bases, teacher)
    lmbda, knn_lmbda = _checked_lambdas(memdec, ce_only, valid, knn, mix.lmbda, mix.knn_lmbda)
    grid = check_lambda_grid(DEFAULT_LAMBDA_GRID if mix.lambda_grid is None else mix.lambda_grid)
    _check_before_scoring(models, [ref for ref in (memdec, ce_only) if ref], window, out, scoring.tokenizer)
    splits = {"test": test, **({"valid": valid} if valid is not None else {})}
    given = overlap_references(audit.overlap_with, None, []) if audit.overlap_with is not None else []
    # the overlap audit's texts too: read only after every model is scored
    _check_splits(splits | {f"--audit.overlap_with {ref}": ref for ref in given}, models, scoring.tokenizer)
    _warn_if_temperature_ignored(knn, mix, valid)
    routers = router_by_base(mix.router, memdec, models)
    dev = torch_device(scoring.device)
    stores = _datastores_by_model(datastore, index, [ref for ref, _, _ in models])
    if knn_corpus is not None:
        stores = _build_missing_stores(stores, models, knn_corpus, Path(out) / "stores", scoring)
    decoders = {key: _load_decoder(ref, dev, window) for key, ref in (("memdec", memdec), ("ce_only", ce_only)) if ref}
    search = {"k": knn.k, "temperature": knn.temperature, "exact_distances": knn.exact_distances, "nprobe": knn.nprobe}
    tried = DEFAULT_TEMPERATURE_GRID if mix.temperature_grid is None else mix.temperature_grid
    temperatures = check_temperatures([knn.temperature] if valid is None else tried)
    scorer = _Scorer(splits, scoring, dev, temperatures)
    rows, curves, latency_report, audits, k_used = [], {}, None, {}, {}
    overlap_refs = overlap_references(
        audit.overlap_with, knn_corpus, [s for s, _ in stores.values()], [memdec, ce_only]
    )
    for base_ref, name, role in models:
        base, tok = scorer.load(base_ref)
        encoding = encoding_fingerprint(tok)  # what the splits' text becomes; keys their caches and their audit
        knnlm = None
        if base_ref in stores:
            store_dir, index_dir = stores[base_ref]
            knnlm = KNNLM(base, store_dir, index_dir, lmbda=0.25 if knn_lmbda is None else knn_lmbda, tokenizer=tok,
                          **search)  # fmt: skip
            k_used[name] = knnlm.k  # k is capped at the datastore's size
        lp = scorer.score(name, base, tok, encoding, knnlm, decoders if role == "base" else {}, routers.get(base_ref))
        knn_choice = settle_temperature(lp, temperatures, grid, knn_lmbda) if knnlm is not None else {}
        if knnlm is not None:
            knnlm.temperature = knn_choice["knnlm_temperature"]
        rows.append(
            report_row(name, base_ref, role, lp, lmbda, knn_lmbda, grid) | router_columns(lp["test"]) | knn_choice
        )
        if encoding not in audits:
            split_tokens = {split: (spec, scorer.tokens(tok, encoding, split)) for split, spec in splits.items()}
            training = [text_tokens(ref, tok) for ref in overlap_refs]
            ngram = audit.overlap_ngram
            audits[encoding] = audit_splits(split_tokens, training, tok, ngram, overlap_refs)
        rows[-1] |= row_figures(rows[-1], lp["test"], audits[encoding])
        curves[name] = lambda_curve(lp, grid)
        if audit.latency and latency_report is None:
            mixed = (
                InterpolatedLM(base, decoders["memdec"][0], 0.5, base_tokenizer=tok) if "memdec" in decoders else None
            )
            latency_report = _first_batch_latency(name, base, scorer.tokens(tok, encoding, "test"), window, batch_size,
                                                  len(tok), mixed, knnlm, rows[-1], audit, dev)  # fmt: skip
        del base, knnlm
    report = {
        "bases": list(bases), "teacher": teacher, "memdec": memdec, "ce_only": ce_only, "test": test, "valid": valid,
        "datastores": {_short_name(m): str(s) for m, (s, _) in stores.items()},
        "k": _one_or_each(k_used), "k_asked": knn.k if stores else None,
        "temperature": knn.temperature if stores and valid is None else None,
        "temperature_grid": temperatures if stores and valid is not None else None,
        "window": window, "stride": stride, "max_tokens": scoring.max_tokens, "positions": scorer.positions,
        "lambda_grid": grid, "rows": rows, "curves": curves, "latency": latency_report, "router": mix.router,
        "overlap": overlap_report(audits, overlap_refs),
    }  # fmt: skip
    keep_earlier_report(out, REPORT_FILES)
    write_report(report, Path(out))
    return report


def _one_or_each(per_model: dict):
    """One value when every model has the same (the common case), else the value of each; None when there is none."""
    values = set(per_model.values())
    return None if not values else values.pop() if len(values) == 1 else per_model


class _Scorer:
    """Tokenizes each split once per tokenizer and scores models on it; a decoder's arrays are shared by the bases."""

    def __init__(self, splits, scoring: Scoring, device, temperatures):
        self.splits, self.window, self.stride, self.batch_size = (
            splits,
            scoring.window,
            scoring.step,
            scoring.batch_size,
        )
        self.temperatures = temperatures  # kNN-LM: log p_kNN(gold) at each, from one search
        self.max_tokens, self.tokenizer, self.device = scoring.max_tokens, scoring.tokenizer, device
        self.positions: dict[str, int] = {}
        self._tokens: dict[tuple[str, str], np.ndarray] = {}
        self._decoded: dict[tuple[str, str, str], np.ndarray] = {}

    def load(self, ref: str):
        model = load_causal_lm(ref).to(self.device).eval()
        check_fits_context(self.window, model, f"{ref}", WINDOW_FLAG)
        tok = load_tokenizer(self.tokenizer) if self.tokenizer is not None else find_tokenizer(ref, model)
        if tok is None:
            raise ValueError(f"{ref} has no tokenizer in its directory; pass --scoring.tokenizer NAME_OR_DIR.")
        return model, tok

    def tokens(self, tok, encoding: str, split: str) -> np.ndarray:
        """``split``'s ids under ``tok``, whose :func:`encoding_fingerprint` is ``encoding`` (not the vocabulary's:
        another normaliser gives other ids)."""
        key = (encoding, split)
        if key not in self._tokens:
            self._tokens[key] = text_tokens(self.splits[split], tok, self.max_tokens)
            self.positions.setdefault(split, int(len(self._tokens[key]) - 1))
        return self._tokens[key]

    def score(self, name, model, tok, encoding, knnlm, decoders, router=None) -> dict[str, dict[str, np.ndarray]]:
        """Per split: log p(gold) of the model ("base"), its kNN-LM at each temperature, each decoder and, with a
        router, its λ per position ("router_lambda", from the same base pass when there is no kNN-LM)."""
        for decoder, decoder_tok in decoders.values():  # refuses a decoder of another tokenizer, naming both
            mixture_vocab(model, decoder, tok, decoder_tok or tok)
        lp: dict[str, dict[str, np.ndarray]] = {}
        for split, spec in self.splits.items():
            tokens = self.tokens(tok, encoding, split)
            if knnlm is not None:
                _warn_if_datastore_text(tokens, knnlm.store.meta, split, spec)
            if knnlm is not None:
                score = knn_temperatures_scorer(knnlm, self.temperatures)
            elif router is not None:
                score = router_scorer(model, router.to(model.device), len(tok))
            else:
                score = lm_scorer(model, len(tok), "base")
            lp[split] = self._sliding(tokens, score, f"{name} {split}")
            if router is not None and knnlm is not None:
                routed = router_scorer(model, router.to(model.device), len(tok))
                lp[split]["router_lambda"] = self._sliding(tokens, routed, f"{name} router {split}")["router_lambda"]
            for key, (decoder, _) in decoders.items():
                if (encoding, split, key) not in self._decoded:  # the decoders scored the ids of this encoding
                    scored = self._sliding(tokens, lm_scorer(decoder, len(tok), key), f"{key} {split}")
                    self._decoded[encoding, split, key] = scored[key]
                lp[split][key] = self._decoded[encoding, split, key]
        return lp

    def _sliding(self, tokens, score, desc):
        return sliding_gold_log_probs(tokens, self.window, self.stride, self.batch_size, score, desc=desc)


def _models_to_score(bases: list[str], teacher: str | None) -> list[tuple[str, str, str]]:
    """(reference, report name, role) of every model scored: the bases, then the teacher."""
    bases = [bases] if isinstance(bases, str) else list(bases)
    names = _base_names(bases)
    models = [(ref, name, "base") for ref, name in zip(bases, names)]
    if teacher is not None:
        if _short_name(teacher) in names:
            raise ValueError(f"the teacher {teacher} has the name of a base; give it a distinct directory name.")
        models.append((teacher, _short_name(teacher), "teacher"))
    return models


def _check_before_scoring(models, decoders: list[str], window: int, out, tokenizer: str | None) -> None:
    """What can be known before any datastore is built or model scored: --out writable, every model's context
    holds --scoring.window, and every base speaks each decoder's tokenizer (from the files next to them)."""
    check_writable_dir(out, "--out")
    for ref in [ref for ref, _, _ in models] + decoders:
        check_fits_context(window, model_config(ref), ref, WINDOW_FLAG)
    if tokenizer is not None:  # one tokenizer given for all: nothing to compare
        return
    for dec in decoders:
        dec_tok = find_tokenizer(dec)
        for ref in [ref for ref, _, role in models if role == "base"]:
            base_tok = find_tokenizer(ref)
            if dec_tok is not None and base_tok is not None:
                check_same_tokenizer(
                    tokenizer_info(dec_tok, tokenizer_name(dec_tok, dec)), f"decoder {dec}",
                    tokenizer_info(base_tok, tokenizer_name(base_tok, ref)), f"base {ref}",
                )  # fmt: skip


def _check_splits(splits: dict[str, str], models, tokenizer: str | None) -> None:
    """Every split's text exists (a corpus directory: finished, of each model's tokenizer) before any model loads or
    datastore is built: read only when scored, a typo in --valid cost the whole scoring of the test split first."""
    sources = {split: text_source(spec) for split, spec in splits.items()}
    corpora = [spec for split, spec in splits.items() if isinstance(sources[split], Corpus)]
    if not corpora:
        return
    for ref, _, _ in models:
        tok = load_tokenizer(tokenizer) if tokenizer is not None else find_tokenizer(ref)
        for spec in corpora if tok is not None else []:  # none found: _Scorer.load names the missing tokenizer
            text_source(spec, tok)


def _warn_if_temperature_ignored(knn: EvaluateKNN, mix: EvaluateMixing, valid: str | None) -> None:
    """With --valid the kNN temperature is chosen from --mix.temperature_grid, without it --knn.temperature is used:
    a user who set the other one (to anything but its default) is told it does nothing, not left to find out."""
    if knn.datastore is None and knn.corpus is None:  # no kNN-LM row: neither is used
        return
    if valid is not None and knn.temperature != _default(knn, "temperature"):
        tried = DEFAULT_TEMPERATURE_GRID if mix.temperature_grid is None else mix.temperature_grid
        warnings.warn(
            f"--knn.temperature {knn.temperature:g} is ignored: with --valid the kNN temperature is chosen on it from "
            f"--mix.temperature_grid {list(tried)}; pass --mix.temperature_grid [{knn.temperature:g}] to fix T.",
            stacklevel=4,  # the caller of evaluate, past its output lock
        )
    elif valid is None and mix.temperature_grid != _default(mix, "temperature_grid"):
        warnings.warn(
            f"--mix.temperature_grid {list(mix.temperature_grid)} is ignored: without --valid there is nothing to "
            f"choose T on, so --knn.temperature {knn.temperature:g} is used; pass --valid to choose among the grid.",
            stacklevel=4,  # the caller of evaluate, past its output lock
        )


def _default(settings, name: str):
    """A settings field's default: what it holds when the user did not set it."""
    return next(f.default for f in fields(settings) if f.name == name)


def _load_decoder(ref: str, device, window: int):
    decoder = load_causal_lm(ref).to(device).eval()
    check_fits_context(window, decoder, f"the decoder {ref}", WINDOW_FLAG)
    return decoder, find_tokenizer(ref, decoder)


def _base_names(bases: list[str]) -> list[str]:
    """Report names of the bases (last path components), which must tell them apart."""
    if not bases:
        raise ValueError("no base LM given; pass --bases NAME_OR_DIR (several for cross-model evaluation).")
    names = [_short_name(b) for b in bases]
    if len(set(names)) != len(names):
        raise ValueError(f"bases must have distinct names (last path components), got {names}.")
    return names


def _checked_lambdas(memdec, ce_only, valid, knn: EvaluateKNN, lmbda, knn_lmbda):
    """The decoders' and kNN-LM's λ (None: swept on valid); refuses settings that leave a λ unknowable."""
    lmbda = None if lmbda is None else check_lmbda(lmbda)
    knn_lmbda = None if knn_lmbda is None else check_lmbda(knn_lmbda)
    if knn_lmbda is None and valid is None:
        knn_lmbda = lmbda
    decoders = memdec is not None or ce_only is not None
    knn = knn.datastore is not None or knn.corpus is not None
    if valid is None and ((decoders and lmbda is None) or (knn and knn_lmbda is None)):
        raise ValueError(
            "λ is neither given nor choosable: pass --mix.lmbda (and --mix.knn_lmbda), or --valid to sweep λ on it."
        )
    return lmbda, knn_lmbda


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, Path)) else list(value)


def _datastores_by_model(datastore, index, refs: list[str]) -> dict[str, tuple[str, str]]:
    """Each given datastore (with its index) keyed by the model that built it, which must be among ``refs``."""
    stores: dict[str, tuple[str, str]] = {}
    for store, idx in zip(_as_list(datastore), _as_list(index)):
        ref = _datastore_base(str(store), refs)
        if ref in stores:
            raise ValueError(f"two datastores ({stores[ref][0]}, {store}) were built with {ref}; give one per model.")
        stores[ref] = (str(store), str(idx))
    return stores


def _build_missing_stores(stores, models, corpus: str, root: Path, scoring: Scoring):
    """A datastore + auto index from ``corpus`` for every model without one (reused when already built)."""
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.datastore import build_datastore

    stores = dict(stores)
    for ref, name, _ in models:
        if ref in stores:
            continue
        store_dir, index_dir = root / f"{name}-datastore", root / f"{name}-index"
        if not (store_dir / "meta.json").is_file():
            windows = Windows(window=scoring.window, stride=scoring.step)  # batch_size: build_datastore's
            build_datastore(Path(corpus), ref, store_dir, windows=windows, hardware=Hardware(accelerator="auto"))
        if not (index_dir / "meta.json").is_file():
            build_index(store_dir, index_dir, plan=IndexSettings(factory="auto"))
        stores[ref] = (str(store_dir), str(index_dir))
    return stores


def _first_batch_latency(name, base, tokens, window, batch_size, vocab, mixed, knnlm, row, audit: Audit, device):
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
        **model_latency(base, ids, vocab, mixed, knnlm, repeats=audit.latency_repeats),
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
    """The base that built the datastore (kNN-LM queries must come from it): the one with the weights' hash the
    datastore recorded, in whatever folder (as a router's base is found), not another model in a folder of its name;
    by path or folder name only where no hash is known (a datastore of an earlier version, a model not hashable)."""
    from lightning_memdec.io.artifact_dirs import read_meta

    meta = read_meta(datastore, kind="datastore")
    built_with, recorded = str(meta["model"]), meta.get("model_sha256")

    def same(ref: str) -> bool:
        actual = None if recorded is None else model_identity(ref)["model_sha256"]
        if actual is not None:
            return actual == recorded
        if Path(ref).exists() and Path(built_with).exists():
            return Path(ref).resolve() == Path(built_with).resolve()
        return ref == built_with or _short_name(ref) == _short_name(built_with)

    matches = [b for b in bases if same(b)]
    if not matches:
        weights = "" if recorded is None else f" (none has its weights, sha {recorded})"
        raise ValueError(
            f"datastore {datastore} was built with {built_with}, which is none of the bases {bases}{weights}; kNN-LM "
            "needs the base that built its datastore, so add it to --bases (or build a datastore with one of them)."
        )
    return matches[0]
