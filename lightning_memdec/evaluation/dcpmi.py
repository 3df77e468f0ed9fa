"""kNN-Prompt's domain-conditional PMI (Shi et al., 2022) of prompts: each class's score from the log-probabilities of
its verbalizers after a prompt and after the task's domain premise, for one model or a mixture, and the λ a dev split
chooses.

    pmi(v)   = log(P_λ(v | x) + 1e-10) − log(P_λ(v | d) + 1e-10)        (kNN-Prompt's score.py)
    score(c) = Σ_{v ∈ V_c} pmi(v)

Only the verbalizer tokens' log-probabilities are kept per prompt (``[N, K]``), so every λ (and every kNN temperature)
of a sweep is array arithmetic on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_memdec.evaluation.downstream_differences import credit
from lightning_memdec.evaluation.knn_temperature import knn_key
from lightning_memdec.hf.left_padding import left_padded_batches
from lightning_memdec.hf.loading import forward_params, position_ids_from_mask
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.kernels.scoring import mix_log_probs, vocab_log_probs

__all__ = ["PMI_EPS", "next_token_log_probs", "dcpmi_scores", "choose_lambda", "PromptScorer", "lm_side", "knn_side"]

PMI_EPS = 1e-10  # score.py's log(p + 1e-10)


# -- the maths ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def next_token_log_probs(model, vocab: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(next token | row) ``[B, vocab]`` float32 after the last position of left-padded rows.

    Positions count real tokens only (GPT-2 would shift a left-padded row otherwise); the head is sliced to
    ``vocab`` before normalising (:func:`~lightning_memdec.kernels.scoring.vocab_log_probs`), as everywhere.
    """
    inputs = {
        "input_ids": input_ids.to(model.device),
        "attention_mask": attention_mask.to(model.device),
        "position_ids": position_ids_from_mask(attention_mask, input_ids.shape[1]).to(model.device),
        "use_cache": False,
    }
    if "logits_to_keep" in forward_params(model):
        inputs["logits_to_keep"] = 1
    return vocab_log_probs(model(**inputs, return_dict=True).logits[:, -1], vocab)


def dcpmi_scores(
    base_x: np.ndarray, base_d: np.ndarray, class_columns: list[list[int]], other_x=None, other_d=None, lmbda=0.0
) -> np.ndarray:
    """Class scores ``[N, C]``: Σ over each class's verbalizers of log(P_λ(v|x) + 1e-10) − log(P_λ(v|d) + 1e-10).

    ``base_x`` ``[N, K]`` and ``base_d`` ``[K]`` are log-probs of the K verbalizer tokens after the prompts and
    after the domain premise; ``other_*`` the same for the decoder / p_kNN, mixed at ``lmbda`` (none: base alone).
    ``class_columns[c]`` are the columns of class c's verbalizers.
    """
    x, d = torch.as_tensor(base_x, dtype=torch.float64), torch.as_tensor(base_d, dtype=torch.float64)
    if other_x is not None:
        x = mix_log_probs(x, torch.as_tensor(other_x, dtype=torch.float64), lmbda)
        d = mix_log_probs(d, torch.as_tensor(other_d, dtype=torch.float64), lmbda)
    eps = torch.tensor(math.log(PMI_EPS), dtype=torch.float64)
    pmi = (torch.logaddexp(x, eps) - torch.logaddexp(d, eps)[None, :]).numpy()
    return np.stack([pmi[:, cols].sum(axis=1) for cols in class_columns], axis=1)


def choose_lambda(dev: dict, class_columns, labels: np.ndarray, grid) -> tuple[float, list[float]]:
    """The λ of ``grid`` with the best dev accuracy (the first on ties) and the accuracy at every λ (tied class
    scores split the credit: :func:`~lightning_memdec.evaluation.downstream_differences.credit`)."""
    accs = []
    for lmbda in grid:
        scores = dcpmi_scores(dev["base_x"], dev["base_d"], class_columns, dev["other_x"], dev["other_d"], lmbda)
        accs.append(float(credit(scores, labels).mean()))
    return grid[int(np.argmax(accs))], accs


# -- running models on prompts -----------------------------------------------------------------------------------------


class PromptScorer:
    """Tokenizes prompts (no special tokens, the last ``max_length`` tokens kept) and runs left-padded batches."""

    def __init__(self, tokenizer, max_length: int, batch_size: int):
        if max_length <= 0 or batch_size <= 0:
            raise ValueError(f"max_length and batch_size must be positive, got {max_length}, {batch_size}.")
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"prompt {prompts[empty[0]]!r} has no tokens; a next-token score needs a context.")
        return [row[-self.max_length :] for row in ids]

    def run(self, prompts: list[str], sides, token_ids: list[int], desc: str) -> dict[str, np.ndarray]:
        """``sides(input_ids, mask) -> {name: log-probs [B, V]}``; returns ``{name: [N, K]}`` at ``token_ids``."""
        encoded = self.encode(prompts)
        cols = torch.as_tensor(token_ids, dtype=torch.long)
        out: dict[str, np.ndarray] = {}
        batches = left_padded_batches(encoded, self.batch_size, self.pad_id)
        total = math.ceil(len(encoded) / self.batch_size)
        for rows, ids, mask in tqdm(batches, desc=desc, total=total, unit="batch", leave=False):
            for name, lp in sides(ids, mask).items():
                arr = out.setdefault(name, np.zeros((len(encoded), len(token_ids))))
                arr[rows] = lp[:, cols.to(lp.device)].double().cpu().numpy()
        return out


def lm_side(model, vocab: int, name: str):
    return lambda ids, mask: {name: next_token_log_probs(model, vocab, ids, mask)}


def knn_side(knnlm: KNNLM, temperatures: list[float]):
    """Base log-probs and p_kNN at each temperature (:func:`knn_key`) after the last position, from one base pass
    and one search (retrieval at that position only)."""

    def sides(ids, mask):
        logits, keys = knnlm.base_forward(ids, mask)
        knn = dict(zip(map(knn_key, temperatures), knnlm.knn_log_probs_at(keys[:, -1], temperatures)))
        return {"base": vocab_log_probs(logits[:, -1], knnlm.vocab), **knn}

    return sides
