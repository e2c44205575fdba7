import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import TOY_IN_AXES, NnxMLP, perturb_b, toy_setup

import flaxlora
from flaxlora import pytree

ALL_TARGETS = r"(query|key|value|out|ffn|head)/kernel$"


def cfg(**kw):
    base = dict(rank=2, alpha=4.0, targets=ALL_TARGETS, in_axes=TOY_IN_AXES)
    base.update(kw)
    return flaxlora.LoraConfig(**base)


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_adapter_shapes_follow_kernel_layout():
    _, params, _ = toy_setup()
    lora = flaxlora.init_lora(params, cfg(use_dora=True), jax.random.key(0))
    assert lora["query"]["kernel"]["a"].shape == (16, 2)
    assert lora["query"]["kernel"]["b"].shape == (2, 4, 8)
    assert lora["query"]["kernel"]["magnitude"].shape == (4, 8)
    assert lora["out"]["kernel"]["a"].shape == (4, 8, 2)
    assert lora["out"]["kernel"]["b"].shape == (2, 16)
    assert lora["ffn"]["kernel"]["a"].shape == (16, 2)
    assert set(lora) == {"query", "key", "value", "out", "ffn", "head"}


@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_zero_b_gives_the_base_model(init):
    model, params, x = toy_setup()
    config = cfg(init=init)
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    a_leaves = [v["a"] for v in flaxlora.lora.adapters_by_path(lora).values()]
    assert all(float(jnp.abs(a).max()) > 0 for a in a_leaves)
    merged = flaxlora.apply_lora(params, lora, config)
    np.testing.assert_array_equal(model.apply({"params": merged}, x), model.apply({"params": params}, x))


def test_kaiming_init_bound_matches_fan_in():
    _, params, _ = toy_setup()
    lora = flaxlora.init_lora(params, cfg(rank=4, targets="ffn/kernel$"), jax.random.key(1))
    a = lora["ffn"]["kernel"]["a"]  # fan_in 16
    assert float(jnp.abs(a).max()) <= 1 / math.sqrt(16)
    assert float(jnp.abs(a).max()) > 0.8 / math.sqrt(16)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_merged_kernel_is_w_plus_scaled_ab(scaling):
    _, params, _ = toy_setup()
    config = cfg(scaling=scaling)
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    merged = flaxlora.apply_lora(params, lora, config)
    s = 4.0 / (2 if scaling == "standard" else math.sqrt(2))
    ad = lora["out"]["kernel"]
    expected = params["out"]["kernel"] + s * jnp.einsum("hdr,ro->hdo", ad["a"], ad["b"])
    close(merged["out"]["kernel"], expected)
    untouched = pytree.flatten(merged)["norm/scale"]
    np.testing.assert_array_equal(untouched, params["norm"]["scale"])


def test_rslora_and_standard_differ_by_sqrt_rank():
    _, params, _ = toy_setup()
    r = 4
    std, rs = cfg(rank=r, targets="ffn"), cfg(rank=r, targets="ffn", scaling="rslora")
    lora = perturb_b(flaxlora.init_lora(params, std, jax.random.key(0)))
    delta = lambda c: flaxlora.apply_lora(params, lora, c)["ffn"]["kernel"] - params["ffn"]["kernel"]
    close(delta(rs), math.sqrt(r) * delta(std), tol=1e-5)
    assert rs.scale_for("ffn/kernel") / std.scale_for("ffn/kernel") == pytest.approx(math.sqrt(r))


def test_merge_then_unmerge_round_trip():
    model, params, x = toy_setup()
    config = cfg()
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    merged = flaxlora.merge(params, lora, config)
    assert not np.allclose(model.apply({"params": merged}, x), model.apply({"params": params}, x))
    restored = flaxlora.unmerge(merged, lora, config)
    for p, w in pytree.flatten(params).items():
        close(pytree.flatten(restored)[p], w, tol=1e-5)


def test_extract_recovers_the_low_rank_update():
    model, params, x = toy_setup()
    config = cfg()
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    merged = flaxlora.merge(params, lora, config)
    recovered = flaxlora.extract_lora(params, merged, config)
    assert jax.tree.map(jnp.shape, recovered) == jax.tree.map(jnp.shape, lora)
    close(model.apply({"params": flaxlora.apply_lora(params, recovered, config)}, x),
          model.apply({"params": merged}, x), tol=1e-4)


def test_merge_folds_trainable_extras():
    model, params, x = toy_setup()
    config = cfg(targets=r"query/kernel$", trainable=r"^head/")
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    extras = jax.tree.map(lambda w: w + 1.0, flaxlora.trainable_params(params, config))
    assert set(pytree.flatten(extras)) == {"head/bias", "head/kernel"}
    merged = flaxlora.merge(params, lora, config, extras)
    close(merged["head"]["kernel"], params["head"]["kernel"] + 1.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_reconstruct_w_at_step_zero(init):
    model, params, x = toy_setup()
    config = cfg(init=init)
    base, lora = flaxlora.init_adapter(params, config, jax.random.key(0))
    # The adapter holds real signal and the base changed at every target ...
    assert float(jnp.abs(lora["ffn"]["kernel"]["b"]).max()) > 0
    assert not np.allclose(base["ffn"]["kernel"], params["ffn"]["kernel"])
    # ... but residual + adapter is the original weight, so the model is unchanged.
    for p, w in pytree.flatten(params).items():
        close(pytree.flatten(flaxlora.apply_lora(base, lora, config))[p], w, tol=2e-5)
    close(model.apply({"params": flaxlora.apply_lora(base, lora, config)}, x), model.apply({"params": params}, x), 1e-4)
    with pytest.raises(ValueError, match="init_adapter"):
        flaxlora.init_lora(params, config, jax.random.key(0))


def test_pissa_adapter_holds_the_principal_subspace():
    _, params, _ = toy_setup()
    config = cfg(init="pissa", targets=r"ffn/kernel$")
    base, lora = flaxlora.init_adapter(params, config, jax.random.key(0))
    w = params["ffn"]["kernel"]
    s = jnp.linalg.svd(w, compute_uv=False)
    s_res = jnp.linalg.svd(base["ffn"]["kernel"], compute_uv=False)
    close(s_res[: len(s) - 2], s[2:], tol=1e-4)  # the top-2 singular values moved to the adapter


def test_dora_norms_equal_magnitude():
    _, params, _ = toy_setup()
    config = cfg(use_dora=True)
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, m: m * 1.5 if p[-1].key == "magnitude" else m, lora
    )
    merged = flaxlora.apply_lora(params, lora, config)
    close(jnp.linalg.norm(merged["ffn"]["kernel"], axis=0), lora["ffn"]["kernel"]["magnitude"])
    # multi-dimensional kernels: norms over the input axes, per output unit
    close(jnp.linalg.norm(merged["query"]["kernel"], axis=0), lora["query"]["kernel"]["magnitude"])
    close(jnp.sqrt((merged["out"]["kernel"] ** 2).sum(axis=(0, 1))), lora["out"]["kernel"]["magnitude"])


def test_dora_at_init_is_the_base_model():
    model, params, x = toy_setup()
    config = cfg(use_dora=True)
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    close(model.apply({"params": flaxlora.apply_lora(params, lora, config)}, x), model.apply({"params": params}, x))


def test_stacked_layers_get_one_adapter_each():
    key = jax.random.key(0)
    params = {"layers": {"mlp": {"kernel": jax.random.normal(key, (3, 6, 5))}}}
    config = flaxlora.LoraConfig(rank=2, alpha=2.0, targets="mlp", stack_axes={"layers": 1})
    lora = perturb_b(flaxlora.init_lora(params, config, key))
    ad = lora["layers"]["mlp"]["kernel"]
    assert ad["a"].shape == (3, 6, 2) and ad["b"].shape == (3, 2, 5)
    assert not np.allclose(ad["a"][0], ad["a"][1])
    merged = flaxlora.apply_lora(params, lora, config)["layers"]["mlp"]["kernel"]
    for i in range(3):
        close(merged[i], params["layers"]["mlp"]["kernel"][i] + ad["a"][i] @ ad["b"][i])


def test_stacked_pissa_is_per_layer():
    params = {"layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(3), (2, 6, 5))}}}
    config = flaxlora.LoraConfig(rank=2, alpha=2.0, targets="mlp", stack_axes={"layers": 1}, init="pissa")
    base, lora = flaxlora.init_adapter(params, config, jax.random.key(0))
    close(flaxlora.apply_lora(base, lora, config)["layers"]["mlp"]["kernel"], params["layers"]["mlp"]["kernel"])


def test_only_lora_and_trainable_leaves_get_gradients():
    model, params, x = toy_setup()
    config = cfg(targets=r"(query|value)/kernel$", trainable=r"^head/|norm/")
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    trainable = {"lora": lora, "extras": flaxlora.trainable_params(params, config)}

    def loss(trainable):  # the frozen params are closed over: no gradient is ever formed for them
        p = flaxlora.merge(params, trainable["lora"], config, trainable["extras"])
        return jnp.sum(model.apply({"params": p}, x) ** 2)

    grads = jax.grad(loss)(trainable)
    assert set(pytree.flatten(grads)) == {
        "lora/query/kernel/a", "lora/query/kernel/b", "lora/value/kernel/a", "lora/value/kernel/b",
        "extras/head/kernel", "extras/head/bias", "extras/norm/scale", "extras/norm/bias",
    }
    # b = 0 at init, so a's gradient is exactly zero and b's is not (Hu et al.'s init).
    assert float(jnp.abs(grads["lora"]["query"]["kernel"]["a"]).max()) == 0.0
    assert float(jnp.abs(grads["lora"]["query"]["kernel"]["b"]).max()) > 0.0
    assert float(jnp.abs(grads["extras"]["head"]["kernel"]).max()) > 0.0
    # The backward pass holds no array shaped like a frozen kernel's gradient w.r.t. the base.
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
    assert len(jaxpr.jaxpr.outvars) == 8


def test_lora_training_lowers_the_loss():
    model, params, _ = toy_setup()
    x = jax.random.normal(jax.random.key(5), (64, 5, 16))
    y = (x[:, :, 0].mean(1) > 0).astype(jnp.int32)
    config = cfg(targets=r"(query|value|ffn)/kernel$", rank=4, trainable=r"^head/")
    trainable = {"lora": flaxlora.init_lora(params, config, jax.random.key(0)),
                 "extras": flaxlora.trainable_params(params, config)}
    tx = flaxlora.lora_optimizer(3e-2, loraplus_ratio=4.0)
    opt_state = tx.init(trainable)

    def loss_fn(trainable):
        logits = model.apply({"params": flaxlora.merge(params, trainable["lora"], config, trainable["extras"])}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return jax.tree.map(jnp.add, trainable, updates), opt_state, loss

    losses = []
    for _ in range(60):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_nnx_state_round_trip():
    model = NnxMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 12))
    graphdef, state = nnx.split(model)
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=r"(up|down)/kernel$", trainable=r"norm/")
    assert [p for p, _ in flaxlora.lora_candidates(state)] == ["down/kernel", "up/kernel"]
    lora = flaxlora.init_lora(state, config, jax.random.key(0))
    assert lora["up"]["kernel"]["a"].shape == (12, 2)
    same = nnx.merge(graphdef, flaxlora.apply_lora(state, lora, config))
    np.testing.assert_array_equal(same(x), model(x))
    lora = perturb_b(lora)
    merged_state = flaxlora.apply_lora(state, lora, config)
    assert type(merged_state) is type(state)
    merged = nnx.merge(graphdef, merged_state)
    s = config.scale_for("up/kernel")
    up = lora["up"]["kernel"]
    h = jax.nn.relu(model.norm(x @ (model.up.kernel[...] + s * up["a"] @ up["b"]) + model.up.bias[...]))
    dn = lora["down"]["kernel"]
    expected = h @ (model.down.kernel[...] + s * dn["a"] @ dn["b"]) + model.down.bias[...]
    close(merged(x), expected, tol=1e-5)
    assert set(pytree.flatten(flaxlora.trainable_params(state, config))) == {"norm/scale", "norm/bias"}


def test_apply_rejects_mismatched_adapters():
    _, params, _ = toy_setup()
    config = cfg()
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    with pytest.raises(ValueError, match="missing"):
        flaxlora.apply_lora(params, {k: v for k, v in lora.items() if k != "query"}, config)
    bad = jax.tree_util.tree_map_with_path(lambda p, v: v[..., :1] if p[0].key == "ffn" and p[-1].key == "a" else v, lora)
    with pytest.raises(ValueError, match=r"ffn/kernel/a has shape \(16, 1\)"):
        flaxlora.apply_lora(params, bad, config)
    with pytest.raises(ValueError, match="magnitude"):
        flaxlora.apply_lora(params, lora, cfg(use_dora=True))


def test_apply_lora_jits_with_static_config():
    model, params, x = toy_setup()
    config = cfg()
    lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(0)))
    fn = jax.jit(flaxlora.apply_lora, static_argnums=2)
    close(fn(params, lora, config)["ffn"]["kernel"], flaxlora.apply_lora(params, lora, config)["ffn"]["kernel"])


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_fold_is_the_mean_update_as_one_adapter_of_k_times_the_rank(scaling):
    """Three adapters (multi-axis kernels and a stacked one) folded: the folded adapter, merged with
    its own config (rank 3 r), equals the mean of the three merged models; extras are averaged."""
    _, params, _ = toy_setup()
    params = {**params, "layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(9), (3, 16, 8))}}}
    config = cfg(scaling=scaling, targets=r"(query|key|value|out|ffn|mlp)/kernel$", stack_axes={"layers": 1},
                 trainable=r"^head/bias$")
    members = []
    for seed in range(3):
        lora = perturb_b(flaxlora.init_lora(params, config, jax.random.key(seed)), seed=seed)
        extras = {"head": {"bias": params["head"]["bias"] + seed}}
        members.append({"lora": lora, "extras": extras})
    folded, folded_config = flaxlora.fold(members, config)
    assert folded_config.rank == 3 * config.rank
    assert folded["lora"]["query"]["kernel"]["a"].shape[-1] == 6 and folded["lora"]["layers"]["mlp"]["kernel"]["b"].shape == (3, 6, 8)
    merged = flaxlora.merge(params, folded["lora"], folded_config, folded["extras"])
    mean = jax.tree.map(lambda *x: sum(x) / 3, *[flaxlora.merge(params, m["lora"], config, m["extras"]) for m in members])
    for path, leaf in pytree.flatten(mean).items():
        close(pytree.flatten(merged)[path], leaf, tol=1e-5)
    assert not np.allclose(mean["query"]["kernel"], params["query"]["kernel"])  # the updates are not zero
    with pytest.raises(ValueError, match="DoRA"):
        flaxlora.fold(members, config.replace(use_dora=True))
