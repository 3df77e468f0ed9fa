"""A learned per-token mixing weight: a small network that reads the base LM's state and sets λ at every position.

A fixed λ is a compromise between domain text (where the Memory Decoder helps) and general text (where it hurts).
The router predicts λ ∈ (0, 1) per token from **base-only** features, so λ is known before the decoder runs and a
position whose λ falls under ``threshold`` can skip the decoder entirely (λ is then exactly 0):

* the base's last hidden state: it carries what the context is about, i.e. whether this is domain text;
* the entropy of p_base and its largest log-probability: how sure the base is, which bounds what mixing can gain.

Decoder features (its hidden state or entropy) are deliberately not used: reading them means running the decoder
at every position, which is the work the threshold is there to save. Features are standardised with statistics of
the router's training data (buffers saved with its weights).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_memdec.inference.sliding_window import ScoreFn, scored_forward
from lightning_memdec.kernels.scoring import check_lmbda, gold_log_probs, log_softmax_summary, vocab_log_probs

__all__ = ["FEATURES", "Router", "base_features", "check_threshold", "router_scorer", "stacked_features"]

#: What the router reads, in order; recorded in its meta.json.
FEATURES = ("base_last_hidden_state", "base_entropy", "base_max_log_prob")


def check_threshold(threshold: float) -> float:
    """The skip threshold is a λ below 1 (the router's λ, a sigmoid, is always below 1: a threshold of 1 would skip
    the decoder at every token, a router that is the base alone); refused naming the setting, not λ."""
    try:
        threshold = check_lmbda(threshold)
        if threshold >= 1:
            raise ValueError
        return threshold
    except ValueError:
        raise ValueError(
            f"the threshold (--routing.threshold: the router's λ under which the decoder is skipped) must be a "
            f"number in [0, 1), got {threshold!r}; 0 never skips, 1 would skip at every token."
        ) from None


def base_features(hidden: torch.Tensor, logits: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """``[..., d + 2]`` float32: the base's last hidden state ``[..., d]``, then the entropy and the largest
    log-prob of its next-token distribution, the softmax of ``logits`` ``[..., R]`` (or log-probs) over the first
    ``vocab`` ids (default: all)."""
    _, entropy, top = log_softmax_summary(logits, vocab or logits.shape[-1])
    return stacked_features(hidden, entropy, top)


def stacked_features(hidden: torch.Tensor, entropy: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The feature rows in :data:`FEATURES` order: hidden ``[..., d]``, entropy and max log-prob ``[...]``."""
    return torch.cat([hidden.float(), entropy[..., None].float(), top[..., None].float()], dim=-1)


class Router(nn.Module):
    """features → λ ∈ (0, 1): standardise, one hidden layer (GELU; none at ``width`` 0), sigmoid; under ``threshold`` λ
    becomes 0."""

    def __init__(self, hidden_size: int, width: int = 64, threshold: float = 0.0):
        super().__init__()
        inputs = hidden_size + 2
        self.hidden_size, self.width = hidden_size, width
        self.threshold = check_threshold(threshold)
        self.register_buffer("feature_mean", torch.zeros(inputs))
        self.register_buffer("feature_std", torch.ones(inputs))
        # width 0: no hidden layer, λ logistic in the standardised features
        hidden = [nn.Linear(inputs, width), nn.GELU()] if width else []
        self.net = nn.Sequential(*hidden, nn.Linear(width or inputs, 1))

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Mean and std of each feature over ``[N, d + 2]`` training rows (std floored: a constant feature)."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """λ ``[...]`` for features ``[..., d + 2]``, before the threshold (what training optimises)."""
        z = (features.float() - self.feature_mean) / self.feature_std
        return torch.sigmoid(self.net(z)[..., 0])

    def routed(self, features: torch.Tensor) -> torch.Tensor:
        """λ ``[...]``, 0 where under the threshold (where the decoder is skipped): what inference uses."""
        lmbda = self(features)
        return lmbda.masked_fill(lmbda < self.threshold, 0.0)

    def route(self, hidden: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        """:meth:`routed` λ from the base's last hidden states ``[..., d]`` and log-probs ``[..., V]``."""
        device = self.feature_mean.device
        return self.routed(base_features(hidden.to(device), log_probs.to(device)))


def base_forward(base, input_ids: torch.Tensor, vocab: int, **kwargs):
    """One forward of the base: log-probs ``[B, T, vocab]``, its last hidden states ``[B, T, d]`` and its output."""
    out = base(input_ids=input_ids, output_hidden_states=True, return_dict=True, **kwargs)
    return vocab_log_probs(out.logits, vocab), out.hidden_states[-1], out


def router_scorer(base, router: Router | None, vocab: int, features: bool = False) -> ScoreFn:
    """A sliding-window ScoreFn: the base's gold log-probs ("base") and the router's λ ("router_lambda"), from one
    forward of the base; with ``features``, also the features the router reads ("features", ``[B, W, d + 2]``).

    The head runs from the first scored column on (:func:`scored_forward`) and the log-softmax is summarised in one
    pass (:func:`log_softmax_summary`): no ``[B, W, V]`` log-prob tensor. Unscored columns hold zeros.
    """

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        first, out = scored_forward(base, input_ids, labels, output_hidden_states=True)
        lse, entropy, top = log_softmax_summary(out.logits, vocab)  # [B, W - first] each
        feats = stacked_features(out.hidden_states[-1][:, first:], entropy, top)  # [B, W - first, d + 2]
        padded = lambda x: torch.cat([x.new_zeros((x.shape[0], first, *x.shape[2:])), x], dim=1)  # noqa: E731
        result = {"base": padded(gold_log_probs(out.logits, labels[:, first:], vocab, lse))}
        if router is not None:
            result["router_lambda"] = padded(router.routed(feats.to(router.feature_mean.device)).to(feats.device))
        if features:
            result["features"] = padded(feats)
        return result

    return score
