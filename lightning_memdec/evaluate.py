"""Evaluation: sliding-window perplexity of base LMs alone, + Memory Decoder, + kNN-LM; λ sweeps; latency.

Every scorer is run once per split and kept as per-position log-probabilities of the gold next token
(``log p(x_{i+1} | x_{≤i})`` for each position ``i``, over the same :func:`~lightning_memdec.corpus.position_windows`
as datastore building). A mixture at any λ is then ``logaddexp`` of two such arrays, because

    log p_mix(gold) = log((1 − λ)·p_base(gold) + λ·p_other(gold))

needs only the gold token's probability on each side. A λ sweep therefore costs no extra model call, and the
decoder's array is shared by every base of the same tokenizer (cross-model evaluation).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_memdec.artifacts import check_same_tokenizer, describe_tokenizer, tokenizer_info, write_json_atomic
from lightning_memdec.assets import load_tokenizer, read_documents, resolve_text
from lightning_memdec.corpus import Corpus, encode_documents, position_windows
from lightning_memdec.interpolate import KNNLM, InterpolatedLM, _find_tokenizer, check_lmbda
from lightning_memdec.keys import load_causal_lm

__all__ = [
    "DEFAULT_LAMBDA_GRID", "evaluate", "perplexity", "mix_log_probs", "sweep_lambda", "text_tokens",
    "sliding_gold_log_probs", "lm_scorer", "knnlm_scorer", "model_latency", "generation_throughput", "median_times",
]

DEFAULT_LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95
ScoreFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


# -- perplexity from gold log-probs ------------------------------------------------------------------------------------


def perplexity(log_probs: np.ndarray) -> float:
    """exp(−mean log p(gold)); the mean is over positions, so every scored token weighs the same."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.size == 0:
        raise ValueError("no scored positions: perplexity of an empty text is undefined.")
    return float(np.exp(-log_probs.mean()))


def mix_log_probs(base: np.ndarray, other: np.ndarray, lmbda: float) -> np.ndarray:
    """log((1 − λ)·p_base + λ·p_other) elementwise; λ = 0 / 1 return the inputs exactly (no log(0) round trip)."""
    lmbda = check_lmbda(lmbda)
    if lmbda == 0.0:
        return np.asarray(base, dtype=np.float64)
    if lmbda == 1.0:
        return np.asarray(other, dtype=np.float64)
    return np.logaddexp(np.log1p(-lmbda) + base, math.log(lmbda) + other)


def sweep_lambda(base: np.ndarray, other: np.ndarray, grid=DEFAULT_LAMBDA_GRID) -> tuple[float, list[float]]:
    """The λ of ``grid`` with the lowest mixed perplexity (first on ties), and the perplexity at every λ."""
    grid = _check_grid(grid)
    ppls = [perplexity(mix_log_probs(base, other, lmbda)) for lmbda in grid]
    return grid[int(np.argmin(ppls))], ppls


def _check_grid(grid) -> list[float]:
    grid = [check_lmbda(g) for g in grid]
    if not grid:
        raise ValueError("lambda_grid is empty; give at least one λ in [0, 1] (e.g. 0.05 … 0.95).")
    return grid


# -- text -> tokens ----------------------------------------------------------------------------------------------------


def text_tokens(spec: str | Path, tokenizer, max_tokens: int | None = None, batch_documents: int = 256) -> np.ndarray:
    """Token ids of a corpus directory, a text file or ``embedded:<domain>/<split>``, as ``memdec tokenize`` makes them.

    Text is tokenized on the fly: documents (blank-line separated) each followed by EOS, capped at ``max_tokens``.
    A corpus directory must have been tokenized with ``tokenizer``.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (one scored position), got {max_tokens}.")
    info = tokenizer_info(tokenizer, _tok_name(tokenizer))
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


def _tok_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    return Path(name).name or name


# -- sliding-window scoring --------------------------------------------------------------------------------------------


@torch.no_grad()
def sliding_gold_log_probs(
    tokens: np.ndarray, window: int, stride: int, batch_size: int, score: ScoreFn, desc: str = "score"
) -> dict[str, np.ndarray]:
    """Run ``score`` over sliding windows; returns, per output name, log p(gold) for every position (float64).

    ``score(input_ids [B, W], labels [B, W])`` gets the shifted gold tokens with −100 at positions that an earlier
    window already scored, and returns ``{name: [B, W] log-probs}``. Texts shorter than ``window`` are scored in one
    window.
    """
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    num_positions = len(tokens) - 1
    window = min(window, num_positions)
    windows = position_windows(num_positions, window, min(stride, window))
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    local = torch.arange(window)
    out: dict[str, np.ndarray] = {}
    for b0 in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        starts = windows.starts[b0 : b0 + batch_size]
        score_from = windows.score_from[b0 : b0 + batch_size]
        block = ids[torch.as_tensor(starts)[:, None] + torch.arange(window + 1)]
        labels = block[:, 1:].clone()
        labels[local[None, :] < torch.as_tensor(score_from)[:, None]] = -100
        for name, lp in score(block[:, :-1], labels).items():
            arr = out.setdefault(name, np.full(num_positions, np.nan))
            lp = lp.double().cpu().numpy()
            for row, (s, f) in enumerate(zip(starts.tolist(), score_from.tolist())):
                arr[s + f : s + window] = lp[row, f:]
    for name, arr in out.items():
        if np.isnan(arr).any():  # position_windows promises full coverage; guard it anyway
            raise RuntimeError(f"{name}: {int(np.isnan(arr).sum())} positions were not scored.")
    return out


def lm_scorer(model, vocab: int, name: str = "lm") -> ScoreFn:
    """Gold log-probs of one causal LM over the first ``vocab`` ids (a padded head is renormalised over them)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits[..., :vocab].float()
        gold = labels.to(logits.device).clamp(min=0)
        lp = logits.gather(-1, gold[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        return {name: lp.masked_fill(labels.to(lp.device) == -100, 0.0)}

    return score


def knnlm_scorer(knnlm: KNNLM) -> ScoreFn:
    """Base and p_kNN gold log-probs from one base forward pass (retrieval only at scored positions)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = knnlm.gold_log_probs(input_ids, labels)
        return {"base": out["base"], "knn": out["knn"]}

    return score


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
    if not bases:
        raise ValueError("no base LM given; pass --bases NAME_OR_DIR (several for cross-model evaluation).")
    names = [_short_name(b) for b in bases]
    if len(set(names)) != len(names):
        raise ValueError(f"bases must have distinct names (last path components), got {names}.")
    if (datastore is None) != (index is None):
        raise ValueError("kNN-LM needs both --datastore and --index (or neither).")
    lmbda = None if lmbda is None else check_lmbda(lmbda)
    knn_lmbda = None if knn_lmbda is None else check_lmbda(knn_lmbda)
    if knn_lmbda is None and valid is None:
        knn_lmbda = lmbda
    grid = _check_grid(DEFAULT_LAMBDA_GRID if lambda_grid is None else lambda_grid)
    if valid is None and ((memdec is not None and lmbda is None) or (datastore is not None and knn_lmbda is None)):
        raise ValueError("λ is neither given nor choosable: pass --lmbda (and --knn_lmbda), or --valid to sweep λ on it.")
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}.")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    knn_base = _datastore_base(datastore, bases) if datastore is not None else None
    splits = {"test": test, **({"valid": valid} if valid is not None else {})}

    decoder = decoder_tok = None
    if memdec is not None:
        decoder = load_causal_lm(memdec).to(dev).eval()
        decoder_tok = _find_tokenizer(memdec, decoder)
        _check_context(decoder, window, f"the Memory Decoder {memdec}")
    token_cache: dict[tuple[str, str], np.ndarray] = {}
    decoder_cache: dict[tuple[str, str], np.ndarray] = {}
    rows, curves, positions, latency_report = [], {}, {}, None
    for base_ref, name in zip(bases, names):
        base = load_causal_lm(base_ref).to(dev).eval()
        _check_context(base, window, f"base {base_ref}")
        tok = load_tokenizer(tokenizer) if tokenizer is not None else _find_tokenizer(base_ref, base)
        if tok is None:
            raise ValueError(f"base {base_ref} has no tokenizer in its directory; pass --tokenizer NAME_OR_DIR.")
        fp = tokenizer_info(tok, _tok_name(tok))["fingerprint"]
        vocab = len(tok)
        mixed = None
        if decoder is not None:  # refuses a decoder of another tokenizer, naming both
            mixed = InterpolatedLM(base, decoder, 0.5 if lmbda is None else lmbda, base_tokenizer=tok,
                                   memdec_tokenizer=decoder_tok or tok)
        knnlm = None
        if base_ref == knn_base:
            knnlm = KNNLM(base, datastore, index, k=k, temperature=temperature, lmbda=0.25 if knn_lmbda is None else knn_lmbda,
                          exact_distances=exact_distances, tokenizer=tok, nprobe=nprobe)
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
            first = token_cache[fp, "test"]
            w = min(window, len(first) - 1)
            n_rows = max(1, min(batch_size, (len(first) - 1) // w))
            ids = torch.as_tensor(first[: n_rows * w].reshape(n_rows, w))
            if mixed is not None:
                mixed.lmbda = rows[-1]["memdec_lambda"]
            if knnlm is not None:
                knnlm.lmbda = rows[-1]["knnlm_lambda"]
            latency_report = {"base": name, "input_shape": list(ids.shape), "device": str(dev),
                              **model_latency(base, ids, vocab, mixed, knnlm, repeats=latency_repeats)}
        del base, mixed, knnlm
    report = {
        "bases": bases, "memdec": memdec, "test": test, "valid": valid, "datastore": datastore, "index": index,
        "k": k if datastore else None, "temperature": temperature if datastore else None,
        "window": window, "stride": stride, "max_tokens": max_tokens,
        "positions": positions,
        "lambda_grid": grid, "rows": rows, "curves": curves, "latency": latency_report,
    }
    _write_report(report, Path(out))
    return report


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


def _finite_or_none(obj):
    """report.json stays strict JSON: an infinite perplexity (p_kNN(gold) = 0 somewhere) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


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
            row[f"{key}_valid_ppl"] = perplexity(mix_log_probs(lp["valid"]["base"], lp["valid"][other], chosen))
        else:
            chosen = given
            row[f"{key}_lambda_from"] = "given"
        row[f"{key}_lambda"] = chosen
        row[f"{key}_ppl"] = perplexity(mix_log_probs(test["base"], test[other], chosen))
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
            curve[key] = [perplexity(mix_log_probs(lp[split]["base"], lp[split][other], x)) for x in lambdas]
    return curve


# -- report ------------------------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Memory Decoder evaluation",
        "",
        f"- test: `{report['test']}` ({report['positions'].get('test')} positions), valid: `{report['valid']}`",
        f"- memdec: `{report['memdec']}`; datastore: `{report['datastore']}` (k={report['k']}, T={report['temperature']})",
        f"- sliding windows: {report['window']} tokens, stride {report['stride']}; perplexity = exp(−mean log p(gold))",
        "",
        "| base | base ppl | +kNN-LM | +MemDec | MemDec alone | λ MemDec | λ kNN-LM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lam = lambda key: "—" if r[f"{key}_lambda"] is None else f"{r[f'{key}_lambda']:g} ({r[f'{key}_lambda_from']})"
        lines.append(
            f"| {r['base']} | {_fmt(r['base_ppl'])} | {_fmt(r['knnlm_ppl'])} | {_fmt(r['memdec_ppl'])} | "
            f"{_fmt(r['memdec_alone_ppl'])} | {lam('memdec')} | {lam('knnlm')} |"
        )
    lat = report.get("latency")
    if lat:
        lines += ["", f"## Latency (median of {lat['repeats']}, batch {lat['input_shape']}, {lat['device']})", "",
                  "| model | seconds | × base |", "|---|---|---|"]
        for key, seconds in lat["seconds"].items():
            lines.append(f"| {key} | {seconds:.4f} | {lat['overhead'][key]:.3f} |")
    lines += ["", "![perplexity against λ](lambda_curve.png)", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "report.md")
    write_json_atomic(out / "report.json", _finite_or_none(report))
    _plot_curves(report["curves"], out / "lambda_curve.png")


def _plot_curves(curves: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # headless: no pyplot, no global backend switch
    ax = fig.add_subplot()
    for name, curve in curves.items():
        for key, style in (("memdec", "-o"), ("knnlm", "--s")):
            if key in curve:
                label = f"{name} + {'MemDec' if key == 'memdec' else 'kNN-LM'}"
                ax.plot(curve["lambda"], curve[key], style, markersize=3, label=label)
    splits = sorted({c["split"] for c in curves.values()})
    ax.set_xlabel("λ (weight of MemDec / kNN)")
    ax.set_ylabel(f"perplexity ({', '.join(splits)})")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


# -- latency -----------------------------------------------------------------------------------------------------------


def median_times(runners: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Median wall time in seconds of each runner, interleaved (A, B, C, A, B, C, …) so that a change in machine
    load during the measurement hits every runner alike; CUDA is synchronised around each call."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}.")
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, fn in runners.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


@torch.no_grad()
def model_latency(
    base, input_ids: torch.Tensor, vocab: int, mixed: InterpolatedLM | None = None, knnlm: KNNLM | None = None,
    repeats: int = 5, warmup: int = 1,
) -> dict[str, Any]:
    """Median time of one forward pass giving next-token log-probs ``[B, T, V]``: base, base+MemDec, base+kNN-LM.

    All three produce the same output (a full distribution at every position) from the same batch, so the ratios
    are the inference overheads: the decoder's extra forward + the log-space mix, or retrieval + the mix.
    """
    ids = input_ids.to(base.device)
    runners = {"base": lambda: torch.log_softmax(base(input_ids=ids, use_cache=False).logits[..., :vocab].float(), -1)}
    if mixed is not None:
        runners["base+memdec"] = lambda: mixed.log_probs(ids)
    if knnlm is not None:
        runners["base+knnlm"] = lambda: knnlm.log_probs(ids)
    seconds = median_times(runners, repeats, warmup, base.device)
    return {"repeats": repeats, "seconds": seconds, "overhead": {key: s / seconds["base"] for key, s in seconds.items()}}


@torch.no_grad()
def generation_throughput(models: dict[str, Any], input_ids: torch.Tensor, max_new_tokens: int = 32, repeats: int = 3,
                          warmup: int = 1) -> dict[str, float]:
    """Greedy decoding speed (generated tokens per second, median, interleaved) of each model, KV caches on.

    ``models`` maps a name to a Hugging Face generator (``generate``; no early stop) or a :class:`KNNLM`
    (its ``generate_greedy`` loop).
    """
    def runner(model):
        ids = input_ids.to(model.device)
        if isinstance(model, KNNLM):
            return lambda: model.generate_greedy(ids, max_new_tokens)
        kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                      eos_token_id=None, pad_token_id=0)
        return lambda: model.generate(ids, **kwargs)

    device = next(iter(models.values())).device
    seconds = median_times({name: runner(model) for name, model in models.items()}, repeats, warmup, device)
    return {name: input_ids.shape[0] * max_new_tokens / s for name, s in seconds.items()}
