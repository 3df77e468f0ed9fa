"""Embedded data shipped with the package: tokenizers, text corpora and two small base LMs (see assets/NOTICE.md)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_memdec.io.artifact_dirs import wrong_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_PREFIX = "embedded:"
SHIPPED_TOKENIZERS = ("gpt2", "gpt-neox-20b")
EMBEDDED_DOMAINS = ("general", "biomed", "law")
SPLITS = ("train", "valid", "test")
SHIPPED_MODELS = ("base-small", "base-large")
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")  # a tokenizer.json and nothing else


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a local directory, a shipped name (gpt2, gpt-neox-20b), or the hub."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.exists():
        check_tokenizer_files(path, name_or_path)
        tokenizer = tokenizer_from_directory(path)
        if len(tokenizer) < 2:  # a tokenizer_config.json alone: transformers builds its empty one-token tokenizer
            found = ", ".join(sorted(f.name for f in path.iterdir()))
            raise ValueError(
                f"tokenizer {name_or_path!r} has {len(tokenizer)} token: its directory ({found}) holds no vocabulary "
                "(tokenizer.json, vocab.json, tokenizer.model or vocab.txt); save the whole tokenizer there "
                "(tokenizer.save_pretrained)."
            )
        return tokenizer
    if name_or_path in SHIPPED_TOKENIZERS:
        return AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / name_or_path))
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # hub errors vary by version; name what the user can do instead
        raise ValueError(
            f"cannot load tokenizer {name_or_path!r}: it is neither a directory, a shipped tokenizer "
            f"{SHIPPED_TOKENIZERS}, nor reachable on the Hugging Face hub ({err})."
        ) from err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def check_tokenizer_files(path: Path, given: str) -> None:
    """A tokenizer path must be a directory holding a saved tokenizer: from any other directory transformers builds
    an empty one-token tokenizer, which would tokenize every text to nothing but end-of-text tokens."""
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return
    shadowed = (
        f" The directory {path} shadows the shipped tokenizer {given!r}: run from another directory, or give the "
        f"shipped tokenizer's path {ASSETS / 'tokenizers' / given}."
        if given in SHIPPED_TOKENIZERS
        else ""
    )
    raise ValueError(
        f"tokenizer {given!r} is {'a directory without tokenizer files' if path.is_dir() else 'a file'} "
        f"({', '.join(TOKENIZER_FILES)}); give a directory with a saved tokenizer, a shipped name "
        f"{SHIPPED_TOKENIZERS} or a hub name.{shadowed}"
    )


def tokenizer_from_directory(path: str | Path):
    """``AutoTokenizer`` of a directory, except where it would add tokens that the saved tokenizer lacks.

    transformers 5 imposes the class of config.json's model type: a Llama-3 tokenizer (saved as a generic fast
    tokenizer) beside a Qwen2 body, as the paper's cross-family decoders ship, loads as ``Qwen2Tokenizer``, which adds
    ``<|endoftext|>``, so its ids no longer match the Llama base's. A generic tokenizer is then loaded as saved.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = path / "tokenizer_config.json"
    if not config.is_file() or not (path / "tokenizer.json").is_file():
        return tokenizer
    if json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") not in GENERIC_TOKENIZER_CLASSES:
        return tokenizer
    as_saved = PreTrainedTokenizerFast.from_pretrained(str(path))
    return as_saved if len(as_saved) != len(tokenizer) else tokenizer


def embedded_text(domain: str, split: str) -> Path:
    path = ASSETS / "corpora" / domain / f"{split}.txt.xz"
    if not path.is_file():
        raise ValueError(
            f"no embedded corpus {domain}/{split}; choose a domain in {EMBEDDED_DOMAINS} and split in {SPLITS}."
        )
    return path


def resolve_text(spec: str | Path) -> Path:
    """A text path, or ``embedded:<domain>/<split>`` for a shipped corpus."""
    spec = str(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        domain, _, split = spec[len(EMBEDDED_PREFIX) :].partition("/")
        return embedded_text(domain, split)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"{wrong_path(path, 'text file', want_dir=False)} (use a path or embedded:<domain>/<split>)."
        )
    return path


def resolve_model(ref: str | Path) -> str:
    """``embedded:base-small`` / ``embedded:base-large`` → the shipped model's directory; anything else unchanged."""
    ref = str(ref)
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    name = ref[len(EMBEDDED_PREFIX) :]
    if name not in SHIPPED_MODELS:
        raise ValueError(
            f"no shipped model {name!r}; shipped ones are {[EMBEDDED_PREFIX + m for m in SHIPPED_MODELS]}."
        )
    return str(ASSETS / "models" / name)
