import json
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch
from conftest import save_tiny

from lightning_memdec.hf.key_capture import DEFAULT_KEY_LAYERS, resolve_layer
from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.token_corpus import Corpus, position_windows, tokenize
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, KNNTargets, Windows


class SimulatedKill(Exception):
    pass


class Interrupt(L.Callback):
    """Simulates a kill after a chosen number of chunks."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def on_predict_batch_end(self, *args, **kwargs):
        self.seen += 1
        if self.seen == self.after:
            raise SimulatedKill(f"killed after chunk {self.seen}")


def mlp_inputs(model_dir, arch_path, ids):
    """The last block's MLP input, captured independently with a pre-hook on the full LM."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = {}
    mlp = resolve_layer(model, arch_path)
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.as_tensor(ids)[None])
    handle.remove()
    return seen["x"][0].numpy()


def test_keys_equal_the_last_mlp_input_and_values_are_next_tokens(biomed_datastore, biomed_corpus, tiny_gpt2):
    store, corpus = Datastore(biomed_datastore), Corpus(biomed_corpus)
    assert len(store) == corpus.num_tokens - 1 and store.dim == 32
    np.testing.assert_array_equal(store.values, np.asarray(corpus.tokens[1:], dtype=np.int32))
    win = position_windows(corpus.num_positions, 64, 32)
    for j in [0, 1, len(win) // 2, len(win) - 1]:
        expected = mlp_inputs(tiny_gpt2, "transformer.h.-1.mlp", corpus.window_ids(win.starts[j], 64))
        pos = win.scored_positions(j)
        got = np.asarray(store.keys[pos], dtype=np.float32)
        np.testing.assert_allclose(got, expected[pos - win.starts[j]], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "arch,mlp",
    [("gpt_neox", "gpt_neox.layers.-1.mlp")]
    + [(a, "model.layers.-1.mlp") for a in ("llama", "qwen2", "qwen3", "mistral")],
)
def test_default_layer_for_other_architectures(tmp_path, biomed_corpus, arch, mlp):
    model = save_tiny(tmp_path / arch, arch=arch)
    out = build_datastore(
        biomed_corpus,
        str(model),
        tmp_path / "ds",
        windows=Windows(window=64, stride=64, batch_size=8),
        hardware=Hardware(accelerator="cpu"),
    )
    store = Datastore(out)
    assert store.meta["layer"] == DEFAULT_KEY_LAYERS[arch]
    ids = Corpus(biomed_corpus).window_ids(0, 64)
    np.testing.assert_allclose(
        np.asarray(store.keys[:64], dtype=np.float32), mlp_inputs(model, mlp, ids), rtol=2e-3, atol=2e-3
    )


def test_custom_layer_path_and_unknown_layer(tmp_path, biomed_corpus, tiny_gpt2):
    out = build_datastore(
        biomed_corpus,
        str(tiny_gpt2),
        tmp_path / "ds",
        layer="transformer.h.0.ln_1",
        windows=Windows(window=64, stride=64),
        hardware=Hardware(accelerator="cpu"),
    )
    assert Datastore(out).meta["layer"] == "transformer.h.0.ln_1"
    with pytest.raises(ValueError, match="unknown layer path 'transformer.h.0.nope'"):
        build_datastore(
            biomed_corpus,
            str(tiny_gpt2),
            tmp_path / "bad",
            layer="transformer.h.0.nope",
            windows=Windows(window=64, stride=64),
        )
    assert not (tmp_path / "bad").exists() and not partial_dir(tmp_path / "bad").exists()


def test_resume_after_kill_gives_identical_bytes(tmp_path, monkeypatch, biomed_corpus, tiny_gpt2, biomed_datastore):
    """Killed while the writer's thread is still writing keys (slowed down): the run waits for them, so the five
    chunks computed are all saved and marked, and the resumed run gives the same bytes."""
    import lightning_memdec.stages.datastore as stage

    out = tmp_path / "ds"
    kwargs = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))
    write = stage.write_rows
    monkeypatch.setattr(stage, "write_rows", lambda *a: time.sleep(0.05) or write(*a))
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=5)], **kwargs)
    assert not out.exists() and partial_dir(out).exists()
    assert len(list((partial_dir(out) / "progress").iterdir())) == 5
    monkeypatch.undo()
    build_datastore(biomed_corpus, str(tiny_gpt2), out, **kwargs)
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()
    assert not partial_dir(out).exists()


def test_resume_with_other_settings_is_refused(tmp_path, biomed_corpus, tiny_gpt2):
    out = tmp_path / "ds"
    with pytest.raises(SimulatedKill):
        build_datastore(
            biomed_corpus,
            str(tiny_gpt2),
            out,
            callbacks=[Interrupt(1)],
            windows=Windows(window=64, stride=32),
            hardware=Hardware(accelerator="cpu"),
        )
    with pytest.raises(ArtifactError, match="different settings"):
        build_datastore(
            biomed_corpus,
            str(tiny_gpt2),
            out,
            windows=Windows(window=64, stride=16),
            hardware=Hardware(accelerator="cpu"),
        )


def test_a_resume_with_the_same_weights_by_another_path_resumes(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore):
    """The weights' hash names the model: a copy of it (or an absolute path for a relative one) is the same model, so
    its finished chunks are kept (the path string in the run settings refused it; the user lost every chunk)."""
    import shutil

    out, copy = tmp_path / "ds", shutil.copytree(tiny_gpt2, tmp_path / "copy-of-the-model")
    kwargs = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=3)], **kwargs)
    counted = Interrupt(after=10**9)  # counts the chunks the resumed run computes
    build_datastore(biomed_corpus, str(copy), out, callbacks=[counted], **kwargs)
    chunks = -(-len(position_windows(Corpus(biomed_corpus).num_positions, 64, 32)) // 4)
    assert chunks > 3 and counted.seen == chunks - 3  # the three finished chunks were kept
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()


def test_tokenizer_mismatch_and_small_corpus_are_refused(tmp_path, tiny_gpt2):
    text = tmp_path / "a.txt"
    text.write_text("A short text about proteins and cells.\n\nAnother short one.")
    neox = tokenize([str(text)], tmp_path / "neox", "gpt-neox-20b")
    with pytest.raises(ArtifactError, match="gpt-neox-20b .*gpt2tiny|tokenizer gpt-neox-20b"):
        build_datastore(neox, str(tiny_gpt2), tmp_path / "ds", windows=Windows(window=4, stride=2))
    small = tokenize([str(text)], tmp_path / "gpt2", "gpt2")
    with pytest.raises(ArtifactError, match="fewer than one window"):
        build_datastore(small, str(tiny_gpt2), tmp_path / "ds", windows=Windows(window=64, stride=32))
    assert not (tmp_path / "ds").exists() and not partial_dir(tmp_path / "ds").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("batch_windows", [4, 1000])  # 1000: one chunk, so the second rank has no work
def test_ddp_two_processes_give_the_same_files(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore, batch_windows):
    out = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "lightning_memdec",
        "build-datastore",
        "--corpus",
        str(biomed_corpus),
        "--model",
        str(tiny_gpt2),
        "--out",
        str(out),
        "--windows.window",
        "64",
        "--windows.stride",
        "32",
        "--windows.batch_size",
        str(batch_windows),
        "--hardware.accelerator",
        "cpu",
        "--hardware.devices",
        "2",
        "--hardware.strategy",
        "ddp",
    ]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()


def test_bf16_precision_keys_close_to_fp32_and_recorded(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore):
    out = build_datastore(
        biomed_corpus, str(tiny_gpt2), tmp_path / "bf16", precision="bf16", windows=Windows(window=64, stride=32)
    )
    store, ref = Datastore(out), Datastore(biomed_datastore)
    assert store.meta["precision"] == "bf16" and store.keys.dtype == np.float16
    np.testing.assert_array_equal(store.values, ref.values)
    keys, want = np.asarray(store.keys, dtype=np.float32), np.asarray(ref.keys, dtype=np.float32)
    assert not np.array_equal(keys, want)  # the forward pass really ran in bf16
    np.testing.assert_allclose(keys, want, rtol=0.05, atol=0.05)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.bfloat16).eval()  # the first window by hand
    seen = []
    model.transformer.h[-1].ln_2.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.as_tensor(np.asarray(Corpus(biomed_corpus).tokens[:64], dtype=np.int64))[None])
    np.testing.assert_array_equal(store.keys[:64], seen[0][0].to(torch.float16).numpy())  # bf16's, not fp16's
    with pytest.raises(ValueError, match="precision must be one of"):
        build_datastore(biomed_corpus, str(tiny_gpt2), tmp_path / "bad", precision="fp8")


def test_model_identity_is_its_weights_not_its_path(tmp_path, biomed_corpus):
    """A model replaced in the same directory: the resumed datastore is refused, and a stale index of the old
    datastore is refused by build-targets; the recorded hash is the hash of config.json + weights."""
    import hashlib

    from lightning_memdec.hf.loading import model_fingerprint
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.targets import build_targets

    model = save_tiny(tmp_path / "model", seed=1)
    files = sorted([model / "config.json", model / "model.safetensors"])
    lines = "".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    assert model_fingerprint(str(model)) == hashlib.sha256(lines.encode()).hexdigest()[:16]
    kwargs = dict(windows=Windows(window=64, stride=32), hardware=Hardware(accelerator="cpu"))
    store = build_datastore(biomed_corpus, str(model), tmp_path / "ds", **kwargs)
    assert Datastore(store).meta["model_sha256"] == model_fingerprint(str(model))
    index = build_index(store, tmp_path / "index", plan=IndexSettings(factory="Flat"))
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(model), tmp_path / "ds2", callbacks=[Interrupt(1)], **kwargs)

    save_tiny(tmp_path / "model", seed=2)  # another model, same path
    with pytest.raises(ArtifactError, match="different settings"):
        build_datastore(biomed_corpus, str(model), tmp_path / "ds2", **kwargs)
    from lightning_memdec.inference.knnlm import KNNLM

    with pytest.raises(ValueError, match=r"\(sha [0-9a-f]{16}\), but the base LM .* has other weights"):
        KNNLM(str(model), store, search="exact")  # its queries would search the old model's keys (audit 4)
    build_datastore(biomed_corpus, str(model), store, overwrite=True, **kwargs)
    KNNLM(str(model), store, search="exact")  # rebuilt with this model: accepted
    with pytest.raises(ArtifactError, match=f"index {index} was built over"):
        build_targets(store, index, tmp_path / "targets", knn=KNNTargets(k=8))
    assert not partial_dir(tmp_path / "targets").exists()


def test_a_copy_of_the_base_in_another_folder_is_taken_without_a_warning(tmp_path, biomed_datastore, tiny_gpt2):
    """The datastore's recorded hash vouches for a copy of its base saved elsewhere (evaluate pairs such a copy by
    that hash): no "keys only match when the weights do" warning; a model of other weights is refused as before."""
    import shutil
    import warnings

    from lightning_memdec.inference.knnlm import KNNLM

    copy = shutil.copytree(tiny_gpt2, tmp_path / "my-base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        KNNLM(str(copy), biomed_datastore, search="exact")
    meta = json.loads((biomed_datastore / "meta.json").read_text())
    unhashed = shutil.copytree(biomed_datastore, tmp_path / "earlier")  # an earlier version's store: no hash
    (unhashed / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model_sha256"}))
    with pytest.warns(UserWarning, match="but the base LM is .*my-base: keys only match when the weights do"):
        KNNLM(str(copy), unhashed, search="exact")
    with pytest.raises(ValueError, match="has other weights"):
        KNNLM(str(save_tiny(tmp_path / "other", seed=3)), biomed_datastore, search="exact")


def test_window_past_the_model_context_is_refused_before_any_work(tmp_path, biomed_corpus, tiny_gpt2):
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match=r"--windows.window = 1024 exceeds the context of base LM .*gpt2-tiny, 512"):
        build_datastore(
            biomed_corpus,
            str(tiny_gpt2),
            out,
            windows=Windows(window=1024, stride=512),
            hardware=Hardware(accelerator="cpu"),
        )
    assert not partial_dir(out).exists() and not out.exists()


def test_nan_keys_are_refused_where_they_are_made_and_before_indexing(tmp_path, biomed_corpus, biomed_datastore):
    """A model whose key layer gives NaN fails the datastore at its first chunk; a datastore holding a NaN key
    (built before this check) fails build-index naming the datastore and the position, not the search later."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lightning_memdec.retrieval.faiss_index import build_index

    model_dir = save_tiny(tmp_path / "nan-model", seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.h[-1].ln_2.weight.fill_(float("nan"))  # the last MLP's input: the default key layer
    model.save_pretrained(model_dir)
    with pytest.raises(ArtifactError, match=rf"base LM {model_dir}: \d+ keys are NaN or inf, the first at position 0"):
        build_datastore(
            biomed_corpus,
            str(model_dir),
            tmp_path / "ds",
            windows=Windows(window=64, stride=32),
            hardware=Hardware(accelerator="cpu"),
        )
    assert not (tmp_path / "ds").exists()

    store = tmp_path / "store"
    shutil.copytree(biomed_datastore, store)
    keys = np.load(store / "keys.npy", mmap_mode="r+")
    keys[123, 5] = np.inf
    keys.flush()
    del keys
    with pytest.raises(ArtifactError, match=rf"datastore {store}: 1 keys are NaN or inf, the first at position 123"):
        build_index(store, tmp_path / "index", plan=IndexSettings(factory="Flat"))


class HostOutputsOnly(L.Callback):
    """Records whether every chunk's prediction holds host values only (what the writer's helper thread reads)."""

    def __init__(self):
        self.types = set()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.types |= {type(v) for v in (outputs or {}).values()}


def test_predictions_hold_host_values_only(tmp_path, biomed_corpus, tiny_gpt2):
    seen = HostOutputsOnly()
    kwargs = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))
    build_datastore(biomed_corpus, str(tiny_gpt2), tmp_path / "ds", callbacks=[seen], **kwargs)
    assert seen.types == {int, np.ndarray}


class CountComputed(L.Callback):
    def __init__(self):
        self.computed = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.computed += outputs is not None


def test_a_kill_after_every_chunk_resumes_without_recomputing_them(
    tmp_path, monkeypatch, biomed_corpus, tiny_gpt2, biomed_datastore
):
    """Killed while writing values (after all keys): the rerun computes no chunk again and gives identical bytes."""
    import lightning_memdec.stages.datastore as stage

    out = tmp_path / "ds"
    kwargs = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))
    monkeypatch.setattr(stage, "write_values", lambda *a: (_ for _ in ()).throw(SimulatedKill("writing values")))
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, **kwargs)
    monkeypatch.undo()
    counter = CountComputed()
    build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[counter], **kwargs)
    assert counter.computed == 0
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()


def test_a_models_weights_are_hashed_once_per_process_until_they_change(tmp_path, monkeypatch):
    """KNNLM checks its base's hash against each datastore's, so its weights were read again for every KNNLM (the
    GPU benchmark builds three over one base); a model rewritten at its path is still read again."""
    import lightning_memdec.hf.loading as loading

    reads = []
    monkeypatch.setattr(loading, "sha256_file", lambda path: reads.append(path) or f"hash of {path}")
    model = save_tiny(tmp_path / "model", seed=1)
    first = loading.model_fingerprint(str(model))
    assert loading.model_fingerprint(str(model)) == first and len(reads) == 2  # config.json and the weights
    save_tiny(tmp_path / "model", seed=2)
    loading.model_fingerprint(str(model))
    assert len(reads) == 4


def test_a_lowered_window_alone_takes_half_of_it_as_stride(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore):
    """`--windows.window 64` without a stride: the default stride follows the window (half of it, as the paper's
    512 of 1024); it was a fixed 512 and refused any window under it."""
    from lightning_memdec.cli import main

    out = tmp_path / "ds"
    main(["build-datastore", "--corpus", str(biomed_corpus), "--model", str(tiny_gpt2), "--out", str(out),
          "--windows.window", "64", "--windows.batch_size", "4", "--hardware.accelerator", "cpu"])  # fmt: skip
    for name in ("keys.npy", "values.npy"):
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()  # built with stride 32
    assert Windows(window=7).step == 3 and Windows(window=1).step == 1 and Windows().step == 512


@pytest.mark.parametrize("block", [64, 100, 1 << 22])
def test_values_are_the_next_tokens_whatever_the_copy_s_block(tmp_path, biomed_corpus, block):
    """values.npy is copied a block of tokens at a time (4 Mi tokens: a real corpus spans several blocks, every test
    corpus one); each block size gives tokens[1:] exactly."""
    from lightning_memdec.stages.datastore import write_values

    corpus = Corpus(biomed_corpus)
    write_values(tmp_path / "values.npy", corpus, block=block)
    np.testing.assert_array_equal(np.load(tmp_path / "values.npy"), np.asarray(corpus.tokens[1:], dtype=np.int32))
