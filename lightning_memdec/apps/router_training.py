"""Training a :class:`Router` with Lightning on per-position arrays: features, log p_base(gold), log p_mem(gold).

The loss is the mixture's own NLL, −log(λ·p_mem(gold) + (1 − λ)·p_base(gold)) through ``kernels.scoring``'s one
mixture, so the router learns the λ that minimises each token's loss with no λ label to derive. Positions are
weighted so that each kind of document (domain, general) counts as its share (``domain_weight`` and the rest)
whatever their sizes. About the last :data:`HELD_OUT` of each kind is held out for early stopping, as **whole
documents** where the kind has more than one: a tail cut inside one long document (a contract) rewards fitting that
document, not the domain.

Weighting the kinds alike is one trade-off between them; :func:`fit_within_general_budget` makes the trade-off the
user's: of routers trained at several domain weights it keeps the one with the lowest held-out domain perplexity
whose held-out general perplexity stays within a tolerance of the base's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from lightning_memdec.inference.router import Router, check_threshold
from lightning_memdec.io.artifact_dirs import Interrupted
from lightning_memdec.kernels.scoring import mix_log_probs, perplexity

__all__ = [
    "DOMAIN_WEIGHTS",
    "HELD_OUT",
    "RouterData",
    "RouterModule",
    "Routing",
    "check_general_tolerance",
    "fit_within_general_budget",
    "held_out_ppls",
    "mixed_nll",
    "train_router",
    "weighted_rows",
]

HELD_OUT = 0.1
#: the domain's share of the loss tried by :func:`fit_within_general_budget`, from the kinds alike towards domain only
DOMAIN_WEIGHTS = (0.5, 0.7, 0.85, 0.95)
BATCH = 512
MAX_EPOCHS = 40
PATIENCE = 3


@dataclass(frozen=True)
class Routing:
    """What a router is fitted to do: where it skips the decoder, and how much general text may lose to the domain."""

    threshold: float = 0.05
    """λ under this is set to 0 and the decoder skipped (generation saves its forward pass there)"""
    general_tolerance: float | None = 0.03
    """how much general perplexity may rise over the base's, as a fraction, on the held-out general documents:
    routers are trained at domain weights 0.5–0.95 and the one with the lowest held-out domain perplexity within
    this is kept (0.03 leaves room under a 5 % goal for the held-out estimate's noise); null: one router, domain and
    general weighted alike"""
    flag: ClassVar[str] = "--routing"

    def __post_init__(self):  # refused as the flags are parsed, before a model loads
        check_threshold(self.threshold)
        if self.general_tolerance is not None:
            check_general_tolerance(self.general_tolerance)


@dataclass
class RouterData:
    """One kind of document's per-position arrays: features ``[N, d + 2]``, gold log-probs of base and decoder,
    and optionally its document token ``offsets`` (position ``i`` predicts token ``i + 1``, in that token's
    document, as in :func:`evaluation.intervals.document_sums`)."""

    features: np.ndarray
    base: np.ndarray
    memdec: np.ndarray
    offsets: np.ndarray | None = None

    def held_out_start(self, held_out: float = HELD_OUT) -> int:
        """First held-out position: the document start nearest ``1 − held_out`` of the positions among those that
        hold out between half and twice that share, or the cut at ``1 − held_out`` itself where no document
        boundary is that close (one long document, or a few uneven ones)."""
        n = len(self.base)
        cut = int(round(n * (1 - held_out)))
        if self.offsets is None:
            return cut
        starts = np.asarray(self.offsets, dtype=np.int64)[1:-1] - 1  # first position of documents 1 … D − 1
        share = (n - starts) / max(n, 1)
        starts = starts[(share >= held_out / 2) & (share <= 2 * held_out)]
        return cut if len(starts) == 0 else int(starts[np.argmin(np.abs(starts - cut))])

    def split(self, held_out: float = HELD_OUT) -> tuple[RouterData, RouterData]:
        cut = self.held_out_start(held_out)
        head = RouterData(self.features[:cut], self.base[:cut], self.memdec[:cut])
        return head, RouterData(self.features[cut:], self.base[cut:], self.memdec[cut:])

    def held_out_documents(self, held_out: float = HELD_OUT) -> int:
        """How many whole documents :meth:`split` holds out (0: the cut falls inside the only document)."""
        if self.offsets is None:
            return 0
        return int(np.sum(np.asarray(self.offsets)[:-1] - 1 >= self.held_out_start(held_out)))


def mixed_nll(base: torch.Tensor, memdec: torch.Tensor, lmbda: torch.Tensor) -> torch.Tensor:
    """−log p_mix(gold) per position at per-position λ."""
    return -mix_log_probs(base, memdec, lmbda)


class RouterModule(L.LightningModule):
    """The router and its loss: the weighted mean mixed NLL of a batch."""

    def __init__(self, router: Router, lr: float = 3e-3, weight_decay: float = 1e-2):
        super().__init__()
        self.router, self.lr, self.weight_decay = router, lr, weight_decay

    def _loss(self, batch) -> torch.Tensor:
        features, base, memdec, weight = batch
        nll = mixed_nll(base, memdec, self.router(features))
        return (nll * weight).sum() / weight.sum()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_nll", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_nll", self._loss(batch), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.router.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def weighted_rows(parts: list[RouterData], shares: list[float]) -> TensorDataset:
    """Rows of every kind, each kind's rows weighted its share / its positions (a kind weighs its share whatever its
    size)."""
    weights = [np.full(len(p.base), share / max(1, len(p.base)), dtype=np.float32) for p, share in zip(parts, shares)]
    as_tensor = lambda arrays, dtype: torch.as_tensor(np.concatenate(arrays), dtype=dtype)  # noqa: E731
    return TensorDataset(
        as_tensor([p.features for p in parts], torch.float32),
        as_tensor([p.base for p in parts], torch.float32),
        as_tensor([p.memdec for p in parts], torch.float32),
        as_tensor(weights, torch.float32),
    )


def train_router(
    kinds: list[RouterData], width: int, threshold: float, domain_weight: float = 0.5, seed: int = 0
) -> tuple[Router, dict]:
    """A router fitted on the first ~90 % of each kind, stopped early on the rest; and what training saw.
    ``kinds`` is [domain, general]; ``domain_weight`` is the domain's share of the loss (0.5: the kinds alike)."""
    if len(kinds) != 2 or not 0 < domain_weight < 1:
        raise ValueError(f"train_router takes [domain, general] and a domain_weight in (0, 1), got {domain_weight}.")
    shares = [domain_weight, 1 - domain_weight]
    # seeded inside a fork of torch's generator: the same router for the same seed, and the caller's random state,
    # deterministic-algorithms flag and environment as they were (seed_everything and Trainer(deterministic=True)
    # set them for the whole process; on the CPU this small network trains deterministically without them)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fit, held = zip(*(kind.split() for kind in kinds))
        router = Router(kinds[0].features.shape[1] - 2, width, threshold)
        router.set_standardisation(torch.as_tensor(np.concatenate([k.features for k in fit]), dtype=torch.float32))
        module = RouterModule(router)
        stop = L.pytorch.callbacks.EarlyStopping("val_nll", patience=PATIENCE)
        trainer = L.Trainer(
            max_epochs=MAX_EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[stop],
        )  # fmt: skip
        train = DataLoader(weighted_rows(list(fit), shares), batch_size=BATCH, shuffle=True)
        valid = DataLoader(weighted_rows(list(held), shares), batch_size=BATCH)
        try:
            trainer.fit(module, train, valid)
        except SIGTERMException:  # Lightning's stop is a SystemExit with no code: exit 0, as if the router were written
            message = "fit-router interrupted (SIGTERM) while training routers; nothing was written: run it again."
            raise Interrupted.said(message) from None
    info = {
        "domain_weight": domain_weight,
        "epochs": trainer.current_epoch,
        "held_out_fraction": HELD_OUT,
        "held_out_positions": [len(h.base) for h in held],
        "held_out_documents": [kind.held_out_documents() for kind in kinds],
    }
    return router.eval(), info


def check_general_tolerance(tolerance: float) -> float:
    """A rise of general perplexity, as a fraction: a number ≥ 0."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(
            f"--routing.general_tolerance must be a fraction ≥ 0 (0.03: general perplexity at most 3 % above the "
            f"base's on held-out general text), got {tolerance!r}."
        )
    return float(tolerance)


@torch.no_grad()
def held_out_ppls(router: Router, kind: RouterData) -> dict[str, float]:
    """Perplexity of the base alone and of the routed mixture (threshold applied) on ``kind``'s held-out positions."""
    held = kind.split()[1]
    base, memdec = torch.as_tensor(held.base, dtype=torch.float64), torch.as_tensor(held.memdec, dtype=torch.float64)
    lmbda = router.routed(torch.as_tensor(held.features)).double()
    return {"base_ppl": perplexity(base), "router_ppl": perplexity(mix_log_probs(base, memdec, lmbda))}


def fit_within_general_budget(
    kinds: list[RouterData], width: int, threshold: float, tolerance: float, weights: tuple = DOMAIN_WEIGHTS
) -> tuple[Router, dict]:
    """Of routers trained at each domain weight, the one with the lowest held-out domain perplexity among those whose
    held-out general perplexity is at most ``(1 + tolerance)`` × the base's; where none is, the one with the lowest
    general perplexity (and ``within_tolerance`` False). Each candidate's held-out figures are in the info."""
    check_general_tolerance(tolerance)
    candidates = []
    for weight in weights:
        router, info = train_router(kinds, width, threshold, weight)
        domain, general = held_out_ppls(router, kinds[0]), held_out_ppls(router, kinds[1])
        rise = general["router_ppl"] / general["base_ppl"] - 1
        candidates.append((router, info, domain["router_ppl"], rise))
    within = [c for c in candidates if c[3] <= tolerance]
    router, info, _, _ = min(within, key=lambda c: c[2]) if within else min(candidates, key=lambda c: c[3])
    info = info | {
        "general_tolerance": tolerance,
        "within_tolerance": bool(within),
        "candidates": [
            {
                "domain_weight": c[1]["domain_weight"],
                "epochs": c[1]["epochs"],
                "held_out_domain_ppl": c[2],
                "held_out_general_rise": c[3],
            }
            for c in candidates
        ],  # fmt: skip
    }
    return router, info
