"""Build a kNN-LM datastore: a base LM's hidden state (key) and the next token (value) for every position.

Entry ``i`` is position ``i`` of the corpus. Keys are computed over sliding windows so every entry has at
least ``window - stride + 1`` tokens of context; batches of windows are the resumable chunks, spread over
devices by :mod:`lightning_memdec.stages.chunked_predict` and kept by their ranges of windows, so a resume may use
another ``--windows.batch_size``. Each window's keys go to their global rows, whichever chunk computed them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from lightning_memdec.hf.key_capture import KeyCapture, body
from lightning_memdec.hf.loading import (
    check_fits_context,
    find_tokenizer,
    load_causal_lm,
    model_config,
    model_fingerprint,
)
from lightning_memdec.io.artifact_dirs import base_meta, is_secondary_rank, partial_dir, publish, start_work_dir
from lightning_memdec.io.capacity import allocated_bytes, check_fits, free_disk
from lightning_memdec.io.npy_rows import (
    NpyAppender,
    create_npy,
    data_offset,
    npy_file_problem,
    read_rows,
    write_rows,
)
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import KEYS, VALUES, check_finite_keys
from lightning_memdec.io.token_corpus import Corpus, position_windows
from lightning_memdec.io.tokenizer_identity import check_head_covers_vocab, check_same_tokenizer, tokenizer_info
from lightning_memdec.stages.chunk_ranges import (
    convert_number_markers,
    done_ranges,
    drop_progress,
    mark_done,
    recorded_setting,
)
from lightning_memdec.stages.chunked_predict import (
    BackgroundWriter,
    chunk_loader,
    finish_chunks,
    is_idle,
    run_sharded_predict,
)
from lightning_memdec.stages.settings import Hardware, Windows

log = logging.getLogger(__name__)
PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
VALUES_BLOCK = 1 << 22  # tokens copied into values.npy at a time (16 MiB of int32)
FIX_BASE = "use a base LM of the corpus's tokenizer, or tokenize the corpus with the base's"


class KeyExtractor(L.LightningModule):
    """Runs the base LM body over batches of windows and returns the hooked layer's output."""

    def __init__(
        self,
        model: str,
        layer: str | None,
        corpus_dir: str,
        window: int,
        stride: int,
        batch_windows: int,
        work: str,
        precision: str = "32",
    ):
        super().__init__()
        self.model_path, self.layer_path, self.precision = model, layer, precision
        self.corpus_dir, self.work = corpus_dir, Path(work)
        self.window, self.stride, self.batch_windows = window, stride, batch_windows
        self.lm = None

    def configure_model(self) -> None:
        if self.lm is None:
            self.lm = load_causal_lm(self.model_path, dtype=PRECISIONS[self.precision]).eval()
            self.capture = KeyCapture(self.lm, self.layer_path)

    @torch.inference_mode()
    def key_dim(self) -> int:
        """Width of the hooked layer's output, from a two-token forward pass."""
        with self.capture.capturing() as cap:
            body(self.lm)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device), use_cache=False)
        return int(cap.value.shape[-1])

    def predict_dataloader(self):
        corpus = Corpus(self.corpus_dir)
        windows = position_windows(corpus.num_positions, self.window, self.stride)

        def make_item(lo: int, hi: int) -> dict:
            sel = slice(lo, hi)
            starts = windows.starts[sel]
            # read, not mapped: a rank's resident set would otherwise grow to the whole token file
            ids = np.stack([read_rows(corpus.tokens, s, s + self.window).astype(np.int64) for s in starts])
            return {
                "input_ids": torch.from_numpy(ids),
                "starts": torch.from_numpy(starts),
                "score_from": torch.from_numpy(windows.score_from[sel]),
            }

        return chunk_loader(self, len(windows), self.batch_windows, self.work, make_item, unit="windows")

    @torch.inference_mode()
    def predict_step(self, batch, batch_idx):
        if is_idle(batch):
            return None
        with self.capture.capturing() as cap:
            body(self.lm)(input_ids=batch["input_ids"], use_cache=False)
        # host values only: the writer's thread must not touch device tensors (a copy there would wait for the next
        # chunk's forward, queued on the same stream)
        return {
            "lo": int(batch["lo"]),
            "hi": int(batch["hi"]),
            "keys": cap.value.to(torch.float16).cpu().numpy(),
            "starts": batch["starts"].cpu().numpy(),
            "score_from": batch["score_from"].cpu().numpy(),
        }


class KeyWriter(BackgroundWriter):
    """Writes each chunk's scored keys at their global rows of the keys file, then marks it done (on a helper thread
    while the next chunk's forward runs: see :class:`~stages.chunked_predict.BackgroundWriter`).

    Rank 0 creates the file (a sparse ``.npy`` of the final size); every rank then writes its rows with ``pwrite``
    rather than through a memory map, whose written pages would stay in the rank's resident set until the end
    (the whole keys file, 330 GB for the paper's store). ``fdatasync`` before the marker keeps a resumed run exact.
    """

    def __init__(self, work: Path, num_entries: int):
        super().__init__()
        self.work, self.num_entries = work, num_entries
        self.fd = None

    def on_predict_start(self, trainer, pl_module):
        path = self.work / KEYS
        if trainer.is_global_zero and not path.exists():
            tmp = self.work / ("tmp-" + KEYS)
            shape = (self.num_entries, pl_module.key_dim())
            create_npy(tmp, np.float16, shape)
            tmp.rename(path)
        trainer.strategy.barrier()
        dim = np.load(path, mmap_mode="r").shape[1]
        self.offset, self.row_bytes = data_offset(path), dim * 2
        self.fd = os.open(path, os.O_RDWR)
        super().on_predict_start(trainer, pl_module)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def on_predict_end(self, trainer, pl_module):
        try:
            super().on_predict_end(trainer, pl_module)
        finally:
            self.close()

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        self.close()

    def save(self, pl_module, prediction: dict) -> None:
        keys = prediction["keys"]
        for row, (start, score_from) in enumerate(
            zip(prediction["starts"].tolist(), prediction["score_from"].tolist())
        ):
            check_finite_keys(keys[row, score_from:], start + score_from, f"base LM {pl_module.model_path}")
            write_rows(self.fd, self.offset, self.row_bytes, start + score_from, keys[row, score_from:])
        os.fdatasync(self.fd)
        mark_done(self.work, int(prediction["lo"]), int(prediction["hi"]))


@exclusive_output
def build_datastore(
    corpus: Path,
    model: str,
    out: Path,
    layer: str | None = None,
    windows: Windows = Windows(),
    hardware: Hardware = Hardware(accelerator="auto"),
    precision: Literal["32", "bf16", "16"] = "32",
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Run a base causal LM over a corpus and store (key, next token) for every position.

    Args:
        corpus: corpus directory from `memdec tokenize`.
        model: base causal LM, Hugging Face name or local directory.
        out: output datastore directory.
        layer: module path whose output is the key (integers index layer lists, -1 = last; ending in ``:input``:
            the module's input); default: the input of the last block's MLP, for any decoder whose blocks have an
            MLP child (GPT-2, GPT-NeoX, Llama, Qwen, Mistral by their norm's name, as earlier versions recorded) or
            an inline one (OPT, XGLM, BioGPT: ``fc1``'s input).
        windows: the sliding windows keys are taken from; windows.batch_size is also the resumable chunk (a
            resume may use another: its finished chunks are kept).
        hardware: the ranks the windows are spread over.
        precision: weights and forward pass in float32 (``32``), ``bf16`` or ``16``. Keys are stored in fp16
            whatever the precision; bf16/fp16 halve the model's memory and run on tensor cores, at a key error of
            about 1e-2 relative (bf16 keeps 8 mantissa bits), small beside the neighbour distances it ranks.
        overwrite: replace an existing output / discard an unfinished run with other settings.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    data = Corpus(corpus)
    lm_config = model_config(model)
    check_fits_context(windows.window, lm_config, f"base LM {model}", "--windows.window")
    layer = layer or _default_layer_for(lm_config, model)
    _check_model_vocab(data, model, lm_config)
    _check_layer(lm_config, layer)
    spans = position_windows(data.num_positions, windows.window, windows.step)
    check_disk(Path(out), data.num_positions, lm_config)
    model_sha256 = model_fingerprint(model)
    run_config = {  # a resume with the weights of another model (even at the same path) is refused; the same
        "corpus": data.meta["content_sha256"],  # weights by another path (relative, absolute, a copy) resume
        "model_sha256": model_sha256,
        "layer": layer,
        "window": windows.window,
        "stride": windows.step,
        "precision": precision,  # not the batch size: a resume may use another (chunks are kept by their ranges)
    }
    work = resumed_work_dir(out, run_config, overwrite, data.num_positions, len(spans))
    extractor = KeyExtractor(
        str(model), layer, str(corpus), windows.window, windows.step, windows.batch_size, str(work), precision
    )
    writer = KeyWriter(work, data.num_positions)
    trainer = run_sharded_predict(
        extractor,
        writer,
        work,
        hardware.accelerator,
        hardware.devices,
        hardware.strategy,
        hardware.num_nodes,
        callbacks,
    )
    if not trainer.is_global_zero:
        return Path(out)
    finish_chunks(work, len(spans), "windows")
    dim = int(np.load(work / KEYS, mmap_mode="r").shape[1])
    write_values(work / VALUES, data)
    drop_progress(work)
    meta = base_meta(
        "datastore",
        model=str(model),
        model_sha256=model_sha256,
        model_type=lm_config.model_type,
        layer=layer,
        dim=dim,
        key_dtype="float16",
        precision=precision,
        num_entries=data.num_positions,
        window=windows.window,
        stride=windows.step,
        corpus=str(Path(corpus).resolve()),
        corpus_sha256=data.meta["content_sha256"],
        tokenizer=data.tokenizer,
    )
    return publish(work, out, meta)


def resumed_work_dir(out: Path, run_config: dict, overwrite: bool, num_entries: int, num_windows: int) -> Path:
    """The work directory (:func:`~io.artifact_dirs.start_work_dir`), its keys file checked by the rank that
    prepares it; the chunks of an earlier version, marked by number, first recorded by their ranges of windows, from
    the batch size it recorded."""
    work = start_work_dir(out, run_config, overwrite)
    if not is_secondary_rank():
        convert_number_markers(work, recorded_setting(work, "batch_windows"), num_windows)
        check_resumed_keys(work, num_entries)
    return work


def check_resumed_keys(work: Path, num_entries: int) -> None:
    """At a resume, keys.npy must still hold the finished chunks' rows. Missing, the run would make a new file and
    skip the marked chunks (their rows left zero); cut short, it would fail on it. Such damage comes from outside (a
    disk error, a manual cleanup: a kill leaves none, the marker follows ``fdatasync``), and its rows cannot be told
    apart, so every chunk is computed again, with a warning naming the file."""
    done = done_ranges(work)
    problem = keys_file_damage(work / KEYS, num_entries) if done else None
    if problem is None:
        return
    log.warning("%s: %s; its %d finished chunks are computed again.", work, problem, len(done))
    drop_progress(work)  # first: a kill here leaves no marker without its rows
    (work / KEYS).unlink(missing_ok=True)


def keys_file_damage(path: Path, num_entries: int) -> str | None:
    """What is wrong with a work directory's keys file (None: a whole fp16 [num_entries, d] ``.npy``)."""
    keys, problem = npy_file_problem(path)
    if problem or (keys.ndim == 2 and len(keys) == num_entries and keys.dtype == np.float16):
        return problem
    return f"{path.name} holds {keys.dtype} {keys.shape}, not float16 [{num_entries}, d]"


def write_values(path: Path, data: Corpus, block: int = VALUES_BLOCK) -> None:
    """values.npy: the next token of every position (tokens[1:] as int32), copied ``block`` tokens at a time."""
    with NpyAppender(path, np.int32, length=data.num_positions) as out:
        for lo in range(1, data.num_tokens, block):
            out.append(read_rows(data.tokens, lo, lo + block))


def check_disk(out: Path, num_entries: int, config) -> None:
    """Keys (fp16, one row of the model's hidden size per position) and values (int32) must fit the disk before a
    forward pass runs: the keys file is sparse, and a write into it on a full disk kills the run (SIGBUS)."""
    dim = getattr(config, "hidden_size", None)
    if not dim:
        return
    work = partial_dir(out)
    needed = num_entries * (2 * dim + 4) - allocated_bytes(work / KEYS) - allocated_bytes(work / VALUES)
    check_fits(
        needed,
        free_disk(out),
        f"the datastore for {num_entries:,} positions × {dim} dims (keys fp16 + values int32) in {out}",
        "free disk space or choose an --out on a larger file system; keys take N × d × 2 bytes.",
    )


def _default_layer_for(config, model: str) -> str:
    from lightning_memdec.hf.key_capture import default_key_layer_of_config

    try:
        return default_key_layer_of_config(config)
    except ValueError as err:
        raise ValueError(f"{model!r}: {err}") from None


def _check_model_vocab(data: Corpus, model: str, config) -> None:
    """The corpus's tokenizer must be the model's: same ids (when the model ships a tokenizer), ids in range."""
    tok = find_tokenizer(model)
    if tok is not None:
        info = tokenizer_info(tok, str(model))
        check_same_tokenizer(data.tokenizer, f"corpus {data.dir}", info, f"base LM {model}", FIX_BASE)
    rows = getattr(config, "vocab_size", None)
    if rows is not None:
        vocab_what = f"corpus {data.dir}'s tokenizer {data.tokenizer['name']}"
        check_head_covers_vocab(rows, f"base LM {model}", data.tokenizer["vocab_size"], vocab_what, FIX_BASE)


def _check_layer(config, layer: str) -> None:
    """Resolve the layer path on a weightless (meta-device) copy, so a typo fails before any work starts."""
    from transformers import AutoModelForCausalLM

    from lightning_memdec.hf.key_capture import resolve_layer

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    resolve_layer(skeleton, layer)
