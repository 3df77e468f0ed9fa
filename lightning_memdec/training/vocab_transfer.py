"""Cross-vocabulary transfer: a trained decoder of tokenizer A re-targeted to tokenizer B.

The paper re-initialises the embeddings and LM head at random and retrains on B's kNN targets with ~10% of
the original budget. Most of that budget re-learns rows that A already knows, so here each row of B is
initialised from A instead:

- *copied*: B's token is the same byte string as one of A's (or the same special token: eos ↔ eos, …);
- *averaged*: otherwise the mean of the A rows of B's token re-tokenised with A (unknown pieces dropped);
- *fallback*: B tokens with no A pieces (special tokens without counterpart, words A only knows as unk)
  get the mean of all A rows, the usual initialisation for new vocabulary (Hewitt, 2021).

Input embeddings and LM head are mapped separately (one mapping if they are tied); the transformer body is
kept bit for bit. ``init="random"`` reproduces the paper's re-initialisation for comparison.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lightning_memdec.io.artifact_dirs import (
    ArtifactError,
    base_meta,
    check_writable_dir,
    publish,
    read_meta,
    start_work_dir,
)
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.tokenizer_identity import tokenizer_info

SPECIAL_ROLES = ("eos", "bos", "unk", "pad", "sep", "cls", "mask")
FALLBACK_INIT = "mean of all source rows"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class VocabMapping:
    """How each target id is initialised: ``source[b]`` ≥ 0 copies one A row; else ``pieces[b]`` are averaged;
    a target id with neither falls back to the mean row."""

    source: list[int]
    pieces: list[list[int]]

    @property
    def kinds(self) -> list[str]:
        return ["copied" if s >= 0 else "averaged" if p else "fallback" for s, p in zip(self.source, self.pieces)]

    def coverage(self) -> dict:
        kinds = self.kinds
        total = len(kinds)
        out: dict = {"total": total}
        for k in ("copied", "averaged", "fallback"):
            n = kinds.count(k)
            out[k] = n
            out[f"{k}_fraction"] = n / total if total else 0.0
        return out


# -- token strings → bytes ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table used by every byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_types(tokenizer) -> set[str]:
    """Types of the fast tokenizer's decoder (flattening Sequence) — tells how vocab strings encode bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    spec = json.loads(backend.to_str()).get("decoder") or {}
    types, stack = set(), [spec]
    while stack:
        d = stack.pop()
        types.add(d.get("type"))
        stack.extend(d.get("decoders", []))
        if d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁":
            types.add("Metaspace")
    return types


def token_bytes(tokenizer) -> list[bytes | None]:
    """The byte string each id stands for (None for ids without a token).

    Byte-level BPE strings (GPT-2 'Ġ' convention) are mapped back through the byte table, SentencePiece
    strings through '▁' → space and ``<0xNN>`` byte fallback, so tokenizers of different families compare.
    Added tokens are literal text.
    """
    types = _decoder_types(tokenizer)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    out: list[bytes | None] = [None] * len(tokenizer)
    for tok, i in tokenizer.get_vocab().items():
        if i >= len(out):
            continue
        if i in added:
            out[i] = added[i].encode("utf-8")
        elif "ByteLevel" in types and all(c in _BYTE_DECODER for c in tok):
            out[i] = bytes(_BYTE_DECODER[c] for c in tok)
        elif "Metaspace" in types:
            m = _BYTE_FALLBACK.fullmatch(tok) if "ByteFallback" in types else None
            out[i] = bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode("utf-8")
        elif (
            getattr(tokenizer, "backend_tokenizer", None) is not None
            and tokenizer.backend_tokenizer.decoder is not None
        ):
            out[i] = tokenizer.backend_tokenizer.decoder.decode([tok]).encode("utf-8")
        elif getattr(tokenizer, "backend_tokenizer", None) is not None:
            out[i] = tok.encode("utf-8")
        else:  # slow tokenizer: its own token → text conversion
            out[i] = tokenizer.convert_tokens_to_string([tok]).encode("utf-8")
    return out


def special_ids(tokenizer) -> set[int]:
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids | set(tokenizer.all_special_ids)


# -- the mapping ---------------------------------------------------------------------------------------------------


def vocab_mapping(source_tokenizer, target_tokenizer) -> VocabMapping:
    """Map every id of the target tokenizer to one source id (same token) or a list of source pieces."""
    a, b = source_tokenizer, target_tokenizer
    a_bytes, b_bytes = token_bytes(a), token_bytes(b)
    a_special, b_special = special_ids(a), special_ids(b)
    a_added = set(a.added_tokens_decoder)
    # model-vocabulary tokens win over added tokens with the same bytes; the lowest id wins among equals
    by_bytes: dict[bytes, int] = {}
    for i in sorted(range(len(a_bytes)), key=lambda i: (i in a_added, i)):
        if a_bytes[i] is not None and i not in a_special:
            by_bytes.setdefault(a_bytes[i], i)
    a_special_by_content = {a.convert_ids_to_tokens(i): i for i in sorted(a_special, reverse=True)}

    source = [-1] * len(b_bytes)
    pieces: list[list[int]] = [[] for _ in b_bytes]
    to_encode: list[tuple[int, bytes]] = []
    for j, tb in enumerate(b_bytes):
        if j in b_special:
            source[j] = _special_counterpart(a, b, j, a_special_by_content)
        elif tb is not None and tb in by_bytes:
            source[j] = by_bytes[tb]
        elif tb:
            to_encode.append((j, tb))

    # re-tokenise the rest with A in one batch: valid UTF-8 runs as text, stray bytes as A's byte tokens
    texts, segments = [], []
    for j, tb in to_encode:
        for seg in _segments(tb):
            if isinstance(seg, str):
                segments.append((j, len(texts)))
                texts.append(seg)
            elif bytes([seg]) in by_bytes:
                segments.append((j, -1 - by_bytes[bytes([seg])]))
    encoded = a(texts, add_special_tokens=False)["input_ids"] if texts else []
    for j, k in segments:
        if k >= 0:
            pieces[j].extend(i for i in encoded[k] if i not in a_special)
        else:
            pieces[j].append(-1 - k)
    return VocabMapping(source=source, pieces=pieces)


def _special_counterpart(a, b, j: int, a_special_by_content: dict[str, int]) -> int:
    """A special target token copies the source special token of the same role, else of the same text."""
    for role in SPECIAL_ROLES:
        if getattr(b, f"{role}_token_id", None) == j and getattr(a, f"{role}_token_id", None) is not None:
            return getattr(a, f"{role}_token_id")
    return a_special_by_content.get(b.convert_ids_to_tokens(j), -1)


def _segments(data: bytes) -> list[str | int]:
    """Split bytes into runs of valid UTF-8 text and single invalid bytes (partial characters)."""
    out: list[str | int] = []
    run = []
    for ch in data.decode("utf-8", errors="surrogateescape"):
        if "\udc80" <= ch <= "\udcff":
            if run:
                out.append("".join(run))
                run = []
            out.append(ord(ch) - 0xDC00)
        else:
            run.append(ch)
    if run:
        out.append("".join(run))
    return out


def map_rows(source_rows: torch.Tensor, mapping: VocabMapping, num_source: int) -> torch.Tensor:
    """New rows (float32) for the target vocabulary from ``source_rows`` [V_A(+padding), …] (vectorised)."""
    rows = source_rows[:num_source].float()
    n = len(mapping.source)
    out = rows.mean(0, keepdim=True).expand(n, *rows.shape[1:]).clone()
    src = torch.as_tensor(mapping.source, dtype=torch.long)
    copied = src >= 0
    out[copied] = rows[src[copied]]
    owners = torch.as_tensor([j for j, p in enumerate(mapping.pieces) if p and mapping.source[j] < 0], dtype=torch.long)
    if len(owners):
        flat = torch.as_tensor([i for j in owners.tolist() for i in mapping.pieces[j]], dtype=torch.long)
        counts = torch.as_tensor([len(mapping.pieces[j]) for j in owners.tolist()], dtype=torch.long)
        seg = torch.repeat_interleave(torch.arange(len(owners)), counts)
        sums = torch.zeros(len(owners), *rows.shape[1:]).index_add_(0, seg, rows[flat])
        out[owners] = sums / counts.view(-1, *([1] * (rows.dim() - 1))).float()
    return out


# -- the stage -----------------------------------------------------------------------------------------------------


@exclusive_output
def transfer_vocab(
    decoder: str,
    tokenizer: str,
    out: Path,
    init: Literal["overlap", "random"] = "overlap",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Re-target a trained Memory Decoder to another tokenizer; continue it with ``memdec fit``.

    The new directory loads with ``AutoModelForCausalLM`` and B's tokenizer; its meta.json records the
    mapping coverage and ``source_global_step``, from which ``memdec fit`` sets a step budget of
    ``--budget_fraction`` (default 0.1) of the source run when ``trainer.max_steps`` is unset.

    Args:
        decoder: trained decoder directory (tokenizer A; written by ``memdec fit`` with meta.json).
        tokenizer: target tokenizer B: a directory, a shipped name (gpt2, gpt-neox-20b) or a hub name.
        out: output directory.
        init: ``overlap`` (rows from A: copied, averaged, mean fallback) or ``random`` (the paper's re-init).
        seed: seed of the random initialisation (``init=random``).
        overwrite: replace an existing ``out``.
    """
    from lightning_memdec.hf.loading import load_causal_lm, model_fingerprint

    if init not in ("overlap", "random"):
        raise ValueError(f"init must be 'overlap' or 'random', got {init!r}.")
    try:
        src_meta = read_meta(decoder, kind="memory_decoder")
    except ArtifactError as err:
        raise ArtifactError(
            f"{decoder} is not a trained Memory Decoder directory ({err}); give the Hugging Face directory that "
            "`memdec fit` exports (--export.dirpath), which holds the model, its tokenizer and meta.json."
        ) from err
    # a transferred decoder not trained since (global_step 0) passes its source's budget on
    source_step = src_meta.get("global_step") or src_meta.get("source_global_step")
    if source_step is None:
        raise ArtifactError(
            f"{decoder}/meta.json records no global_step: it is not a trained decoder (train it with `memdec fit`)."
        )
    tok_a, name_a = _source_tokenizer(Path(decoder), src_meta)
    try:
        tok_b = load_tokenizer(tokenizer)
    except Exception as err:
        raise ArtifactError(
            f"cannot load the target tokenizer {tokenizer!r} ({err}); give a tokenizer directory, "
            "a shipped name (gpt2, gpt-neox-20b) or a reachable hub name."
        ) from err
    check_writable_dir(out, "--out")  # a file there is refused now, not after the model has loaded
    if Path(out).exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --overwrite to replace it, or choose another output.")

    model = load_causal_lm(decoder, dtype="auto")
    mapping = vocab_mapping(tok_a, tok_b)
    tied = retarget_embeddings(model, mapping, tok_a, tok_b, init, seed, f"{decoder} (tokenizer {name_a})")
    _retarget_special_ids(model, tok_b)

    meta = base_meta(
        "memory_decoder",
        global_step=0,
        source_decoder=str(Path(decoder).resolve()),
        source_meta=src_meta,
        source_global_step=int(source_step),
        source_tokenizer=tokenizer_info(tok_a, name_a),
        tokenizer=tokenizer_info(tok_b, tokenizer),
        init=init,
        seed=seed,
        fallback_init=FALLBACK_INIT,
        tied_embeddings=tied,
        coverage=mapping.coverage(),
    )
    # the decoder by its weights' hash and B by its fingerprint, not their paths: a decoder retrained (or a tokenizer
    # saved) at the same path after a stop inside publish is another run, refused, not called done
    run_config = {"decoder": model_fingerprint(decoder), "tokenizer": meta["tokenizer"], "init": init, "seed": seed}
    work = start_work_dir(out, run_config, overwrite)
    model.save_pretrained(work)
    tok_b.save_pretrained(work)
    return publish(work, out, meta)


def retarget_embeddings(model, mapping: VocabMapping, tok_a, tok_b, init: str, seed: int, what: str) -> bool:
    """Resize ``model`` to B's vocabulary and fill its embedding / LM-head rows (``overlap`` or ``random``), in place.

    Returns whether input and output embeddings are tied (they stay tied).
    """
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outp is not None and outp.weight is inp.weight
    if inp.weight.shape[0] < len(tok_a):
        raise ArtifactError(
            f"{what} has {inp.weight.shape[0]} embedding rows but {len(tok_a)} tokens; "
            "the directory's tokenizer does not belong to its model."
        )
    old = {"in": inp.weight.detach().clone()}
    if outp is not None and not tied:
        old["out"] = outp.weight.detach().clone()
    if outp is not None and getattr(outp, "bias", None) is not None:
        old["bias"] = outp.bias.detach().clone()
    n_b = len(tok_b)
    if init == "overlap":
        new = {k: map_rows(v if k != "bias" else v[:, None], mapping, len(tok_a)) for k, v in old.items()}
        if "bias" in new:
            new["bias"] = new["bias"][:, 0]
    else:
        gen = torch.Generator().manual_seed(seed)
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
        new = {
            k: (torch.zeros(n_b) if k == "bias" else torch.randn(n_b, v.shape[1], generator=gen) * std)
            for k, v in old.items()
        }
    model.resize_token_embeddings(n_b, mean_resizing=False)
    with torch.no_grad():
        inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
        inp.weight.copy_(new["in"])
        if "out" in new:
            outp.weight.copy_(new["out"])
        if "bias" in new:
            outp.bias.copy_(new["bias"])
    if tied and outp.weight is not inp.weight:
        raise RuntimeError("resizing untied the embeddings of a tied model; please report this architecture.")
    return tied


def _source_tokenizer(decoder: Path, meta: dict):
    """Tokenizer A: the one saved beside the decoder, else the one its meta.json names; checked against meta."""
    recorded = meta.get("tokenizer") or {}
    if (decoder / "tokenizer.json").is_file() or (decoder / "tokenizer_config.json").is_file():
        tok, name = load_tokenizer(str(decoder)), recorded.get("name") or str(decoder)
    elif recorded.get("name"):
        tok, name = load_tokenizer(recorded["name"]), recorded["name"]
    else:
        raise ArtifactError(
            f"{decoder} holds no tokenizer and its meta.json names none; save the decoder's tokenizer into it."
        )
    fp = recorded.get("fingerprint")
    if fp is not None and tokenizer_info(tok, name)["fingerprint"] != fp:
        raise ArtifactError(
            f"the tokenizer found for {decoder} (fp {tokenizer_info(tok, name)['fingerprint'][:8]}…) is not the one "
            f"its meta.json records ({name}, fp {fp[:8]}…); restore the decoder's tokenizer files."
        )
    return tok, name


def _retarget_special_ids(model, tok) -> None:
    """bos/eos/pad ids in the config and generation config must be B's ids, not A's."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for role in ("bos", "eos", "pad"):
            if hasattr(cfg, f"{role}_token_id"):
                setattr(cfg, f"{role}_token_id", getattr(tok, f"{role}_token_id", None))


def budget_steps(model: str | None, fraction: float) -> int | None:
    """Step budget for continuing a transferred decoder: ``max(1, round(fraction × source_global_step))``.

    None when ``model`` is not a local directory holding a transferred decoder's meta.json.
    """
    if not fraction > 0:
        raise ValueError(f"budget_fraction must be > 0, got {fraction}.")
    path = Path(model) / "meta.json" if model else None
    if path is None or not path.is_file():
        return None
    step = read_meta(path.parent).get("source_global_step")
    return None if step is None else max(1, round(fraction * int(step)))
