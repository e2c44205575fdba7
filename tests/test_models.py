"""Model structure, masking, dropout and sharding annotations on small random configs."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, PartitionSpec

from flaxlora.models import (
    LOGICAL_AXIS_RULES,
    BertConfig,
    LlamaConfig,
    RopeScaling,
    config_from_hf,
    init_params,
    logical_partition_specs,
    sequence_classifier,
)


def tiny_bert(**overrides) -> BertConfig:
    return BertConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=40, num_labels=3),
                         **overrides})


def tiny_roberta(**overrides) -> BertConfig:
    return tiny_bert(model_type="roberta", pad_token_id=1, type_vocab_size=1, **overrides)


def tiny_llama(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_labels=3),
                          **overrides})


CONFIGS = {"bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama}


@functools.cache
def setup_model(config, dtype=jnp.float32):
    """(model, params, jitted model.apply), built once per config."""
    model = sequence_classifier(config, dtype=dtype)
    apply = jax.jit(model.apply, static_argnames=("deterministic", "method"))
    return model, init_params(model, jax.random.key(0)), apply


def paths(params) -> set[str]:
    return {"/".join(p) for p in flatten_dict(params)}


@pytest.mark.parametrize("name, expected", [
    ("bert", ["bert/embeddings/word_embeddings/embedding", "bert/embeddings/LayerNorm/scale",
              "bert/embeddings/token_type_embeddings/embedding",
              "bert/encoder/layer/1/attention/self/query/kernel",
              "bert/encoder/layer/1/attention/output/dense/kernel",
              "bert/encoder/layer/1/attention/output/LayerNorm/scale",
              "bert/encoder/layer/1/intermediate/dense/kernel", "bert/encoder/layer/1/output/dense/bias",
              "bert/pooler/dense/kernel", "classifier/kernel", "classifier/bias"]),
    ("roberta", ["roberta/embeddings/position_embeddings/embedding",
                 "roberta/encoder/layer/0/attention/self/value/kernel",
                 "classifier/dense/kernel", "classifier/out_proj/kernel"]),
    ("llama", ["model/embed_tokens/embedding", "model/layers/1/self_attn/q_proj/kernel",
               "model/layers/1/self_attn/k_proj/kernel", "model/layers/1/self_attn/o_proj/kernel",
               "model/layers/1/mlp/gate_proj/kernel", "model/layers/1/mlp/down_proj/kernel",
               "model/layers/1/input_layernorm/scale", "model/layers/1/post_attention_layernorm/scale",
               "model/norm/scale", "score/kernel"]),
])
def test_param_paths_mirror_hugging_face(name, expected):
    _, params, _ = setup_model(CONFIGS[name]())
    assert set(expected) <= paths(params)


def test_param_shapes_are_in_out_and_grouped_query():
    _, params, _ = setup_model(tiny_llama())
    layer = params["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (32, 16)  # 2 kv heads x head_dim 8
    assert layer["mlp"]["down_proj"]["kernel"].shape == (48, 32)
    assert "bias" not in layer["self_attn"]["q_proj"] and "bias" not in params["score"]
    _, roberta, _ = setup_model(tiny_roberta())
    assert "pooler" not in roberta["roberta"]


@pytest.mark.parametrize("name", CONFIGS)
def test_params_are_plain_arrays_with_logical_specs_for_every_leaf(name):
    model, params, _ = setup_model(CONFIGS[name]())
    leaves = flatten_dict(params)
    assert all(isinstance(v, jax.Array) for v in leaves.values())
    specs = flatten_dict(logical_partition_specs(model))
    assert specs.keys() == leaves.keys()
    known = {rule[0] for rule in LOGICAL_AXIS_RULES}
    for path, spec in specs.items():
        assert isinstance(spec, PartitionSpec) and len(spec) == leaves[path].ndim, path
        assert set(spec) <= known, (path, spec)


def test_logical_rules_map_weights_onto_a_mesh():
    model = sequence_classifier(tiny_llama())
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = flatten_dict(nn.logical_to_mesh_sharding(logical_partition_specs(model), mesh,
                                                         LOGICAL_AXIS_RULES))
    layer = ("model", "layers", "0")
    assert shardings[(*layer, "self_attn", "q_proj", "kernel")].spec == PartitionSpec("fsdp", "tensor")
    assert shardings[(*layer, "mlp", "down_proj", "kernel")].spec == PartitionSpec("tensor", "fsdp")
    assert shardings[("model", "embed_tokens", "embedding")].spec == PartitionSpec("tensor", "fsdp")
    assert shardings[("model", "norm", "scale")].spec == PartitionSpec(None)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_kernel_belongs_to_an_interceptable_dense_call(name):
    """LoRA intercepts `nn.Dense.__call__` by module path: every kernel must go through it."""
    model, params, _ = setup_model(CONFIGS[name]())
    called = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            called.add("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # traced abstractly: nothing is computed
        jax.eval_shape(functools.partial(model.apply, {"params": params}), jnp.ones((1, 4), jnp.int32))
    kernels = {p.removesuffix("/kernel") for p in paths(params) if p.endswith("/kernel")}
    assert called == kernels


def batch_with_padding(pad_id: int, extra: int):
    """Two sequences (lengths 5 and 3), right-padded with `extra` more pad tokens."""
    ids = np.array([[5, 6, 7, 8, 9], [10, 11, 12, pad_id, pad_id]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id)
    return ids, np.pad(mask, ((0, 0), (0, extra)))


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_encoder_padding_does_not_change_logits(name):
    config = CONFIGS[name]()
    _, params, apply = setup_model(config)
    short = apply({"params": params}, *batch_with_padding(config.pad_token_id, 0))
    long = apply({"params": params}, *batch_with_padding(config.pad_token_id, 6))
    np.testing.assert_allclose(short, long, atol=1e-6)
    assert short.shape == (2, 3)


def test_encoder_token_types_matter():
    _, params, apply = setup_model(tiny_bert())
    ids, mask = batch_with_padding(0, 0)
    plain = apply({"params": params}, ids, mask)
    typed = apply({"params": params}, ids, mask, (np.arange(5) > 2).astype(int)[None].repeat(2, 0))
    assert not np.allclose(plain, typed)


def test_decoder_pools_last_real_token_whatever_the_padding():
    _, params, jitted = setup_model(tiny_llama())
    apply = lambda ids, mask: jitted({"params": params}, ids, mask)
    ids, mask = batch_with_padding(0, 0)
    right = apply(ids, mask)
    np.testing.assert_allclose(right, apply(*batch_with_padding(0, 4)), atol=1e-6)
    # The second row alone, unpadded, and left-padded.
    np.testing.assert_allclose(right[1], apply(ids[1:, :3], mask[1:, :3])[0], atol=1e-6)
    left_ids, left_mask = np.array([[0, 0, 10, 11, 12]]), np.array([[0, 0, 1, 1, 1]])
    np.testing.assert_allclose(right[1], apply(left_ids, left_mask)[0], atol=1e-5)
    # Changing a padded token changes nothing; changing the last real one does.
    assert np.allclose(right, apply(np.where(mask == 1, ids, 7), mask), atol=1e-6)
    assert not np.allclose(right[1], apply(np.where(ids == 12, 13, ids), mask)[1])


def test_decoder_is_causal():
    _, params, apply = setup_model(tiny_llama())
    hidden = lambda ids: apply({"params": params}, ids, method="hidden_states")
    ids = np.array([[5, 6, 7, 8, 9]])
    changed = hidden(np.array([[5, 6, 7, 8, 30]]))
    np.testing.assert_allclose(hidden(ids)[:, :4], changed[:, :4], atol=1e-6)
    assert not np.allclose(hidden(ids)[:, 4], changed[:, 4])


@pytest.mark.parametrize("config", [tiny_bert(), tiny_roberta(), tiny_llama(attention_dropout=0.3)],
                         ids=["bert", "roberta", "llama"])
def test_dropout_only_when_not_deterministic(config):
    _, params, apply = setup_model(config)
    ids, mask = batch_with_padding(config.pad_token_id or 0, 2)

    def run(deterministic, seed=0):
        return apply({"params": params}, ids, mask, deterministic=deterministic,
                           rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(run(True), run(True, seed=1))
    assert not np.allclose(run(True), run(False))
    assert not np.allclose(run(False, seed=0), run(False, seed=1))
    np.testing.assert_array_equal(run(False, seed=2), run(False, seed=2))


@pytest.mark.parametrize("name", CONFIGS)
def test_bfloat16_compute(name):
    config = CONFIGS[name]()
    ids, mask = batch_with_padding(config.pad_token_id or 0, 0)
    _, params, apply = setup_model(config)
    _, _, apply_bf16 = setup_model(config, jnp.bfloat16)
    hidden = apply_bf16({"params": params}, ids, mask, method="hidden_states")
    assert hidden.dtype == jnp.bfloat16
    reference = apply({"params": params}, ids, mask, method="hidden_states")
    np.testing.assert_allclose(np.asarray(hidden, np.float32), reference, atol=0.1)
    stored = init_params(sequence_classifier(config, param_dtype=jnp.bfloat16), jax.random.key(0))
    assert {v.dtype for v in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}


def test_config_from_hf_reads_both_rope_spellings():
    base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, head_dim=None)
    v5 = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v5.rope_theta == 5e5 and v5.rope_scaling is None and v5.head_dim == 8
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    v4 = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": llama3}, num_labels=5)
    assert v4.rope_theta == 5e5 and v4.num_labels == 5 and v4.num_key_value_heads == 4
    assert v4.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    with pytest.raises(ValueError, match="'yarn'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_config_from_hf_rejects_unknown_architectures():
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*GPT2LMHeadModel.*bert, roberta.*llama"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        config_from_hf({**dataclasses.asdict(tiny_bert()), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act 'swish2'"):
        init_params(sequence_classifier(tiny_bert(hidden_act="swish2")), jax.random.key(0))


@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_remat_keeps_names_logits_and_gradients(kind):
    """Activation checkpointing changes what the backward pass recomputes, nothing it computes."""
    from flaxlora.models import T5Config

    config = {"bert": tiny_bert(num_labels=2), "llama": tiny_llama(num_labels=2),
              "t5": T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                             feed_forward_proj="gated-gelu")}[kind]
    ids = jax.random.randint(jax.random.key(1), (2, 7), 2, 60)
    mask = jnp.ones_like(ids).at[1, 5:].set(0)
    labels = jnp.array([0, 1])

    def loss_and_grads(remat):
        model = sequence_classifier(dataclasses.replace(config, remat=remat))
        params = init_params(model, jax.random.key(0))

        def loss(p):
            logits = model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

        return params, jax.jit(jax.value_and_grad(loss))(params)

    params, (value, grads) = loss_and_grads("none")
    for remat in ("block", "full"):
        remat_params, (remat_value, remat_grads) = loss_and_grads(remat)
        assert paths(remat_params) == paths(params)
        np.testing.assert_allclose(remat_value, value, rtol=1e-6)
        for g, h in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="remat must be one of"):
        init_params(sequence_classifier(dataclasses.replace(config, remat="some")), jax.random.key(0))


def test_attention_scores_rows_a_chunk_at_a_time_with_the_same_values_and_gradients(monkeypatch):
    """Rows scored a chunk at a time (ATTENTION_CHUNK_BYTES made one row's scores): the same output
    and gradients as the whole batch at once, and the compiled gradient's temporaries a fraction."""
    from flaxlora.models import layers

    b, s, heads, kv_heads, d = 8, 64, 4, 2, 8
    q, k, v = (jax.random.normal(key, (b, s, h, d)) for key, h in
               zip(jax.random.split(jax.random.key(0), 3), (heads, kv_heads, kv_heads)))
    mask = jnp.ones((b, 1, s), bool).at[0, 0, :5].set(False)
    loss = lambda q, k, v: jnp.sum(jnp.tanh(layers.attention(q, k, v, mask, scale=0.3)))  # noqa: E731

    def run():
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return step(q, k, v), step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert layers.attention_chunk_rows(b, heads, s, s) == b  # 512 KiB of scores: one chunk
    whole, whole_temp = run()
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", heads * s * s * 4)
    assert layers.attention_chunk_rows(b, heads, s, s) == 1 and layers.attention_chunk_rows(6, heads, s, s * 2) == 1
    chunked, chunked_temp = run()
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert chunked_temp < whole_temp / 2, (chunked_temp, whole_temp)
