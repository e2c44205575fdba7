import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_models import toy_setup

import flaxlora
from flaxlora import pytree


def trainable_tree(use_dora=False):
    _, params, _ = toy_setup()
    config = flaxlora.LoraConfig(rank=2, targets=r"(query|ffn)/kernel$", trainable=r"^head/|norm/", use_dora=use_dora)
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    return params, config, {"lora": lora, "extras": flaxlora.trainable_params(params, config)}


def test_labels_separate_a_b_magnitude_and_decay_groups():
    _, _, tree = trainable_tree(use_dora=True)
    labels = pytree.flatten(flaxlora.adapter_labels(tree))
    assert labels["lora/query/kernel/a"] == "lora_a"
    assert labels["lora/query/kernel/b"] == "lora_b"
    assert labels["lora/ffn/kernel/magnitude"] == "magnitude"
    assert labels["extras/head/kernel"] == "decay"
    assert labels["extras/head/bias"] == "no_decay"
    assert labels["extras/norm/scale"] == "no_decay"


def test_a_leaf_named_b_outside_an_adapter_is_not_lora():
    labels = flaxlora.adapter_labels({"layer": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}})
    assert labels == {"layer": {"w": "decay", "b": "no_decay"}}


def test_loraplus_ratio_scales_the_b_update():
    _, _, tree = trainable_tree()
    tree = jax.tree.map(lambda x: x + 0.5, tree)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), tree)
    lr, ratio = 1e-3, 8.0
    updates, _ = flaxlora.lora_optimizer(lr, loraplus_ratio=ratio).update(
        grads, flaxlora.lora_optimizer(lr, loraplus_ratio=ratio).init(tree), tree
    )
    u = pytree.flatten(updates)
    # Adam's first step moves every coordinate by about lr: b's by ratio * lr.
    np.testing.assert_allclose(np.abs(u["lora/ffn/kernel/a"]), lr, rtol=1e-3)
    np.testing.assert_allclose(np.abs(u["lora/ffn/kernel/b"]), ratio * lr, rtol=1e-3)
    np.testing.assert_allclose(np.abs(u["extras/head/kernel"]), lr, rtol=1e-3)


def test_loraplus_with_a_schedule():
    _, _, tree = trainable_tree()
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    tx = flaxlora.lora_optimizer(schedule, loraplus_ratio=4.0)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), tree)
    u = pytree.flatten(tx.update(grads, tx.init(tree), tree)[0])
    np.testing.assert_allclose(np.abs(u["lora/ffn/kernel/b"]), 4e-3, rtol=1e-3)


def test_weight_decay_skips_biases_norms_and_magnitudes():
    _, _, tree = trainable_tree(use_dora=True)
    tree = jax.tree.map(lambda x: jnp.ones_like(x), tree)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    tx = flaxlora.lora_optimizer(1.0, weight_decay=0.1)
    u = pytree.flatten(tx.update(zeros, tx.init(tree), tree)[0])
    for decayed in ("lora/ffn/kernel/a", "lora/ffn/kernel/b", "extras/head/kernel"):
        np.testing.assert_allclose(u[decayed], -0.1)
    for kept in ("lora/ffn/kernel/magnitude", "extras/head/bias", "extras/norm/scale"):
        np.testing.assert_array_equal(u[kept], 0.0)


def test_gradient_clipping_happens_before_adam():
    _, _, tree = trainable_tree()
    big = jax.tree.map(lambda x: jnp.full_like(x, 100.0), tree)
    small = jax.tree.map(lambda x: jnp.full_like(x, 0.01), tree)

    def two_steps(tx, clip_by_hand=False):
        state, out = tx.init(tree), []
        for g in (big, small):
            if clip_by_hand:
                g = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
            u, state = tx.update(g, state, tree)
            out.append(pytree.flatten(u)["lora/ffn/kernel/b"])
        return out

    clipped = two_steps(flaxlora.lora_optimizer(1e-3, max_grad_norm=1.0))
    by_hand = two_steps(flaxlora.lora_optimizer(1e-3), clip_by_hand=True)
    unclipped = two_steps(flaxlora.lora_optimizer(1e-3))
    np.testing.assert_allclose(clipped[1], by_hand[1], rtol=1e-6)
    assert not np.allclose(clipped[1], unclipped[1], rtol=1e-2)
    with pytest.raises(ValueError, match="loraplus_ratio"):
        flaxlora.lora_optimizer(1.0, loraplus_ratio=0.0)


def test_freeze_labels_mask_the_full_tree():
    params, config, tree = trainable_tree()
    labels = {"params": flaxlora.freeze_labels(params, config), "lora": jax.tree.map(lambda _: "trainable", tree["lora"])}
    flat = pytree.flatten(labels)
    assert flat["params/head/kernel"] == "trainable" and flat["params/ffn/kernel"] == "frozen"
    tx = optax.multi_transform({"trainable": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    full = {"params": params, "lora": tree["lora"]}
    grads = jax.tree.map(jnp.ones_like, full)
    updates = pytree.flatten(tx.update(grads, tx.init(full), full)[0])
    assert float(jnp.abs(updates["params/ffn/kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["params/head/kernel"]).min()) == 1.0
    assert float(jnp.abs(updates["lora/ffn/kernel/a"]).min()) == 1.0
