"""Typed argument groups of ``memdec evaluate`` and ``memdec downstream``: kNN-LM rows, λ choice, scoring, audits.

Frozen dataclasses: their fields' docstrings are the help of the nested flags (``--knn.datastore``, ``--mix.lmbda``,
``--scoring.window``, …), so a setting and its text exist once; their checks run when they are made, before any
model is loaded. The kNN search settings themselves are :class:`~lightning_memdec.retrieval.settings.KNNSearch`,
the windows :class:`~lightning_memdec.stages.settings.Windows`, shared with the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_memdec.evaluation.knn_temperature import check_temperatures
from lightning_memdec.evaluation.overlap import NGRAM
from lightning_memdec.io.settings import check_positive
from lightning_memdec.kernels.scoring import check_lambda_grid, check_lmbda
from lightning_memdec.retrieval.settings import KNNSearch
from lightning_memdec.stages.settings import Windows


def _listed(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _checked(flag: str, check, value) -> None:
    """Run a kernels check, its message prefixed by the flag that gave the value."""
    try:
        check(value)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


@dataclass(frozen=True)
class KNNLMRows(KNNSearch):
    """kNN-LM rows: the datastores (each with its index) a base retrieves from, and the kNN search settings."""

    datastore: list[str] | None = None
    """datastore directories for the kNN-LM rows, each with --knn.index in the same order"""
    index: list[str] | None = None
    """index directories over those datastores, in the same order"""

    def __post_init__(self):
        super().__post_init__()
        if (self.datastore is None) != (self.index is None) or len(_listed(self.datastore)) != len(_listed(self.index)):
            raise ValueError("kNN-LM needs one --knn.index per --knn.datastore (in the same order), or neither.")


@dataclass(frozen=True)
class EvaluateKNN(KNNLMRows):
    """kNN-LM rows of ``memdec evaluate``: given datastores, or ones built from a corpus, and the search settings."""

    corpus: str | None = None
    """a tokenized domain corpus (memdec tokenize): every base and the teacher without a given datastore gets one
    built from it under out/stores (keys from that model), so each has a kNN-LM row"""


@dataclass(frozen=True)
class Mixing:
    """The mixture weights λ: given, or chosen by a sweep over a grid."""

    lmbda: float | None = None
    """the decoders' weight λ; omitted: chosen on valid (dev) by a sweep over lambda_grid"""
    knn_lmbda: float | None = None
    """kNN-LM's λ; omitted: chosen on valid (dev)"""
    lambda_grid: list[float] | None = None
    """candidate λs for the sweep (default: kernels.scoring.DEFAULT_LAMBDA_GRID, 0, 0.05, …, 1); first on ties, a
    choice at either end is flagged in the report"""

    def __post_init__(self):
        for name in ("lmbda", "knn_lmbda"):
            if getattr(self, name) is not None:
                _checked(f"--mix.{name}", check_lmbda, getattr(self, name))
        if self.lambda_grid is not None:
            _checked("--mix.lambda_grid", check_lambda_grid, self.lambda_grid)


@dataclass(frozen=True)
class EvaluateMixing(Mixing):
    """λ of ``memdec evaluate``: given or swept on valid; the kNN temperatures tried; a router's per-token λ."""

    temperature_grid: list[float] | None = None
    """kNN temperatures tried on valid, each with its best λ (or knn_lmbda), the lowest kNN-LM valid perplexity wins
    (default: kernels.scoring.DEFAULT_TEMPERATURE_GRID, 1 … 64); one value fixes T"""
    router: str | None = None
    """a router directory (memdec fit-router) of one of the bases and this --memdec: that base's row also reports
    MemDec mixed at the router's per-token λ (router_ppl, with intervals)"""

    def __post_init__(self):
        super().__post_init__()
        if self.temperature_grid is not None:
            _checked("--mix.temperature_grid", check_temperatures, self.temperature_grid)


@dataclass(frozen=True)
class DownstreamMixing(Mixing):
    """λ of ``memdec downstream``: given for all tasks or per task, else chosen on a task's dev split, else fixed."""

    task_lmbda: dict[str, float] | None = None
    """the decoder's λ per task name, e.g. '{"sst2": 0.2}' (before a task file's own lmbda)"""
    fallback_lmbda: float = 0.3
    """λ for a task without a dev split when none is given (kNN-Prompt's fixed 0.3)"""
    temperature_grid: list[float] | None = None
    """kNN-LM's temperatures tried on a task's dev split, each with its best λ (or knn_lmbda): the best dev accuracy
    wins, as λ is chosen (default: kernels.scoring.DEFAULT_TEMPERATURE_GRID, 1 … 64; one value fixes T); a task
    without a dev split uses --knn.temperature"""

    def __post_init__(self):
        super().__post_init__()
        for name, value in (self.task_lmbda or {}).items():
            _checked(f"--mix.task_lmbda[{name}]", check_lmbda, value)
        _checked("--mix.fallback_lmbda", check_lmbda, self.fallback_lmbda)
        if self.temperature_grid is not None:
            _checked("--mix.temperature_grid", check_temperatures, self.temperature_grid)


@dataclass(frozen=True)
class Controls:
    """Models reported beside base + MemDec: the ablation and the ceiling."""

    ce_only: str | None = None
    """a decoder trained with the next-token loss alone from the same start and budget (the paper's ablation),
    reported beside MemDec with λ chosen the same way"""
    teacher: str | None = None
    """the LM whose datastore the decoder imitated (e.g. the domain-fine-tuned large base): reported alone and
    + kNN-LM over its own datastore, the ceiling MemDec approximates without retrieval"""


@dataclass(frozen=True)
class Scoring(Windows):
    """How texts are scored: sliding windows, how much of each split, with which tokenizer, on which device."""

    max_tokens: int | None = None
    """score only the first this many tokens of each split"""
    tokenizer: str | None = None
    """tokenizer for models whose directory has none"""
    device: str = "auto"
    """cpu, cuda, cuda:1, … or auto (cuda when available)"""
    flag: ClassVar[str] = "--scoring"


@dataclass(frozen=True)
class Audit:
    """What else the evaluation report measures: latency, and perplexity outside text seen in training."""

    latency: bool = False
    """also time one forward pass of base / +MemDec / +kNN-LM on the first test batch (first base)"""
    latency_repeats: int = 5
    """timed repeats (median reported)"""
    overlap_with: list[str] | None = None
    """the text the models trained on or retrieve from (corpus directories, text files, embedded:…); default:
    --knn.corpus and the corpora the datastores were built from. Every perplexity is also reported on the test
    positions outside n-gram spans found in that text"""
    overlap_ngram: int = NGRAM
    """tokens of a span that counts as repeated text (see evaluation.overlap)"""

    def __post_init__(self):
        check_positive("--audit.latency_repeats", self.latency_repeats, whole=True)
        check_positive("--audit.overlap_ngram", self.overlap_ngram, whole=True)


@dataclass(frozen=True)
class Prompts:
    """Which tasks and examples are scored, and how prompts are cut, batched, tokenized and run."""

    task_names: list[str] | None = None
    """score only these tasks (default: every task of every source)"""
    verbalizers: str = "fuzzy"
    """fuzzy (kNN-Prompt's word lists, what it reports) or primary (one word per class)"""
    n_sample: int | None = None
    """score kNN-Prompt's seeded subsample of this many examples per split (default: all)"""
    max_length: int = 1024
    """keep the last this many prompt tokens (kNN-Prompt: 1024; capped by the models' positions); also the window
    of the general perplexity"""
    batch_size: int = 8
    """prompts (or general-text windows) per forward pass"""
    tokenizer: str | None = None
    """tokenizer for bases whose directory has none"""
    device: str = "auto"
    """cpu, cuda, cuda:1, … or auto"""

    def __post_init__(self):
        check_positive("--prompts.n_sample", self.n_sample, whole=True, omitted="every example")
        check_positive("--prompts.max_length", self.max_length, whole=True)
        check_positive("--prompts.batch_size", self.batch_size, whole=True)


@dataclass(frozen=True)
class GeneralSplit:
    """A general text on which the perplexity of every model and mixture used is reported."""

    text: str | None = None
    """a general text split (text file, corpus directory or embedded:general/test); omitted: none"""
    tokens: int | None = None
    """score only the first this many tokens of it (default: all)"""

    def __post_init__(self):
        check_positive("--general.tokens", self.tokens, whole=True, omitted="the whole text")


@dataclass(frozen=True)
class Bootstrap:
    """The bootstrap behind every 95% interval (accuracy, paired differences, general perplexity)."""

    resamples: int = 1000
    """resamples for the 95% bootstrap intervals"""
    seed: int = 0
    """seed of the bootstrap (task i uses seed + i)"""

    def __post_init__(self):
        if self.resamples < 0:
            raise ValueError(f"--bootstrap.resamples must be 0 or more, got {self.resamples}.")
