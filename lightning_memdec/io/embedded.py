"""Embedded data shipped with the package: tokenizers, text corpora and two small base LMs (see assets/NOTICE.md)."""

from __future__ import annotations

from pathlib import Path

from lightning_memdec.io.artifact_dirs import wrong_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_PREFIX = "embedded:"
SHIPPED_TOKENIZERS = ("gpt2", "gpt-neox-20b")
EMBEDDED_DOMAINS = ("general", "biomed", "law")
SPLITS = ("train", "valid", "test")
SHIPPED_MODELS = ("base-small", "base-large")


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a local directory, a shipped name (gpt2, gpt-neox-20b), or the hub."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.exists():
        return AutoTokenizer.from_pretrained(str(path))
    if name_or_path in SHIPPED_TOKENIZERS:
        return AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / name_or_path))
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # hub errors vary by version; name what the user can do instead
        raise ValueError(
            f"cannot load tokenizer {name_or_path!r}: it is neither a directory, a shipped tokenizer "
            f"{SHIPPED_TOKENIZERS}, nor reachable on the Hugging Face hub ({err})."
        ) from err


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
