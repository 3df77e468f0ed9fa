"""Causal LMs and their tokenizers: load a model, find the tokenizer saved with it, count its output ids.

Every stage that takes a model by name or directory goes through here, so they agree on what a model's
tokenizer is (none, rather than the empty one transformers 5 builds from a directory without tokenizer files)
and on its vocabulary width (the LM head's rows, which may exceed the tokenizer's ids when padded).
Transformers is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path

from lightning_memdec.io.artifact_dirs import read_meta, sha256_file
from lightning_memdec.io.embedded import SHIPPED_TOKENIZERS, load_tokenizer, resolve_model, tokenizer_from_directory

__all__ = [
    "load_causal_lm",
    "causal_lm",
    "find_tokenizer",
    "tokenizer_name",
    "output_rows",
    "forward_params",
    "cache_arg_name",
    "position_ids_from_mask",
    "check_token_ids",
    "resolve_model",
    "model_fingerprint",
    "model_identity",
    "context_length",
    "check_fits_context",
    "model_config",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def load_causal_lm(name_or_path: str | Path, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` (``embedded:base-small`` etc. for the shipped bases), with an error
    naming what was asked for when it is no model."""
    from transformers import AutoModelForCausalLM

    ref = resolve_model(name_or_path)
    if Path(ref).is_file():  # transformers would try to unpickle it as a checkpoint
        raise ValueError(f"cannot load causal LM {str(name_or_path)!r}: it is a file; pass the model's directory.")
    try:
        return AutoModelForCausalLM.from_pretrained(ref, **from_pretrained_kwargs)
    except OSError as err:
        raise ValueError(
            f"cannot load causal LM {str(name_or_path)!r}: not a model directory or hub name ({err})."
        ) from err


def model_fingerprint(name_or_path: str | Path) -> str:
    """What a model is, whatever its path: a short hash of its config.json and weight files' bytes.

    Artefacts record it so a model replaced in the same directory is told apart from the old one. A hub name that
    is not a directory is identified by its repo and the commit of its cached snapshot (the hub's content hash).
    """
    ref = resolve_model(name_or_path)
    directory = Path(ref)
    digest = hashlib.sha256()
    if not directory.is_dir():
        from transformers.utils import cached_file

        try:
            snapshot = Path(cached_file(ref, "config.json")).parent
        except OSError as err:
            raise ValueError(f"cannot find model {ref!r}: not a model directory or hub name ({err}).") from err
        digest.update(f"{ref}@{snapshot.name}".encode())
        return digest.hexdigest()[:16]
    files = sorted(f for f in directory.iterdir() if f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise ValueError(f"model directory {directory} holds no weights (*.safetensors or *.bin).")
    for f in files:
        stat = f.stat()
        file_hash = _file_sha256(str(f), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        digest.update(f"{f.name}:{file_hash}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """A weight file's hash, read once per process while its inode, size and times stay the same (a model
    replaced or rewritten at its path is read again): evaluate and the GPU benchmark check one base against
    several datastores."""
    return sha256_file(path)


def causal_lm(ref, what: str, **from_pretrained_kwargs):
    """A model passed in is used as is; a name/path is loaded (so callers take either form)."""
    from transformers import PreTrainedModel

    if isinstance(ref, (str, Path)):
        return load_causal_lm(ref, **from_pretrained_kwargs)
    if not isinstance(ref, PreTrainedModel):
        raise TypeError(
            f"{what} must be a Hugging Face causal LM (PreTrainedModel) or a name/path, got {type(ref).__name__}."
        )
    return ref


def find_tokenizer(ref, model=None):
    """The tokenizer stored next to a model (its directory or hub repo), or None when there is none.

    ``ref`` is what the user gave (name, path or model); an in-memory ``model`` loaded from a local directory is
    looked up there too, never on the hub.
    """
    from transformers import AutoTokenizer

    candidates = []
    if isinstance(ref, (str, Path)):
        candidates.append(resolve_model(ref))
    name = getattr(model, "name_or_path", None) or ""
    if name and Path(name).is_dir() and name not in candidates:
        candidates.append(name)
    for candidate in candidates:
        path = Path(candidate)
        # transformers 5 builds an empty 1-token tokenizer from a directory without tokenizer files: don't let it in
        if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            continue
        if path.is_dir():  # its tokenizer files are there: one that does not load is an error, not another tokenizer
            try:
                tokenizer = tokenizer_from_directory(path)
            except Exception as err:
                raise ValueError(
                    f"the tokenizer files in {path} do not load ({type(err).__name__}: {err}); repair or remove them "
                    "(save the model's tokenizer there again with tokenizer.save_pretrained)."
                ) from err
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(candidate)
            except Exception:  # no tokenizer on the hub or in its cache; errors differ by version and source
                continue
        if len(tokenizer) > 1:
            return tokenizer
    for candidate in candidates:  # a package export without tokenizer files names a shipped tokenizer in meta.json
        shipped = _meta_tokenizer(Path(candidate))
        if shipped is not None:
            return load_tokenizer(shipped)
    return None


def _meta_tokenizer(directory: Path) -> str | None:
    meta = directory / "meta.json"
    if not meta.is_file():
        return None
    name = (read_meta(directory).get("tokenizer") or {}).get("name")
    return name if name in SHIPPED_TOKENIZERS else None


def tokenizer_name(tokenizer, fallback: str = "tokenizer") -> str:
    """A short name for messages and fingerprints: the last path component of ``name_or_path``."""
    name = getattr(tokenizer, "name_or_path", None) or fallback
    return Path(name).name or name


def output_rows(model) -> int:
    """Rows of the LM head, i.e. the width of the logits (may exceed the tokenizer when padded, as Qwen's are)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def forward_params(model) -> set[str]:
    """Argument names of ``model.forward`` (architectures differ in what they accept)."""
    return set(inspect.signature(model.forward).parameters)


def cache_arg_name(model) -> str:
    """transformers 5 calls the cache ``cache``; older/remote-code models still say ``past_key_values``."""
    params = forward_params(model)
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def check_token_ids(input_ids, vocab: int | None = None) -> None:
    """``input_ids`` must be ``[batch ≥ 1, time ≥ 1]`` integer token ids (of ``[0, vocab)`` when given): a 1-D row,
    an empty one, float ids or an id past the embeddings failed deep in the models with a bare IndexError or
    RuntimeError."""
    if input_ids.dim() != 2 or 0 in input_ids.shape or input_ids.dtype.is_floating_point or input_ids.is_complex():
        raise ValueError(f"input_ids must be [batch ≥ 1, time ≥ 1] integer token ids, got shape "
                         f"{list(input_ids.shape)} {input_ids.dtype}; add a batch dimension (ids[None]) to a single "
                         "row.")  # fmt: skip
    if vocab is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids hold {low if low < 0 else high}, not a token id of [0, {vocab}).")


def position_ids_from_mask(attention_mask, length: int):
    """Position ids ``[B, length]`` counted over real tokens, so a left-padded row is scored as if unpadded.

    Some architectures (GPT-2) count positions from the start of the row and would otherwise shift left-padded
    prompts. None when there is no 2-D mask (the model's own default then applies).
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):  # 2s would count twice, 0.5 as padding
        raise ValueError("attention_mask must hold 0 (padding) and 1 (tokens) only.")
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)[:, -length:]


def model_identity(model_or_ref) -> dict:
    """``{"name", "model_sha256"}`` of a model (a path/name, or a loaded model through its ``name_or_path``);
    the hash is None for a model that exists only in memory."""
    ref = str(getattr(model_or_ref, "name_or_path", model_or_ref) or "")
    try:
        fingerprint = model_fingerprint(ref) if ref else None
    except (ValueError, OSError):
        fingerprint = None
    return {"name": ref, "model_sha256": fingerprint}


def context_length(model) -> int | None:
    """Positions the model (or its config) attends over (``max_position_embeddings`` or GPT-2's ``n_positions``);
    None: unbounded."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_fits_context(length: int, model, what: str, setting: str = "--window") -> None:
    """``length`` positions must fit the context of ``model`` (a model or its config); checked before any work,
    since past it the position embeddings fail with a bare IndexError."""
    limit = context_length(model)
    if limit is not None and length > limit:
        raise ValueError(
            f"{setting} = {length} exceeds the context of {what}, {limit} positions; lower {setting} to at most "
            f"{limit}."
        )


def model_config(name_or_path: str | Path):
    """A model's config alone (no weights), with an error naming what was asked for when it is no model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(name_or_path))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load model {str(name_or_path)!r}: not a model directory or hub name ({err})."
        ) from err


def torch_device(device: str = "auto"):
    """``auto``: the GPU when there is one, else the CPU; anything else as torch names it (``cuda:1``, ``cpu``)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
