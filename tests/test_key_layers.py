"""The datastore key of any decoder family is the input of its last block's MLP (the paper's key), found without a
table of each family's norms: checked against a pre-hook on the module a reader of each family's code names by hand,
and against the norm whose output that input is, where the block has one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_memdec.hf.key_capture import KeyCapture, default_key_layer, default_key_layer_of_config, resolve_layer
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.readers import Datastore
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.official_import import OFFICIAL_LAYER, official_key_layer
from lightning_memdec.stages.settings import Hardware, Windows

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
GPT_STYLE = dict(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64)
MOE = dict(num_key_value_heads=2, num_local_experts=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
# model type, its config beyond SMALL, the module whose input the key is (by hand, from the family's code), and the
# norm whose output that input is (None: post-norm, the MLP reads the residual stream)
FAMILIES = [
    ("gemma2", {"head_dim": 16, "num_key_value_heads": 2}, "model.layers.1.mlp",
     "model.layers.1.pre_feedforward_layernorm"),
    ("gemma3_text", {"head_dim": 16, "num_key_value_heads": 2}, "model.layers.1.mlp",
     "model.layers.1.pre_feedforward_layernorm"),
    ("phi", {}, "model.layers.1.mlp", "model.layers.1.input_layernorm"),  # parallel attention and MLP
    ("phi3", {"num_key_value_heads": 2}, "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"),
    ("mixtral", MOE, "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"),
    ("qwen3_moe", MOE | {"head_dim": 16}, "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"),
    ("olmo2", {"num_key_value_heads": 2}, "model.layers.1.mlp", None),
    ("stablelm", {"use_parallel_residual": True, "num_key_value_heads": 2}, "model.layers.1.mlp",
     "model.layers.1.input_layernorm"),
    ("cohere", {"num_key_value_heads": 2}, "model.layers.1.mlp", "model.layers.1.input_layernorm"),
    ("falcon", {"num_kv_heads": 2}, "transformer.h.1.mlp", "transformer.h.1.input_layernorm"),  # parallel
    ("gptj", GPT_STYLE | {"rotary_dim": 8}, "transformer.h.1.mlp", "transformer.h.1.ln_1"),
    ("bloom", {"n_layer": 2, "n_head": 2}, "transformer.h.1.mlp", "transformer.h.1.post_attention_layernorm"),
    ("mpt", {"d_model": 32, "n_heads": 2, "n_layers": 2}, "transformer.blocks.1.ffn", "transformer.blocks.1.norm_2"),
    ("recurrent_gemma", {"num_key_value_heads": 2, "lru_width": 32, "head_dim": 16, "attention_window_size": 16,
                         "block_types": ["recurrent", "attention"]}, "model.layers.1.mlp_block",
     "model.layers.1.channel_pre_norm"),
    # get_decoder() is the LM head: the blocks are found in the whole model
    ("modernbert-decoder", {"global_attn_every_n_layers": 1, "cls_token_id": 3, "sep_token_id": 4},
     "model.layers.1.mlp", "model.layers.1.mlp_norm"),
    # an inline MLP (fc1 -> activation -> fc2): its first projection's input
    ("xglm", {"d_model": 32, "ffn_dim": 64, "num_layers": 2, "attention_heads": 2}, "model.layers.1.fc1",
     "model.layers.1.final_layer_norm"),
    ("biogpt", {}, "biogpt.layers.1.fc1", "biogpt.layers.1.final_layer_norm"),
]  # fmt: skip


def tiny(model_type: str, extra: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def inputs_and_outputs(model, ids, input_of: str, output_of: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: the named module's first input (a pre-hook) and the norm's output (a hook), by hand."""
    seen = {}

    def keep(name):
        def hook(module, args, out=None):  # returns None: the module runs on its own arguments
            seen[name] = args[0] if out is None else out

        return hook

    hooks = [resolve_layer(model, input_of).register_forward_pre_hook(keep("in"))]
    if output_of is not None:
        hooks.append(resolve_layer(model, output_of).register_forward_hook(keep("norm")))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen["in"], seen.get("norm")


@pytest.mark.parametrize("model_type, extra, mlp, norm", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_the_default_key_of_a_family_without_a_table_entry_is_its_last_mlp_input(model_type, extra, mlp, norm):
    model = tiny(model_type, extra)
    layer = default_key_layer(model)
    assert layer.endswith(":input") and default_key_layer_of_config(model.config) == layer  # weights or a skeleton
    ids = torch.randint(3, 128, (2, 12))
    capture = KeyCapture(model, layer)
    with torch.no_grad(), capture.capturing():
        model(ids)
    expected, normed = inputs_and_outputs(model, ids, mlp, norm)
    assert capture.value.shape == (2, 12, 32)
    torch.testing.assert_close(capture.value, expected, rtol=0, atol=0)
    if normed is not None:
        torch.testing.assert_close(capture.value, normed, rtol=0, atol=0)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_opt_whose_mlp_reads_flattened_rows_is_keyed_by_position(norm_first):
    """OPT flattens its hidden states to ``[B*T, d]`` before the MLP: the key is fc1's input viewed back as
    ``[B, T, d]``, row b*T + t at position (b, t). Pre-norm (125m, 1.3b, ...): the final layer norm's output;
    post-norm (350m): the attention's norm output, which is ``[B, T, d]`` itself."""
    extra = {"ffn_dim": 64, "word_embed_proj_dim": 32, "do_layer_norm_before": norm_first}
    model = tiny("opt", extra)
    layer = default_key_layer(model)
    assert layer == "model.decoder.layers.-1.fc1:input" == default_key_layer_of_config(model.config)
    ids = torch.randint(3, 128, (3, 12))
    capture = KeyCapture(model, layer)
    with torch.no_grad(), capture.capturing():
        model(ids)
    norm = "final_layer_norm" if norm_first else "self_attn_layer_norm"
    rows, normed = inputs_and_outputs(model, ids, "model.decoder.layers.1.fc1", f"model.decoder.layers.1.{norm}")
    assert rows.shape == (36, 32) and capture.value.shape == (3, 12, 32)
    torch.testing.assert_close(capture.value, rows.reshape(3, 12, 32), rtol=0, atol=0)
    torch.testing.assert_close(capture.value, normed.reshape(3, 12, 32), rtol=0, atol=0)


def test_the_families_of_the_table_keep_their_norm_which_is_the_same_tensor():
    """Earlier versions recorded GPT-2's and Llama's norm by name: kept (their datastores stay valid), and equal to the
    generic capture of their MLP's input."""
    ids = torch.randint(3, 128, (1, 10))
    for model_type, extra, mlp in [("gpt2", GPT_STYLE, "transformer.h.-1.mlp:input"),
                                   ("llama", {"num_key_value_heads": 2}, "model.layers.-1.mlp:input")]:  # fmt: skip
        model = tiny(model_type, extra)
        named, generic = KeyCapture(model), KeyCapture(model, mlp)
        assert not named.layer.endswith(":input")
        with torch.no_grad(), named.capturing(), generic.capturing():
            model(ids)
        torch.testing.assert_close(named.value, generic.value, rtol=0, atol=0)


def test_an_image_text_model_is_keyed_in_its_language_model_not_its_vision_tower():
    """Gemma 3's 4B-27B checkpoints load as an image-text model whose first list of blocks is the vision tower's,
    which a text forward never runs (the datastore found no key); the key is the text decoder's last MLP input."""
    from transformers import Gemma3Config

    text = dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        sliding_window=32,
    )
    vision = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=120,
                          boi_token_index=121, eoi_token_index=122)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    layer = default_key_layer_of_config(config)
    assert layer == default_key_layer(model) == "model.language_model.layers.-1.mlp:input"
    ids = torch.randint(3, 110, (1, 10))
    capture = KeyCapture(model, layer)
    with torch.no_grad(), capture.capturing():
        model(ids)
    expected, normed = inputs_and_outputs(model, ids, "model.language_model.layers.1.mlp",
                                          "model.language_model.layers.1.pre_feedforward_layernorm")  # fmt: skip
    torch.testing.assert_close(capture.value, expected, rtol=0, atol=0)
    torch.testing.assert_close(capture.value, normed, rtol=0, atol=0)


def test_a_model_without_blocks_of_an_mlp_is_refused_with_the_layer_syntax():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"pass --layer .* end it in ':input' for its input"):
        default_key_layer(model)


def test_official_import_records_the_layer_its_kNN_LM_can_capture():
    olmo2 = AutoConfig.for_model("olmo2", **SMALL, num_key_value_heads=2)
    assert official_key_layer(olmo2) == "model.layers.-1.mlp:input" and official_key_layer(None) == OFFICIAL_LAYER


END_TO_END = [  # model type, its config beyond SMALL, its key layer, the module whose input that is (its last block's)
    ("olmo2", {"num_key_value_heads": 2}, "model.layers.-1.mlp:input", "model.layers.1.mlp"),  # post-norm
    ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}, "model.decoder.layers.-1.fc1:input",
     "model.decoder.layers.1.fc1"),  # flattened rows
]  # fmt: skip


@pytest.mark.parametrize("model_type, extra, layer, module", END_TO_END, ids=[f[0] for f in END_TO_END])
def test_a_base_keyed_without_a_norm_builds_a_datastore_and_a_knnlm_queries_it(
    tmp_path, biomed_corpus, model_type, extra, layer, module
):
    """OLMo 2 (post-norm: no norm's output is its MLP's input) and OPT (its MLP reads ``[B*T, d]`` rows) end to end:
    keys are the MLP's input at each position; kNN-LM hooks the same layer and finds its dimension."""
    from lightning_memdec.io.embedded import load_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(SMALL | {"vocab_size": 50257}), **extra)
    model_dir = tmp_path / model_type
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    load_tokenizer("gpt2").save_pretrained(model_dir)
    windows = Windows(window=64, stride=64, batch_size=4)
    store = Datastore(build_datastore(biomed_corpus, str(model_dir), tmp_path / "ds", windows=windows,
                                      hardware=Hardware(accelerator="cpu")))  # fmt: skip
    assert store.meta["layer"] == layer
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.as_tensor(Corpus(biomed_corpus).window_ids(0, 64), dtype=torch.long)[None]
    expected, _ = inputs_and_outputs(model, ids, module, None)
    got = np.asarray(store.keys[:63], dtype=np.float32)
    np.testing.assert_allclose(got, expected.reshape(64, 32)[:63].numpy(), rtol=2e-3, atol=2e-3)  # stored in fp16
    knnlm = KNNLM(str(model_dir), store.dir, search="exact")
    assert knnlm.capture.layer == store.meta["layer"]
    with torch.no_grad(), knnlm.capture.capturing() as capture:
        knnlm.base(ids)
    assert capture.value.shape == (1, 64, 32)  # the queries of a live kNN-LM: one per position


@pytest.mark.parametrize(
    "model_type, extra, layer",
    [("gpt2", GPT_STYLE, "transformer.h.-1.attn"), ("llama", {"num_key_value_heads": 2}, "model.layers.-1.self_attn")],
    ids=["gpt2", "llama"],
)
def test_a_hand_layer_whose_module_returns_a_tuple_captures_its_first_element(model_type, extra, layer):
    """An attention module returns (hidden states, weights, ...): a --layer naming it keys the datastore with its
    hidden states, ``[B, T, d]``, as a forward hook on that module sees them by hand, not with the whole tuple."""
    model = tiny(model_type, extra)
    ids = torch.randint(3, 128, (2, 7))
    seen = {}
    hook = resolve_layer(model, layer).register_forward_hook(lambda module, args, out: seen.setdefault("out", out))
    capture = KeyCapture(model, layer)
    with torch.no_grad(), capture.capturing():
        model(ids)
    hook.remove()
    assert isinstance(seen["out"], tuple)  # the case under test: the module's output is a tuple
    assert torch.is_tensor(capture.value) and capture.value.shape == (2, 7, 32)
    torch.testing.assert_close(capture.value, seen["out"][0], rtol=0, atol=0)
