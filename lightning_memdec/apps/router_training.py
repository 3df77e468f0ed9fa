"""Training a :class:`Router` with Lightning on per-position arrays: features, log p_base(gold), log p_mem(gold).

The loss is the mixture's own NLL, −log(λ·p_mem(gold) + (1 − λ)·p_base(gold)) through ``kernels.scoring``'s one
mixture, so the router learns the λ that minimises each token's loss with no λ label to derive. Positions are
weighted so that each kind of document (domain, general) counts as much as the other whatever their sizes. About
the last :data:`HELD_OUT` of each kind is held out for early stopping, as **whole documents** where the kind has
more than one: a tail cut inside one long document (a contract) rewards fitting that document, not the domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_memdec.inference.router import Router
from lightning_memdec.kernels.scoring import mix_log_probs

__all__ = ["HELD_OUT", "RouterData", "RouterModule", "train_router", "mixed_nll"]

HELD_OUT = 0.1
BATCH = 512
MAX_EPOCHS = 40
PATIENCE = 3


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


def _dataset(parts: list[RouterData]) -> TensorDataset:
    """Rows of every kind, each kind weighted 1 / its positions (the kinds count alike)."""
    weights = [np.full(len(p.base), 1.0 / max(1, len(p.base)), dtype=np.float32) for p in parts]
    as_tensor = lambda arrays, dtype: torch.as_tensor(np.concatenate(arrays), dtype=dtype)  # noqa: E731
    return TensorDataset(
        as_tensor([p.features for p in parts], torch.float32),
        as_tensor([p.base for p in parts], torch.float32),
        as_tensor([p.memdec for p in parts], torch.float32),
        as_tensor(weights, torch.float32),
    )


def train_router(kinds: list[RouterData], width: int, threshold: float, seed: int = 0) -> tuple[Router, dict]:
    """A router fitted on the first ~90 % of each kind, stopped early on the rest; and what training saw."""
    L.seed_everything(seed, verbose=False)
    fit, held = zip(*(kind.split() for kind in kinds))
    router = Router(kinds[0].features.shape[1] - 2, width, threshold)
    router.set_standardisation(torch.as_tensor(np.concatenate([k.features for k in fit]), dtype=torch.float32))
    module = RouterModule(router)
    stop = L.pytorch.callbacks.EarlyStopping("val_nll", patience=PATIENCE)
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[stop], deterministic=True,
    )  # fmt: skip
    train = DataLoader(_dataset(list(fit)), batch_size=BATCH, shuffle=True)
    valid = DataLoader(_dataset(list(held)), batch_size=BATCH)
    trainer.fit(module, train, valid)
    info = {
        "epochs": trainer.current_epoch,
        "held_out_fraction": HELD_OUT,
        "held_out_positions": [len(h.base) for h in held],
        "held_out_documents": [kind.held_out_documents() for kind in kinds],
    }
    return router.eval(), info
