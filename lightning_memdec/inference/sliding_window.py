"""Score a tokenized text with any scorer over sliding windows, the one windowing the datastore uses too."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_memdec.hf.key_capture import KeyCapture
from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.io.npy_rows import save_npy
from lightning_memdec.io.token_corpus import Corpus, position_windows
from lightning_memdec.kernels.scoring import gold_log_probs

# score(input_ids [B, W], labels [B, W]) -> {name: log p(gold) [B, W]}; labels are −100 where not scored
ScoreFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def sliding_gold_log_probs(
    tokens: np.ndarray, window: int, stride: int, batch_size: int, score: ScoreFn, desc: str = "score"
) -> dict[str, np.ndarray]:
    """Run ``score`` over sliding windows; returns, per output name, log p(gold) for every position (float64).

    An output with more dimensions than ``[B, W]`` (``[B, W, F]``) is kept per position too, as float32 ``[N, F]``.

    Windows are :func:`~lightning_memdec.io.token_corpus.position_windows`, as in datastore building. ``score`` gets the
    shifted gold tokens with −100 at positions that an earlier window already scored. Texts shorter than
    ``window`` are scored in one window.
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
        block = ids[torch.as_tensor(starts)[:, None] + torch.arange(window + 1)]  # [B, W + 1]
        labels = block[:, 1:].clone()
        labels[local[None, :] < torch.as_tensor(score_from)[:, None]] = -100
        for name, lp in score(block[:, :-1], labels).items():
            # per-position scalars in float64; per-position vectors (a router's features) in float32
            lp = (lp.double() if lp.dim() == 2 else lp.float()).cpu().numpy()
            arr = out.setdefault(name, np.full((num_positions, *lp.shape[2:]), np.nan, dtype=lp.dtype))
            for row, (s, f) in enumerate(zip(starts.tolist(), score_from.tolist())):
                arr[s + f : s + window] = lp[row, f:]
    for name, arr in out.items():
        if np.isnan(arr).any():  # position_windows promises full coverage; guard it anyway
            raise RuntimeError(f"{name}: {int(np.isnan(arr).sum())} positions were not scored.")
    return out


def lm_scorer(model, vocab: int, name: str = "lm") -> ScoreFn:
    """Gold log-probs of one causal LM over the first ``vocab`` ids (a padded head is renormalised over them)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        first, out = scored_forward(model, input_ids, labels)  # logits [B, W - first, R]
        lp = torch.zeros(labels.shape, dtype=torch.float32, device=out.logits.device)  # [B, W]; unscored columns 0
        lp[:, first:] = gold_log_probs(out.logits, labels[:, first:], vocab)
        return {name: lp}

    return score


def scored_forward(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs):
    """``(first, output)``: one forward of ``model`` whose logits cover the columns ``first:`` of the batch, from its
    first scored one (``labels`` ≠ −100) on.

    The LM head (for the small vocabulary-heavy models here, most of a forward's cost) runs only there, where the
    model's forward takes ``logits_to_keep``: a sliding window's context prefix (a quarter of the quickstart's
    windows) is never projected onto the vocabulary. Other outputs (hidden states) keep all ``W`` columns.
    """
    first = first_scored_column(labels) if "logits_to_keep" in inspect.signature(model.forward).parameters else 0
    first = first if first < labels.shape[1] else 0  # nothing scored: keep the plain forward
    if first:
        kwargs["logits_to_keep"] = torch.arange(first, labels.shape[1])
    return first, model(input_ids=input_ids.to(model.device), use_cache=False, return_dict=True, **kwargs)


def first_scored_column(labels: torch.Tensor) -> int:
    """The first column of ``labels`` ``[B, W]`` that any row scores (not −100); W when none does."""
    scored = (labels != -100).any(dim=0)
    return int(scored.int().argmax()) if bool(scored.any()) else labels.shape[1]


def with_keys(score: ScoreFn, model, layer: str | None = None, name: str = "keys") -> ScoreFn:
    """``score`` plus the datastore keys of ``model`` (its key layer's output, float16 as a datastore stores them)
    under ``name``, ``[B, W, d]``, captured during the same forward: a kNN-LM's queries cost no second pass."""
    capture = KeyCapture(model, layer)

    def scored_with_keys(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with capture.capturing() as cap:
            out = score(input_ids, labels)
        return out | {name: cap.value.to(torch.float16)}

    return scored_with_keys


def corpus_gold_log_probs(
    model, corpus: Path, window: int, stride: int | None = None, batch_size: int = 8, cache: Path | None = None
) -> np.ndarray:
    """Sliding-window gold log-probs ``[positions]`` of one LM (directory, name or model) over a tokenized corpus.

    ``stride`` defaults to half the window. With ``cache``, the array is saved there as .npy and a rerun loads it.
    """
    caches = None if cache is None else {"lm": Path(cache)}
    return corpus_scores(model, corpus, window, stride, batch_size, caches)["lm"]


def corpus_scores(
    model,
    corpus: Path,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    caches: dict[str, Path] | None = None,
    keys: bool = False,
) -> dict[str, np.ndarray]:
    """Gold log-probs (``lm``, float64 ``[N]``) and, with ``keys``, the model's datastore keys at every position
    (``keys``, float16 ``[N, d]``: what ``memdec build-datastore`` would store over the same windows), from one
    sliding-window pass. ``caches`` maps each output to a .npy file: written atomically, loaded when all exist."""
    names = ("lm", "keys") if keys else ("lm",)
    if caches is not None and all(Path(caches[n]).is_file() for n in names):
        return {n: np.load(caches[n]) for n in names}
    name = Path(str(getattr(model, "name_or_path", model))).name
    if isinstance(model, (str, Path)):
        model = load_causal_lm(model)
    data = Corpus(corpus)
    scorer = lm_scorer(model.eval(), data.tokenizer["vocab_size"], "lm")
    scorer = with_keys(scorer, model) if keys else scorer
    stride = window // 2 if stride is None else stride
    out = sliding_gold_log_probs(
        np.asarray(data.tokens), window, stride, batch_size, scorer, desc=f"score {name} on {Path(corpus).name}"
    )
    if keys:
        out["keys"] = out["keys"].astype(np.float16)  # exact: captured as float16
    for n in names if caches is not None else ():
        Path(caches[n]).parent.mkdir(parents=True, exist_ok=True)
        save_npy(caches[n], out[n])
    return out
