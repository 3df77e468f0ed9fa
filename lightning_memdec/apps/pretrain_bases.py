"""`memdec pretrain-bases`: the recipe of the small base LMs shipped with the package.

The Memory Decoder's claim is about *competent* base LMs gaining domain knowledge from a plug-in decoder.
No pretrained model can be downloaded on an offline machine, so the package ships two GPT-2-architecture
bases (real GPT-2 tokenizer, tied embeddings, ≥ 4× apart in non-embedding parameters) pretrained on general
English by the package's own training path (:func:`lightning_memdec.training.fit.fit` with ``beta: 0``). The
recipes are ``conf/experiments/embedded-base-{small,large}.yaml``; this stage tokenizes the text, trains
each base, scores general valid/test perplexity and writes it into the exported model's ``meta.json``.
Every step is skipped when already done, and an interrupted training resumes from its last checkpoint (removed once
the base is recorded).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from lightning_memdec.io.artifact_dirs import read_meta, sha256_file, write_json_atomic
from lightning_memdec.io.embedded import EMBEDDED_PREFIX, resolve_text
from lightning_memdec.io.packaged_configs import load_config
from lightning_memdec.io.token_corpus import tokenize

log = logging.getLogger(__name__)
BASE_SIZES = ("small", "large")
RECIPE = "experiments/embedded-base-{size}.yaml"
LICENCE_NOTE = (
    "Weights trained by lightning_memdec on Wikipedia text (CC BY-SA 4.0; see the package's assets/NOTICE.md); "
    "GPT-2 tokenizer (MIT, OpenAI). Research use."
)


def general_corpora(out: Path, extra_text: list[str], tokenizer: str = "gpt2") -> dict[str, Path]:
    """Tokenized general train (embedded + extra text), valid and test splits; finished ones are reused."""
    texts = {
        "train": [f"{EMBEDDED_PREFIX}general/train", *extra_text],
        "valid": [f"{EMBEDDED_PREFIX}general/valid"],
        "test": [f"{EMBEDDED_PREFIX}general/test"],
    }
    corpora = {}
    for split, text in texts.items():
        path = out / f"corpus-{split}"
        if (path / "meta.json").is_file():  # the same text (by content: an installed package's paths move)
            sources = read_meta(path, kind="corpus")["sources"]
            wanted = [resolve_text(t) if t.startswith(EMBEDDED_PREFIX) else Path(t) for t in text]
            if [s.get("sha256") for s in sources] != [sha256_file(w) if w.is_file() else None for w in wanted]:
                raise ValueError(
                    f"{path} was tokenized from {[s['path'] for s in sources]}, not from the text of {text}; use "
                    f"another --out or delete {path}."
                )
        else:
            tokenize(text, path, tokenizer)
        corpora[split] = path
    return corpora


def base_config(size: str, corpora: dict[str, Path], out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe of one base with this run's paths filled in (and ``overrides`` merged last)."""
    run = out / "runs" / f"base-{size}"
    paths = {
        "data": {"train_corpus": str(corpora["train"]), "val_corpus": str(corpora["valid"])},
        "trainer": {"default_root_dir": str(run)},
        "checkpoint": {"dirpath": str(run / "checkpoints")},
        "export": {"dirpath": str(out / f"base-{size}")},
    }
    return load_config(RECIPE.format(size=size), paths, overrides)


def general_perplexity(model_dir: Path, corpus: Path, window: int, batch_size: int = 16) -> float:
    """Sliding-window perplexity (stride window / 2) of a causal LM over a tokenized corpus (on a GPU if any)."""
    from lightning_memdec.hf.loading import load_causal_lm, torch_device
    from lightning_memdec.inference.sliding_window import corpus_gold_log_probs
    from lightning_memdec.kernels.scoring import perplexity

    model = load_causal_lm(model_dir).to(torch_device("auto"))
    return perplexity(corpus_gold_log_probs(model, corpus, window, batch_size=batch_size))


def pretrain_bases(
    out: Path = Path("runs/bases"),
    extra_text: list[str] | None = None,
    sizes: list[Literal["small", "large"]] | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    max_steps: int | None = None,
    max_time: str | None = None,
    install: bool = False,
) -> dict[str, Path]:
    """Pretrain the shipped base LMs (recipes in conf/experiments/embedded-base-*.yaml) and record their perplexity.

    Args:
        out: run directory: tokenized corpora, training runs, and one Hugging Face directory per base.
        extra_text: more general training text (e.g. ../shared/data/general-extra/train.txt) after the
            embedded general corpus.
        sizes: which bases to train (default both); separate processes may train one each.
        accelerator: Lightning accelerator (auto, gpu, cpu).
        devices: devices per training run.
        max_steps: override the recipe's step budget (for a quick trial; the shipped bases use the recipe's).
        max_time: stop training after this long ("DD:HH:MM:SS") and export what was trained so far.
        install: copy the finished bases into the package's assets (for maintainers refreshing them).
    """
    from lightning_memdec.training.fit import fit

    out = Path(out)
    corpora = general_corpora(out, list(extra_text or []))
    trained = {}
    for size in sizes or BASE_SIZES:
        overrides: dict[str, Any] = {"trainer": {"accelerator": accelerator, "devices": devices}}
        if max_steps is not None:
            overrides["trainer"]["max_steps"] = max_steps
        if max_time is not None:
            overrides["trainer"]["max_time"] = max_time
        config = base_config(size, corpora, out, overrides)
        export = Path(config["export"]["dirpath"])
        if (export / "general_perplexity.json").is_file():
            check_same_recipe(export, config)
        else:
            checkpoints = Path(config["checkpoint"]["dirpath"])
            fit(config, ckpt_path="last" if (checkpoints / "last.ckpt").is_file() else None)
            record_base(export, config, corpora)
            shutil.rmtree(checkpoints)  # they served a resume; the recorded base is the output (as in quickstart)
        trained[size] = export
        if install:
            install_base(export, size)
    return trained


def check_same_recipe(export: Path, config: dict[str, Any]) -> None:
    """A finished base is reused only for the recipe it was trained with: a rerun with another --max_steps (or
    --max_time, devices, …) kept the old base without a word."""
    recorded, asked = _dotted(read_meta(export)["recipe"]), _dotted(json.loads(json.dumps(config)))
    differ = [f"{key}: trained with {recorded.get(key)}, asked {asked.get(key)}"
              for key in sorted(set(recorded) | set(asked)) if recorded.get(key) != asked.get(key)]  # fmt: skip
    if differ:
        raise ValueError(
            f"{export} is a base trained with another recipe ({'; '.join(differ)}); use another --out, or delete "
            f"{export} and its run folder to train it anew."
        )


def _dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"trainer.max_steps": 2, …}: a nested config's leaves by their dotted names."""
    leaves = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            leaves |= _dotted(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def record_base(export: Path, config: dict[str, Any], corpora: dict[str, Path]) -> None:
    """Add the recipe, corpora and general valid/test perplexity to the exported base's meta.json."""
    window = config["data"]["window"]
    ppl = {split: general_perplexity(export, corpora[split], window) for split in ("valid", "test")}
    meta = read_meta(export, kind="memory_decoder")
    train = read_meta(corpora["train"], kind="corpus")
    meta.update(
        kind="base_lm",
        recipe=config,
        train_corpus={"num_tokens": train["num_tokens"], "sources": [Path(s["path"]).name for s in train["sources"]]},
        general_perplexity={**ppl, "window": window, "stride": window // 2},
        licence=LICENCE_NOTE,
    )
    write_json_atomic(export / "meta.json", meta)
    write_json_atomic(export / "general_perplexity.json", ppl)  # marks the base finished
    log.warning("%s: general perplexity valid %.2f, test %.2f", export.name, ppl["valid"], ppl["test"])


def install_base(export: Path, size: str) -> Path:
    """Copy a finished base into ``lightning_memdec/assets/models/base-<size>`` (``embedded:base-<size>``).

    Weights, config and meta.json only: the tokenizer is the shipped gpt2 one, which meta.json names.
    """
    from lightning_memdec.io.embedded import ASSETS

    target = ASSETS / "models" / f"base-{size}"
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp, ignore=shutil.ignore_patterns("general_perplexity.json", "tokenizer*"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
