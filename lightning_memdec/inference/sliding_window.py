"""Score a tokenized text with any scorer over sliding windows, the one windowing the datastore uses too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_memdec.hf.loading import load_causal_lm
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
        logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
        return {name: gold_log_probs(logits, labels, vocab)}

    return score


def corpus_gold_log_probs(
    model, corpus: Path, window: int, stride: int | None = None, batch_size: int = 8, cache: Path | None = None
) -> np.ndarray:
    """Sliding-window gold log-probs ``[positions]`` of one LM (directory, name or model) over a tokenized corpus.

    ``stride`` defaults to half the window. With ``cache``, the array is saved there as .npy and a rerun loads it.
    """
    if cache is not None and Path(cache).is_file():
        return np.load(cache)
    name = Path(str(getattr(model, "name_or_path", model))).name
    if isinstance(model, (str, Path)):
        model = load_causal_lm(model)
    data = Corpus(corpus)
    scorer = lm_scorer(model.eval(), data.tokenizer["vocab_size"], "lm")
    stride = window // 2 if stride is None else stride
    lp = sliding_gold_log_probs(
        np.asarray(data.tokens), window, stride, batch_size, scorer, desc=f"score {name} on {Path(corpus).name}"
    )["lm"]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, lp)
    return lp
