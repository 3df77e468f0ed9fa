"""The quickstart's stages, each reused when rerun: budgets, training through `memdec fit`, datastores, indexes,
kNN-LM rows and the checks made before any work."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lightning_memdec.evaluation.knn_temperature import knn_key
from lightning_memdec.io.artifact_dirs import META, jsonable, write_json_atomic
from lightning_memdec.io.embedded import EMBEDDED_DOMAINS, EMBEDDED_PREFIX
from lightning_memdec.io.packaged_configs import load_config
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.settings import check_positive
from lightning_memdec.io.token_corpus import Corpus, tokenize
from lightning_memdec.kernels.scoring import knn_gold_log_probs
from lightning_memdec.retrieval.faiss_index import KeyIndex, build_index
from lightning_memdec.retrieval.index_plan import IndexRule, plan_index
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, Windows
from lightning_memdec.training.fit import fit

log = logging.getLogger(__name__)
# Small stores on a laptop CPU: exact search below 20k keys; else ~√N lists, 64 training keys each, uncompressed
# keys (exact distances within the 16 probed lists), cheap to train.
INDEX_RULE = IndexRule(flat_below=20_000, lists_per_sqrt=1.0, train_per_list=64, compress=False)
INDEX_NPROBE = 16


@dataclass(frozen=True)
class Budget:
    """Token and step budgets of the default quickstart, sized from measured CPU cost.

    Measured (float32, the shipped bases; CPU seconds of all threads): the teacher (base-large) trains at ~200
    tokens per CPU-second and the small decoders at ~500-550, their 50,257-row LM head dominating; forward-only
    datastore keys are several times cheaper. Scoring 100k test tokens made the run longer than its 15-minute target
    on 2 cores: a run with two decoder epochs took 1413 s by its stages (2548 CPU-seconds) on a shared machine
    (docs/results/quickstart.md); one-pass scoring then halved the evaluation, but one epoch still takes 18-22
    minutes there (docs/results/quickstart-eval-speed). The domain budget is one epoch of each decoder (MemDec and
    CE-only: more epochs help both and narrow MemDec's lead, measured on valid in
    docs/results/decoder-epochs-biomed.txt); the teacher is fine-tuned on 82k of those tokens (40 steps of 8 x 256)
    at half the bases' peak pretraining learning rate, which already lowers its domain perplexity by ~50-60 %.
    λ and the kNN temperatures are only tuned on the valid split (``valid_tokens``); every reported domain figure
    is on the test split, scored up to ``test_tokens`` (the whole de-duplicated biomed test split) so that its
    bootstrap intervals over documents are narrow enough to read.
    """

    general_tokens: int = 520_000
    """general-corpus tokens for pretraining the bases (--pretrain_bases only)"""
    domain_tokens: int = 200_000
    """domain train tokens (datastores, targets, decoder training)"""
    valid_tokens: int = 12_000
    """tokens of the domain valid split (λ and every kNN temperature are chosen on it) and of the general test split"""
    test_tokens: int = 100_000
    """tokens of the domain test split scored (every domain figure of the report), or the whole split if shorter"""
    window: int = 256
    """context length of every stage (training windows; scoring and valid/test keys use stride 3/4 window)"""
    batch_size: int = 8
    """windows per training step"""
    small_base_steps: int = 500
    """pretraining steps of the small base (--pretrain_bases only)"""
    large_base_steps: int = 500
    """pretraining steps of the large base (--pretrain_bases only)"""
    teacher_steps: int = 40
    """fine-tuning steps of the teacher on the domain"""
    memdec_steps: int | None = None
    """training steps of the Memory Decoder (and of the CE-only decoder); default: one epoch over the domain tokens"""
    k: int = 256
    """neighbours per position for targets and every kNN-LM"""
    teacher_lr: float = 1e-3
    """peak learning rate of the teacher's fine-tuning"""
    decoder_lr: float = 1e-3
    """peak learning rate of both decoders"""

    def __post_init__(self):
        for f in fields(self):
            omitted = "one epoch" if f.name == "memdec_steps" else None
            check_positive(f"--budget.{f.name}", getattr(self, f.name), f.type in ("int", "int | None"), omitted)

    @property
    def stride(self) -> int:
        """New positions scored per window (valid/test/general scoring and their datastore keys): 3/4 of the window,
        so every position keeps >= window/4 tokens of context (64 of 256; 160 on average) while the 100k-token test
        split costs 4/3 forward tokens per position instead of stride window/2's 2. At window 256 the quickstart's
        abstracts (~270 tokens) mostly fit one window either way; the stride is the same for every model, so the
        comparisons are like for like."""
        return max(1, 3 * self.window // 4)


class StageClock:
    """Wall-clock seconds per quickstart stage, reported so users see where their budget goes.

    ``cpu_seconds`` (this process's CPU time, all threads) is kept too: on a shared machine the wall clock
    depends on what else runs, the CPU time much less.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)
        self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 1)
        log.warning("quickstart stage %s: %.1f s (CPU %.1f s)", name, self.seconds[name], self.cpu_seconds[name])


RECORDED_SINCE = ("texts", "fingerprints", "encoding")  # settings runs of earlier versions did not record
RESERVED_NAMES = ("teacher", "memdec", "ce-only")  # the quickstart's own models: their scores and stores' names


def check_same_settings(out: Path, settings: dict) -> None:
    """Finished stages are reused by name, so a rerun must have the settings that produced them, and the same
    ``--domain`` text (``texts``: each split file's sha256; an edited split was scored as the old one)."""
    from lightning_memdec.io.artifact_dirs import ArtifactError

    path = out / "quickstart_settings.json"
    settings = jsonable(settings)
    if path.is_file():
        previous = json.loads(path.read_text())
        previous |= {k: settings[k] for k in RECORDED_SINCE if k not in previous}  # not recorded: not compared
        if "domain" in previous:  # a shipped corpus however it was spelled (none, biomed, embedded:biomed)
            previous["domain"], settings["domain"] = map(shipped_domain, (previous["domain"], settings["domain"]))
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            named = {"texts": f"the text of {changed_entries(previous, settings, 'texts')}",
                     "fingerprints": f"the files of {changed_entries(previous, settings, 'fingerprints')}",
                     "encoding": "how the tokenizer encodes text"}  # fmt: skip
            changed = [named.get(k, k) for k in changed]
            raise ArtifactError(
                f"{out} holds a quickstart run with other settings ({', '.join(changed)} differ); "
                f"use another --out, or delete {out} to start afresh."
            )
    else:
        write_json_atomic(path, settings)


def changed_entries(previous: dict, settings: dict, key: str) -> str:
    """The entries of a recorded mapping (``texts``, ``fingerprints``) whose digest changed, named."""
    return ", ".join(name for name, digest in settings[key].items() if previous[key].get(name) != digest)


def done(path: Path) -> bool:
    return (path / META).is_file()


def shipped_domain(domain: str | None) -> str | None:
    """``embedded:<name>`` where ``domain`` names a shipped corpus (as :func:`split_path` reads it), else as given."""
    try:
        train = split_path(domain, "train")
    except FileNotFoundError:
        return domain
    return train.removesuffix("/train") if train.startswith(EMBEDDED_PREFIX) else domain


def split_path(domain: str | None, split: str) -> str:
    """A split's text: ``<domain>/<split>.txt``, or a shipped corpus's (``embedded:law``, or ``law`` where no such
    directory exists; none: the biomedical one)."""
    name = "biomed" if domain is None else domain.removeprefix(EMBEDDED_PREFIX)
    if domain is None or domain.startswith(EMBEDDED_PREFIX) or (name in EMBEDDED_DOMAINS and not Path(name).exists()):
        if name not in EMBEDDED_DOMAINS:
            raise FileNotFoundError(f"--domain {domain}: the shipped corpora are {', '.join(EMBEDDED_DOMAINS)}.")
        return f"{EMBEDDED_PREFIX}{name}/{split}"
    path = Path(domain) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"--domain {domain} must hold train.txt, valid.txt and test.txt ({path} is missing), or name a shipped "
            f"corpus: {', '.join(EMBEDDED_DOMAINS)}."
        )
    return str(path)


def epoch_steps(train: Path, budget: Budget) -> int:
    """Training steps of one epoch over a tokenized train corpus: its tokens in windows × batch, rounded up."""
    return -(-Corpus(train).num_tokens // (budget.window * budget.batch_size))


def corpus_dir(out: Path, text: str, tokenizer: str, max_tokens: int) -> Path:
    return out if done(out) else tokenize([text], out, tokenizer, max_tokens=max_tokens)


def train_model(
    name: str,
    out: Path,
    train: Path,
    valid: Path,
    budget: Budget,
    steps: int,
    start: dict | str,
    beta: float,
    targets: tuple[Path, Path] | None = None,
    lr: float = 2e-3,
) -> Path:
    """Train one model with :func:`training.fit.fit` (what `memdec fit` runs) into ``out/models/<name>``.

    ``start`` is a model to continue (name or directory) or a GPT-2 config dict to train from scratch; ``targets``
    the (train, valid) kNN targets of a Memory Decoder (none: the next-token loss alone). A run killed before its
    export resumes from its last checkpoint; once exported, its checkpoints are removed.
    """
    export = out / "models" / name
    if done(export):
        return export
    if isinstance(start, str):
        model = {"model": start}
    else:  # from scratch: the vocabulary is the corpus tokenizer's (gpt2: 50257, gpt-neox-20b: 50277)
        vocab = Corpus(train).tokenizer["vocab_size"]
        model = {"config": {**start, "n_positions": budget.window, "vocab_size": vocab}}
    data = {
        "train_corpus": str(train),
        "val_corpus": str(valid),
        "window": budget.window,
        "batch_size": budget.batch_size,
    }
    if targets is not None:
        data.update(train_targets=str(targets[0]), val_targets=str(targets[1]))
    run = out / "runs" / name
    checkpoints = run / "checkpoints"
    config = load_config(
        "hardware/cpu.yaml",
        "schedule/short.yaml",
        {
            "model": {**model, "beta": beta, "learning_rate": lr, "warmup_steps": 0.05},
            "data": data,
            "trainer": {
                "max_steps": steps,
                "val_check_interval": max(1, steps // 2),
                "limit_val_batches": 4,
                "check_val_every_n_epoch": None,
                "default_root_dir": str(run),
                "enable_model_summary": False,
            },
            "checkpoint": {"dirpath": str(checkpoints)},
            "export": {"dirpath": str(export)},
        },
    )
    resume = "last" if (checkpoints / "last.ckpt").is_file() else None  # a quickstart killed mid-training goes on
    log.info("training %s for %d steps%s", name, steps, " (resumed)" if resume else "")
    fit(config, ckpt_path=resume)
    shutil.rmtree(checkpoints)  # the export is the stage's output; the checkpoints (~0.3 GB a model) served a resume
    return export


def knn_gold_probs(
    store: Path, index: Path, query_keys: np.ndarray, queries: Path, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour distances [n, k] of ``query_keys`` [n, d] (one per position of the tokenized corpus ``queries``) in
    the train store, and whether each neighbour's value is that position's gold next token."""
    gold = np.asarray(Corpus(queries).tokens)[1:]
    dist, ids = KeyIndex(index).search(np.asarray(query_keys, dtype=np.float32), k)
    match = (np.asarray(Datastore(store).values)[np.maximum(ids, 0)] == gold[:, None]) & (ids >= 0)
    return dist, match


def choose_temperature(dist: np.ndarray, match: np.ndarray, base_valid: np.ndarray, grid=None) -> dict:
    """The kNN temperature (and λ) with the lowest kNN-LM perplexity on the valid split (kernels.scoring's rule)."""
    from lightning_memdec.kernels.scoring import DEFAULT_TEMPERATURE_GRID, knn_gold_log_probs, sweep_temperature

    grid = DEFAULT_TEMPERATURE_GRID if grid is None else grid
    choice = sweep_temperature(base_valid, {t: knn_gold_log_probs(dist, match, t) for t in grid})
    return {
        "temperature": choice["temperature"],
        "lambda": choice["lambda"],
        "valid_ppl_by_temperature": {str(t): v for t, v in choice["ppl_by_temperature"].items()},
    }


def gold_log_probs(model_dir: Path | str, corpus: Path, budget: Budget, cache: Path) -> np.ndarray:
    """Sliding-window gold-token log-probs of one LM over a corpus at the budget's window, cached as .npy."""
    return scores_and_keys(model_dir, corpus, budget, cache)[0]


def scores_and_keys(
    model_dir: Path | str, corpus: Path, budget: Budget, cache: Path, keys: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gold-token log-probs ``[N]`` and, with ``keys``, the model's datastore keys ``[N, d]`` at every position (the
    kNN-LM's queries), from one sliding-window pass at the budget's window; cached as ``cache`` and
    ``<cache stem>-keys.npy``."""
    from lightning_memdec.inference.sliding_window import corpus_scores

    caches = {"lm": cache, "keys": cache.with_name(cache.stem + "-keys.npy")}
    got = corpus_scores(model_dir, corpus, budget.window, stride=budget.stride, caches=caches, keys=keys)
    return got["lm"], got.get("keys")


def datastore(model: Path | str, corpus: Path, out: Path, budget: Budget, stride: int | None = None) -> Path:
    """Keys of ``model`` over ``corpus``; the scoring stride unless given (train stores: the window)."""
    if done(out):
        return out
    return build_datastore(
        corpus,
        str(model),
        out,
        overwrite=True,
        windows=Windows(window=budget.window, stride=stride or budget.stride, batch_size=16),
        hardware=Hardware(accelerator="cpu"),
    )


def build_or_reuse_index(store: Path, out: Path) -> Path:
    """The index :data:`INDEX_RULE` plans for the store (index_plan's one sizing rule, the quickstart's numbers)."""
    if done(out):
        return out
    keys = Datastore(store)
    plan = plan_index(len(keys), keys.dim, nprobe=INDEX_NPROBE, rule=INDEX_RULE)
    if plan.nlist is None:  # Flat: nothing to train or probe
        return build_index(store, out, overwrite=True, plan=IndexSettings(factory=plan.factory))
    ivf = IndexSettings(factory=plan.factory, train_size=plan.train_size, nprobe=INDEX_NPROBE)
    return build_index(store, out, overwrite=True, plan=ivf)


def knn_log_probs(
    model, name: str, out: Path, corpora: dict, budget: Budget, temperatures, query_keys: dict[str, np.ndarray]
) -> dict:
    """kNN-LM of ``model`` over its own datastore of the domain train split: log p_kNN(gold) per valid/test position
    at every candidate temperature (``{split: {knn_key(T): array}}``, as ``memdec evaluate``'s scorer gives them;
    one search per split, the temperature only reweights the same distances). ``query_keys`` are the model's keys
    over each split, captured while scoring it."""
    s = out / "stores"
    store = datastore(model, corpora["domain-train"], s / f"{name}-train", budget, stride=budget.window)
    idx = build_or_reuse_index(store, s / f"{name}-index")
    lp = {}
    for split in ("valid", "test"):
        dist, match = knn_gold_probs(store, idx, query_keys[split], corpora[f"domain-{split}"], budget.k)
        lp[split] = {knn_key(t): knn_gold_log_probs(dist, match, t).numpy() for t in temperatures}
    return lp


def base_tokenizers(refs: list[str], tokenizer: str | None) -> str:
    """The tokenizer all ``refs`` share (and ``tokenizer``, when given); refuses models whose tokenizers differ."""
    from lightning_memdec.hf.loading import find_tokenizer
    from lightning_memdec.io.embedded import ASSETS, load_tokenizer
    from lightning_memdec.io.tokenizer_identity import check_same_tokenizer, tokenizer_info

    found = {}
    for ref in refs:
        tok = find_tokenizer(ref)
        if tok is None:
            raise ValueError(f"--base {ref} has no tokenizer next to it; save its tokenizer with the model.")
        found[ref] = tok
    if tokenizer is not None:
        found[f"--tokenizer {tokenizer}"] = load_tokenizer(tokenizer)
    infos = {ref: tokenizer_info(tok, Path(tok.name_or_path).name or ref) for ref, tok in found.items()}
    first = refs[0]
    fix = (
        "the quickstart's models must share one tokenizer (a Memory Decoder plugs into bases of the same "
        "vocabulary): pass bases of one family, or --pretrain_bases true with --tokenizer for one of your choice"
    )
    for ref, info in infos.items():
        what = ref if ref.startswith("--") else f"--base {ref}"
        check_same_tokenizer(infos[first], f"--base {first}", info, what, fix)
    if tokenizer is not None:
        return tokenizer
    path = Path(found[refs[0]].name_or_path)
    return path.name if path.parent == ASSETS / "tokenizers" else str(path)


def fingerprints(models: list[str], tokenizer: str) -> dict[str, str]:
    """What the given models' weights and the tokenizer are, whatever their paths (a base retrained in its folder
    was reused by every stage and scored as the old one): ``{ref: hash}``, the tokenizer as ``tokenizer <name>``."""
    from lightning_memdec.hf.loading import model_fingerprint
    from lightning_memdec.io.embedded import load_tokenizer
    from lightning_memdec.io.tokenizer_identity import tokenizer_fingerprint

    found = {ref: model_fingerprint(ref) for ref in models}
    return found | {f"tokenizer {tokenizer}": tokenizer_fingerprint(load_tokenizer(tokenizer))}


def tokenizer_encoding(tokenizer: str) -> str:
    """How the tokenizer turns the splits' text into ids (:func:`~io.tokenizer_identity.encoding_fingerprint`): a
    tokenizer of the same vocabulary with another normaliser or BOS rule makes other corpora."""
    from lightning_memdec.io.embedded import load_tokenizer
    from lightning_memdec.io.tokenizer_identity import encoding_fingerprint

    return encoding_fingerprint(load_tokenizer(tokenizer))


def base_names(refs: list[str]) -> dict[str, str]:
    """``{name: ref}``: a base's name is its folder's (``base-large`` for ``embedded:base-large``), with as many
    parent folders as it takes to tell it from the other bases and from the quickstart's own models (two exports in
    ``…/a/hf_model`` and ``…/b/hf_model`` are ``a-hf_model`` and ``b-hf_model``): the report's rows and the cached
    scores and stores go by these names, so two bases of one name were one (the first dropped, or a base named
    ``teacher`` scored as the teacher)."""
    parts = {ref: folder_parts(ref) for ref in refs}
    depth = dict.fromkeys(refs, 1)
    while True:
        names = {ref: "-".join(parts[ref][-depth[ref] :]) for ref in refs}
        clash = [ref for ref, name in names.items() if list(names.values()).count(name) > 1 or name in RESERVED_NAMES]
        longer = [ref for ref in clash if depth[ref] < len(parts[ref])]
        if not clash:
            return {name: ref for ref, name in names.items()}
        if not longer:
            raise ValueError(f"--base {' '.join(refs)}: give each base once (and none in a folder named only "
                             f"{' or '.join(RESERVED_NAMES)}).")  # fmt: skip
        for ref in longer:
            depth[ref] += 1


def folder_parts(ref: str) -> tuple[str, ...]:
    """A model reference's path parts, without the root (a name never starts with ``/``): a local folder's whole
    path (``./base-small`` is not ``embedded:base-small``), a hub name's or a shipped model's as written."""
    path = Path(ref.removeprefix(EMBEDDED_PREFIX))
    if not ref.startswith(EMBEDDED_PREFIX) and path.exists():
        path = path.resolve()
    return path.parts[1:] if path.is_absolute() else (path.parts or (ref,))


def parameters(ref: str) -> int:
    from lightning_memdec.hf.loading import load_causal_lm

    return sum(p.numel() for p in load_causal_lm(ref).parameters())
