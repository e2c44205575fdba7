"""Loading from folders, sharded and bf16 safetensors, GGUF and short names; clear errors."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import huggingface_hub.constants
import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file
from test_models import tiny_bert, tiny_llama
from toy_models import tied_lm_logits
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flaxlora.loading import known_models, load_pretrained, to_hf
from flaxlora.loading.gguf_file import hf_name, unpermute_rows
from flaxlora.loading.registry import resolve
from flaxlora.models import RopeScaling, init_params, sequence_classifier

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_folder(folder, config: dict, tensors: dict | None = None, shards: int = 1):
    """A Hugging Face folder: config.json, safetensors (in `shards` files), MiniLM's tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if config.get("model_type") == "bert":
        for name in TOKENIZER_FILES:
            shutil.copy(resolve("minilm-l6") / name, folder)
    if tensors is None:
        return folder
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names, weight_map = sorted(tensors), {}
    for i, part in enumerate(np.array_split(names, shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def tiny():
    """(config, params) of a small random BERT classifier."""
    config = tiny_bert(num_labels=2)
    return config, init_params(sequence_classifier(config), jax.random.key(7))


def assert_same_params(actual, expected):
    actual, expected = flatten_dict(actual), flatten_dict(expected)
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg="/".join(path))


def test_known_models():
    assert set(known_models()) == {"minilm-l6", "smollm2-135m"}


def test_backbone_checkpoint_loads_and_head_is_seeded(tiny, tmp_path):
    config, params = tiny
    backbone = {k.removeprefix("bert."): v for k, v in to_hf(params).items() if k.startswith("bert.")}
    folder = write_folder(tmp_path, dataclasses.asdict(config), backbone)
    loaded = load_pretrained(folder, num_labels=2, seed=3)
    assert loaded.kind == "encoder" and loaded.config == config
    assert loaded.missing == ("classifier/bias", "classifier/kernel") and loaded.unused == ()
    assert_same_params(loaded.params["bert"], params["bert"])
    seeded = init_params(loaded.model, jax.random.key(3))["classifier"]
    assert_same_params(loaded.params["classifier"], seeded)
    again, other = load_pretrained(folder, seed=3), load_pretrained(folder, seed=4)
    assert_same_params(again.params, loaded.params)
    assert not np.allclose(other.params["classifier"]["kernel"], loaded.params["classifier"]["kernel"])


def test_sharded_checkpoint(tiny, tmp_path):
    config, params = tiny
    folder = write_folder(tmp_path, dataclasses.asdict(config), to_hf(params), shards=3)
    loaded = load_pretrained(folder)
    assert loaded.missing == ()
    assert_same_params(loaded.params, params)


def test_bfloat16_checkpoint(tiny, tmp_path):
    config, params = tiny
    folder = write_folder(tmp_path, dataclasses.asdict(config))
    save_torch_file({k: torch.tensor(v, dtype=torch.bfloat16) for k, v in to_hf(params).items()},
                    str(folder / "model.safetensors"))
    loaded = load_pretrained(folder)
    rounded = jax.tree.map(lambda x: np.asarray(x.astype("bfloat16"), np.float32), params)
    assert_same_params(loaded.params, rounded)


def test_decoder_folder(smollm2, tmp_path):
    config = tiny_llama(num_labels=2, tie_word_embeddings=True,
                        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    params = init_params(sequence_classifier(config), jax.random.key(0))
    hf_config = dataclasses.asdict(config) | {"rope_scaling": {
        "rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}}
    backbone = {k: v for k, v in to_hf(params).items() if k.startswith("model.")}
    folder = write_folder(tmp_path, hf_config, backbone | {"lm_head.weight": backbone["model.embed_tokens.weight"]})
    smollm2.tokenizer.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tokenizer_config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"padding_side": "left"}))
    loaded = load_pretrained(folder, seed=0)
    assert loaded.kind == "decoder" and loaded.config == config
    assert loaded.missing == ("score/kernel",) and loaded.unused == ("lm_head.weight",)
    assert_same_params(loaded.params, params)
    assert loaded.tokenizer.pad_token == "<|im_end|>" and loaded.tokenizer.padding_side == "right"


def test_missing_config_or_weights(tiny, tmp_path):
    config, _ = tiny
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))} has no config\.json"):
        load_pretrained(tmp_path)
    folder = write_folder(tmp_path / "no_weights", dataclasses.asdict(config))
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(folder))} has no model\.safetensors"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="short name.*minilm-l6, smollm2-135m"):
        load_pretrained("minilm-l7")


def test_unsupported_architecture(tmp_path):
    folder = write_folder(tmp_path, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="model_type='gpt2'.*GPT2LMHeadModel.*Supported"):
        load_pretrained(folder)


def test_shape_mismatch_names_tensor_and_shapes(tiny, tmp_path):
    config, params = tiny
    wrong = dataclasses.replace(config, intermediate_size=40)
    folder = write_folder(tmp_path, dataclasses.asdict(wrong), to_hf(params))
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.bias'"
                                         r".*\(48,\).*expects \(40,\)"):
        load_pretrained(folder)


def test_hub_id_offline_asks_for_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'someone/some-model'.*pass a local folder"):
        load_pretrained("someone/some-model")
    with pytest.raises(FileNotFoundError, match="'FacebookAI/roberta-large'.*pass a local folder"):
        load_pretrained("roberta-large")  # a familiar alias resolves to its hub id


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'.*llama"):
        load_pretrained(path)


def test_gguf_names_and_row_order():
    assert hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    # llama.cpp orders each head's rows as pairs (i, i + head_dim/2); here 2 heads, head_dim 4.
    rows = np.arange(8.0)[:, None] * np.ones((1, 3))
    llama_cpp = rows[[0, 2, 1, 3, 4, 6, 5, 7]]
    np.testing.assert_array_equal(unpermute_rows(llama_cpp, num_heads=2), rows)


def test_minilm(minilm):
    assert minilm.kind == "encoder" and isinstance(minilm.tokenizer, PreTrainedTokenizerFast)
    assert minilm.config.num_hidden_layers == 6 and minilm.config.hidden_size == 384
    assert minilm.missing == ("classifier/bias", "classifier/kernel")  # the file has a pooler
    checkpoint = load_file(resolve("minilm-l6") / "model.safetensors")
    np.testing.assert_array_equal(minilm.params["bert"]["pooler"]["dense"]["kernel"],
                                  checkpoint["pooler.dense.weight"].T)
    np.testing.assert_array_equal(
        minilm.params["bert"]["encoder"]["layer"]["5"]["attention"]["self"]["key"]["kernel"],
        checkpoint["encoder.layer.5.attention.self.key.weight"].T)
    assert minilm.tokenizer.padding_side == "right"


def test_minilm_tokenizer_matches_transformers(minilm, qqp_pairs):
    reference = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    first, second = map(list, zip(*qqp_pairs))
    ours, theirs = minilm.tokenizer(first, second, padding=True), reference(first, second, padding=True)
    assert len(ours["input_ids"]) == 100 and ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == theirs[key], key


def test_smollm2(smollm2):
    assert smollm2.kind == "decoder" and isinstance(smollm2.tokenizer, PreTrainedTokenizerFast)
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.rope_theta, cfg.tie_word_embeddings) == (30, 576, 9, 3, 100000.0, True)
    assert smollm2.missing == ("score/kernel",) and smollm2.unused == ()
    attention = smollm2.params["model"]["layers"]["29"]["self_attn"]
    assert attention["q_proj"]["kernel"].shape == (576, 576)
    assert attention["k_proj"]["kernel"].shape == (576, 192)
    tok = smollm2.tokenizer
    assert (tok.pad_token, tok.padding_side) == ("<|im_end|>", "right")
    batch = tok(["Is 2+2 4?", "Why?"], padding=True)
    assert batch["attention_mask"][1][-1] == 0 and batch["input_ids"][1][-1] == tok.pad_token_id
    text = "Héllo wörld, 12345 tokens\n<|im_start|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_smollm2_continues_a_prompt(smollm2):
    """A no-torch sanity check of the dequantised weights (test_parity_torch is the exact one)."""
    prompt = smollm2.tokenizer("The capital of France is")["input_ids"]
    ids, mask = np.zeros((1, len(prompt) + 2), np.int32), np.zeros((1, len(prompt) + 2), np.int32)
    ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, 1
    for n in range(len(prompt), ids.shape[1]):
        logits = tied_lm_logits(smollm2, ids, mask)
        ids[0, n], mask[0, n] = np.argmax(logits[0, n - 1]), 1
    assert smollm2.tokenizer.decode(ids[0, len(prompt):]) == " Paris."


def test_load_config_reads_the_position_limit_without_weights():
    from flaxlora.loading import load_config
    from flaxlora.models.config import BertConfig

    assert load_config("minilm-l6").max_sequence_length == 512
    assert load_config("smollm2-135m").max_sequence_length == 8192  # GGUF llama.context_length
    roberta = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=514, pad_token_id=1, model_type="roberta")
    assert roberta.max_sequence_length == 512  # positions start at pad_token_id + 1


def test_provenance_hashes_config_and_weights_with_a_cache(tmp_path, monkeypatch):
    from flaxlora.loading import base_provenance
    from flaxlora.loading.provenance import CACHE_FILE, check_same_base

    monkeypatch.setenv("FLAXLORA_CACHE_DIR", str(tmp_path / "cache"))
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    folder = write_folder(tmp_path / "model", {"model_type": "bert", "hidden_size": 8}, tensors, shards=2)
    first = base_provenance(folder)
    assert first["source"] == str(folder) and first["revision"] is None
    assert sorted(first["files"]) == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weights = folder / "model-00001-of-00002.safetensors"
    assert first["files"][weights.name] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # The cache answers while the size and mtime are unchanged ...
    cache_file = tmp_path / "cache" / CACHE_FILE
    cache = json.loads(cache_file.read_text())
    cache[str(weights.resolve())]["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(cache))
    assert base_provenance(folder)["files"][weights.name] == "f" * 64
    # ... and a changed file is hashed again.
    save_file({"a": np.zeros((2, 3), np.float32)}, weights)
    second = base_provenance(folder)
    assert second["files"][weights.name] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert second["sha256"] != first["sha256"]
    check_same_base(None, second)  # a run saved before provenance: nothing to compare
    check_same_base(second, second)
    with pytest.raises(ValueError, match=r"has sha256 .* but the run was trained on .* with sha256 .*restore that model"):
        check_same_base(first, second)
    cache_file.write_text("{not json")  # a damaged cache is rebuilt, never fatal
    assert base_provenance(folder)["sha256"] == second["sha256"]


def test_weights_load_straight_into_their_shards(tmp_path):
    """On 8 devices (fsdp=4, tensor=2), in bfloat16: each distinct shard is read from the file once
    and never a whole tensor the mesh splits; values, dtypes and shardings as the logical axes say;
    adapter init under the mesh puts residuals, extras and their Adam moments where their weights are;
    quantized codes and scales are sharded like their weights and compute what one device computes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_loading.py")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "tiny")], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result, quantized = map(json.loads, out.stdout.strip().splitlines()[-2:])
    assert quantized == {"nf4_codes_split": True, "nf4_decodes_alike": True, "quantized_codes_sharded": True,
                         "quantized_logits_close": True}
    assert result["devices"] == 8 and result["dtypes"] == ["bfloat16"] and result["split_params"] > 20
    assert result["elements_read"] == result["elements_of_distinct_shards"] == result["elements_in_file"]
    for check in ("values_equal", "shardings_as_logical_axes", "residuals_sharded_like_weights",
                  "extras_sharded_like_weights", "extras_not_in_frozen", "adam_moments_sharded", "lora_replicated",
                  "same_as_one_device"):
        assert result[check] is True, check


def test_gguf_slices_read_only_their_rows():
    """A slice of a GGUF tensor equals that slice of gguf's own dequantisation (q/k rows put back in
    Hugging Face order), for every block type in the SmolLM2 file."""
    from gguf.quants import dequantize

    from flaxlora.loading import GGUFFile

    file = GGUFFile(resolve("smollm2-135m"))
    by_type = {}
    for t in file.reader.tensors:
        by_type.setdefault((t.tensor_type, len(t.shape), "attn_q" in t.name), t)
    assert len(by_type) >= 3
    heads = file.config()["num_attention_heads"]
    for t in by_type.values():
        name = hf_name(t.name)
        whole = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if "attn_q" in t.name:
            whole = unpermute_rows(whole, heads)
        np.testing.assert_array_equal(file.read(name), whole, err_msg=name)
        index = (slice(3, 70),) if whole.ndim == 1 else (slice(5, 133), slice(64, 96))
        np.testing.assert_array_equal(file.read(name, index), whole[index], err_msg=name)
