import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import TOY_IN_AXES, perturb_b, toy_setup

import flaxlora

TARGETS = r"(query|key|value|out|ffn|head)/kernel$"


def scale_magnitudes(lora, factor=1.3):
    return jax.tree_util.tree_map_with_path(lambda p, m: m * factor if p[-1].key == "magnitude" else m, lora)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(scaling="rslora"), dict(use_dora=True), dict(use_dora=True, scaling="rslora")],
    ids=["standard", "rslora", "dora", "dora-rslora"],
)
def test_factored_equals_merged(options):
    model, params, x = toy_setup()
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, in_axes=TOY_IN_AXES, **options)
    lora = scale_magnitudes(perturb_b(flaxlora.init_lora(params, config, jax.random.key(0))))
    merged = model.apply({"params": flaxlora.apply_lora(params, lora, config)}, x)
    factored = flaxlora.apply_factored(model, {"params": params}, lora, config, x)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(factored, model.apply({"params": params}, x), atol=1e-3)


def test_factored_gradients_equal_merged_gradients():
    model, params, x = toy_setup()
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, in_axes=TOY_IN_AXES, use_dora=True)
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    merged_loss = lambda l: jnp.sum(model.apply({"params": flaxlora.apply_lora(params, l, config)}, x) ** 2)
    factored_loss = lambda l: jnp.sum(flaxlora.apply_factored(model, {"params": params}, l, config, x) ** 2)
    g_merged, g_factored = jax.grad(merged_loss)(lora), jax.grad(factored_loss)(lora)
    for gm, gf in zip(jax.tree.leaves(g_merged), jax.tree.leaves(g_factored)):
        np.testing.assert_allclose(gf, gm, rtol=1e-4, atol=1e-5)


def test_factored_under_jit_with_variables_dict_adapter():
    model, params, x = toy_setup()
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, in_axes=TOY_IN_AXES)
    lora = perturb_b(flaxlora.init_lora({"params": params}, config, jax.random.key(0)))
    assert "params" in lora  # built from the variables dict: paths carry the collection name
    fn = jax.jit(lambda p, l: flaxlora.apply_factored(model, {"params": p}, l, config, x))
    expected = model.apply({"params": flaxlora.apply_lora({"params": params}, lora, config)["params"]}, x)
    np.testing.assert_allclose(fn(params, lora), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_with_a_key_and_scaled_to_keep_the_mean():
    model, params, x = toy_setup()
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=r"ffn/kernel$", dropout=0.5)
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)), scale=1.0)
    plain = flaxlora.apply_factored(model, {"params": params}, lora, config, x)
    np.testing.assert_allclose(
        plain, model.apply({"params": flaxlora.apply_lora(params, lora, config)}, x), rtol=1e-5, atol=1e-5
    )
    run = lambda k: flaxlora.apply_factored(model, {"params": params}, lora, config, x, lora_rng=jax.random.key(k))
    assert not np.allclose(run(1), plain, atol=1e-4)
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2), atol=1e-4)


def test_factored_rejects_adapters_it_cannot_reach():
    model, params, x = toy_setup()
    params = {**params, "table": {"embedding": jnp.ones((10, 4))}}
    config = flaxlora.LoraConfig(rank=2, targets=r"(ffn/kernel|table/embedding)$")
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    with pytest.raises(ValueError, match="table/embedding"):
        flaxlora.apply_factored(model, {"params": params}, lora, config, x)


def test_factored_reads_the_config_with_the_adapter_paths():
    model, params, x = toy_setup()
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=r"(query|ffn)/kernel$", alpha_pattern={r"^params/ffn": 8.0})
    lora = perturb_b(flaxlora.init_lora({"params": params}, config, jax.random.key(0)))
    merged = model.apply(flaxlora.apply_lora({"params": params}, lora, config), x)
    np.testing.assert_allclose(flaxlora.apply_factored(model, {"params": params}, lora, config, x), merged,
                               rtol=1e-5, atol=1e-5)


def test_merged_path_refuses_lora_dropout():
    from flaxlora import training

    model, _, _ = toy_setup()
    with pytest.raises(ValueError, match="lora_path='factored'"):
        training.logits_fn(model, flaxlora.LoraConfig(dropout=0.1), "merged")


@pytest.mark.parametrize("lora_path", ["factored", "merged"])
def test_frozen_weights_held_in_the_compute_dtype_give_the_same_step(lora_path):
    """bf16 compute multiplies by the bf16 cast of every frozen matrix: holding that cast once
    (half the memory, no cast per step) changes no logit and no gradient; norms stay float32, and
    the merged path keeps its targets as stored (it adds the adapter to them)."""
    from flaxlora import pytree, training
    from flaxlora.lora.factored import frozen_in_compute_dtype
    from flaxlora.models import LlamaConfig, init_params, sequence_classifier

    model = sequence_classifier(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2), dtype=jnp.bfloat16)
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=r"(q_proj|v_proj)/kernel$", trainable=r"^score/")
    state, frozen = training.init_train_state(init_params(model, jax.random.key(0)), config,
                                              flaxlora.lora_optimizer(1e-2), jax.random.key(1))
    trainable = {**state.trainable, "lora": perturb_b(state.trainable["lora"])}
    held = frozen_in_compute_dtype(frozen, jnp.bfloat16, config, lora_path)
    copy = jax.tree.map(jnp.copy, frozen)
    freed = frozen_in_compute_dtype(copy, jnp.bfloat16, config, lora_path, free=True)  # the originals deleted
    assert copy["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].is_deleted()
    jax.tree.map(np.testing.assert_array_equal, freed, held)
    dtypes = {p: x.dtype for p, x in pytree.flatten(held).items()}
    assert dtypes["model/layers/0/mlp/up_proj/kernel"] == dtypes["model/embed_tokens/embedding"] == jnp.bfloat16
    assert dtypes["model/layers/0/input_layernorm/scale"] == jnp.float32
    assert dtypes["model/layers/0/self_attn/q_proj/kernel"] == (jnp.float32 if lora_path == "merged" else jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, 64)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": jnp.array([0, 1])}
    apply = training.logits_fn(model, config, lora_path)
    loss = jax.jit(lambda f, t: jnp.sum(apply(f, t, batch) * jnp.array([1.0, -2.0])))
    for expected, got in zip(jax.value_and_grad(loss, argnums=1)(frozen, trainable),
                             jax.value_and_grad(loss, argnums=1)(held, trainable)):
        jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize(("fan_in", "fan_out"), [((32,), (48,)), ((4, 8), (32,)), ((32,), (4, 8))])
def test_the_bf16_adapter_product_equals_float32_math_with_its_gradients(fan_in, fan_out):
    """In bf16, ``(x @ a) @ b`` multiplies in bf16 and accumulates in float32 (flaxlora.dataflow's
    f32_accumulated_dot), also for a DenseGeneral's several fan-in or fan-out axes."""
    from flaxlora.lora.factored import low_rank_update

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (3, 5, *fan_in)).astype(jnp.bfloat16)
    a = jax.random.normal(keys[1], (*fan_in, 2))
    b = jax.random.normal(keys[2], (2, *fan_out))
    weights = jax.random.normal(keys[3], (3, 5, *fan_out))

    def reference(x, a, b):  # float32 math on the bf16 values
        bf = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        return jnp.tensordot(bf(jnp.tensordot(bf(x), bf(a), len(fan_in))), bf(b), 1)

    got = low_rank_update(x, a, b, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.shape == (3, 5, *fan_out)
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(x, a, b), rtol=2e-2, atol=2e-2)
    loss = lambda f: lambda *args: jnp.sum(f(*args).astype(jnp.float32) * weights)  # noqa: E731
    ours = jax.grad(loss(lambda *args: low_rank_update(*args, jnp.bfloat16)), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, a, b)
    for g, w in zip(ours, want):
        assert g.dtype == w.dtype
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=3e-2 * scale)


def test_the_bf16_adapter_product_keeps_less_than_a_plain_bf16_product():
    """XLA:CPU multiplies a plain bf16 dot in float32 and keeps float32 copies of its operands for
    the backward pass; accumulated in float32 from bf16 operands, the product keeps none."""
    from flaxlora.lora.factored import low_rank_update
    from flaxlora.memory import memory_account

    def step(product):
        def loss(adapters, x):
            for a, b in adapters:
                x = jnp.tanh(x + product(x, a, b))
            return jnp.sum(x.astype(jnp.float32))
        return jax.jit(jax.grad(loss))

    plain = lambda x, a, b: jnp.tensordot(jnp.tensordot(x, a.astype(x.dtype), 1), b.astype(x.dtype), 1)  # noqa: E731
    ours = lambda x, a, b: low_rank_update(x, a, b, jnp.bfloat16)  # noqa: E731
    adapters = [(jax.ShapeDtypeStruct((256, 4), jnp.float32), jax.ShapeDtypeStruct((4, 256), jnp.float32))] * 4
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    peaks = [memory_account(step(f).lower(adapters, x), ("trained", "batch"))[1].peak for f in (plain, ours)]
    assert peaks[1] < 0.95 * peaks[0]
