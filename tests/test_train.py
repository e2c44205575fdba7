import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyClassifier, toy_batches

import flaxlora
from flaxlora import pytree, training
from flaxlora.training import sharding

CONFIG = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", trainable=r"^head/")


def setup(model=None, lr=1e-2, seed=0):
    model = model or ToyClassifier(dropout=0.0)
    batch = toy_batches(1)[0]
    params = model.init(jax.random.key(seed), batch["input_ids"], batch["attention_mask"])["params"]
    tx = flaxlora.lora_optimizer(lr, loraplus_ratio=4.0)
    state, frozen = training.init_train_state(params, CONFIG, tx, jax.random.key(seed + 1))
    return model, params, tx, state, frozen


def run(model, tx, state, frozen, batches, lora_path="merged", options=training.StepOptions()):
    step = jax.jit(lambda s, f, b: training.train_step(
        s, f, b, apply=training.logits_fn(model, CONFIG, lora_path), tx=tx, options=options))
    losses = []
    for b in batches:
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_training_lowers_the_loss_and_leaves_the_base_alone():
    model, params, tx, state, frozen = setup()
    state, losses = run(model, tx, state, frozen, toy_batches(40, seed=1))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert int(state.step) == 40
    for p, w in pytree.flatten(frozen).items():
        np.testing.assert_array_equal(w, pytree.flatten(params)[p])
    assert set(pytree.flatten(state.trainable)) == {
        "lora/query/kernel/a", "lora/query/kernel/b", "lora/value/kernel/a", "lora/value/kernel/b",
        "extras/head/kernel", "extras/head/bias"}


def test_gradient_accumulation_equals_one_big_batch():
    model, _, tx, state, frozen = setup()
    batches = toy_batches(3, batch_size=16, seed=2)
    big, big_losses = run(model, tx, state, frozen, batches)
    acc, acc_losses = run(model, tx, state, frozen, batches, options=training.StepOptions(accum_steps=4))
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(acc.trainable), jax.tree.leaves(big.trainable)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_factored_and_merged_paths_train_alike():
    model, _, tx, state, frozen = setup()
    batches = toy_batches(5, seed=3)
    _, merged = run(model, tx, state, frozen, batches, "merged")
    _, factored = run(model, tx, state, frozen, batches, "factored")
    np.testing.assert_allclose(factored, merged, rtol=1e-4)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Output shapes of every dot_general in ``jaxpr`` and the jaxprs nested in it."""
    return {tuple(e.outvars[0].aval.shape) for e in _equations(jaxpr) if e.primitive.name == "dot_general"}


@pytest.mark.parametrize("lora_path", ["factored", "merged"])
def test_only_the_merged_path_forms_weight_sized_gradients(lora_path):
    """In the jaxpr of the gradient, a dot_general with a frozen kernel's (16, 16) shape is its
    weight gradient: the factored path (the default) forms none, the merged path one per target."""
    model, _, tx, state, frozen = setup()
    batch = toy_batches(1, batch_size=12)[0]  # no activation of the kernel's shape
    apply = training.logits_fn(model, CONFIG, lora_path)

    def loss(trainable):
        logits = apply(frozen, trainable, batch, jax.random.key(0))
        return training.metrics.weighted_cross_entropy(logits, batch["labels"], batch["weights"])[0]

    kernel = tuple(frozen["query"]["kernel"].shape)
    step_jaxpr = jax.make_jaxpr(lambda s: training.train_step(s, frozen, batch, apply=apply, tx=tx))(state)
    for jaxpr in (jax.make_jaxpr(jax.grad(loss))(state.trainable), step_jaxpr):
        assert (kernel in _dot_output_shapes(jaxpr.jaxpr)) == (lora_path == "merged")


def test_padding_rows_do_not_change_the_step():
    model, _, tx, state, frozen = setup()
    batch = toy_batches(1, seed=4)[0]
    garbage = dict(batch, labels=batch["labels"].copy())
    garbage["labels"][-2:] = 1 - garbage["labels"][-2:]
    (s1, l1), (s2, l2) = run(model, tx, state, frozen, [batch]), run(model, tx, state, frozen, [garbage])
    assert l1 == l2
    for x, y in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        np.testing.assert_array_equal(x, y)


def test_dropout_keys_depend_on_the_step_only():
    model, _, tx, state, frozen = setup(model=ToyClassifier(dropout=0.3))
    config = CONFIG.replace(dropout=0.2)
    apply = training.logits_fn(model, config, "factored")
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=apply, tx=tx))
    batch = toy_batches(1, seed=5)[0]
    (_, ma), (_, mb) = step(state, frozen, batch), step(state, frozen, batch)
    assert float(ma["loss"]) == float(mb["loss"])
    later = state.replace(step=state.step + 1)
    assert float(step(later, frozen, batch)[1]["loss"]) != float(ma["loss"])


def test_schedule_warms_up_then_decays():
    schedule = training.learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(5e-4)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    cosine = training.learning_rate_schedule(1e-3, 100, 10, decay="cosine")
    assert float(cosine(55)) == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(ValueError, match="decay"):
        training.learning_rate_schedule(1e-3, 100, 10, decay="step")


def test_mesh_specs():
    assert sharding.parse_mesh("data=4,fsdp=2", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.parse_mesh("fsdp=-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.parse_mesh(None, 2) == {"data": 2, "fsdp": 1, "tensor": 1}
    for bad, message in [("data=3", "needs 3 devices"), ("model=2", "unknown axes"), ("data", "expected 'axis=size")]:
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh(bad, 2)


def test_eight_devices_give_the_one_device_losses():
    """Also with the layers scanned: stacked weights sharded over fsdp and tensor."""
    script = pathlib.Path(__file__).with_name("sharded_losses.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["sharded_frozen"], "frozen weights were not split over fsdp"
    np.testing.assert_allclose(result["mesh"], result["single"], rtol=1e-5)
    assert result["single"][-1] < result["single"][0]
    assert result["scanned_sharded_frozen"], "a scanned stack's weights were not split over fsdp"
    np.testing.assert_allclose(result["scanned_mesh"], result["scanned_single"], rtol=1e-5)
    assert result["scanned_single"][-1] < result["scanned_single"][0]


def test_bfloat16_compute_keeps_lora_and_optimizer_in_float32():
    from test_models import tiny_bert

    from flaxlora.models import init_params, sequence_classifier

    model = sequence_classifier(tiny_bert(num_labels=2, vocab_size=32), dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(0))
    tx = flaxlora.lora_optimizer(1e-2)
    config = CONFIG.replace(trainable=r"^classifier/")
    state, frozen = training.init_train_state(params, config, tx, jax.random.key(1))
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, config), tx=tx))
    losses = []
    for batch in toy_batches(8, seed=9):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state)) if x.ndim} == {jnp.dtype("float32")}
    logits = training.logits_fn(model, config)(frozen, state.trainable, toy_batches(1)[0])
    assert logits.dtype == jnp.float32  # bf16 products, fp32 accumulation
    step_jaxpr = jax.make_jaxpr(lambda s, b: training.train_step(
        s, frozen, b, apply=training.logits_fn(model, config), tx=tx))(state, toy_batches(1)[0])
    dots = [e for e in _equations(step_jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    frozen_kernels = {tuple(w.shape) for p, w in pytree.flatten(frozen).items() if p.endswith("kernel")}
    assert frozen_kernels == {(32, 32), (32, 48), (48, 32)}  # the classifier is held once, in the extras
    with_kernel = [e for e in dots if any(tuple(v.aval.shape) in frozen_kernels for v in e.invars)]
    assert len(with_kernel) > 13  # the forward of the 13 frozen dense layers and input gradients, all in bf16
    assert {v.aval.dtype for e in with_kernel for v in e.invars} == {jnp.dtype("bfloat16")}
    assert not frozen_kernels & {tuple(e.outvars[0].aval.shape) for e in dots}  # no weight gradient


def test_a_non_finite_loss_skips_the_update():
    model, _, tx, state, frozen = setup()
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, CONFIG), tx=tx))
    good, poisoned = toy_batches(2, seed=4)
    poisoned["weights"][0] = np.nan  # a NaN loss and gradient
    after, metrics = step(state, frozen, poisoned)
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(state.step) + 1
    for x, y in zip(jax.tree.leaves((after.trainable, after.opt_state)), jax.tree.leaves((state.trainable, state.opt_state))):
        np.testing.assert_array_equal(x, y)
    later, metrics = step(after, frozen, good)
    assert not bool(metrics["skipped"])
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(later.trainable), jax.tree.leaves(after.trainable)))


def test_an_absurd_learning_rate_is_skipped_and_the_state_stays_finite():
    model, _, tx, state, frozen = setup(lr=1e30)
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, CONFIG), tx=tx))
    skipped = []
    for batch in toy_batches(6, seed=5):
        state, metrics = step(state, frozen, batch)
        skipped.append(bool(metrics["skipped"]))
    assert any(skipped), "lr 1e30 should overflow"
    assert bool(training.all_finite(state.trainable)) and bool(training.all_finite(state.opt_state))


def test_the_step_halts_where_the_skips_in_a_row_reach_the_limit():
    """The limit is kept on the device: after two skipped updates in a row the state stops changing,
    its step counter too, so the host finds the run where it diverged whenever it next reads."""
    model, _, tx, state, frozen = setup()
    options = training.StepOptions(max_skipped_steps=2)
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, CONFIG), tx=tx,
                                                       options=options))
    batches = toy_batches(7, seed=6)
    for i in (0, 2, 3):  # NaN losses at steps 1, 3 and 4
        batches[i]["weights"][0] = np.nan
    seen = []
    for batch in batches:
        state, metrics = step(state, frozen, batch)
        seen.append((int(state.step), int(state.skipped_in_a_row), bool(metrics["skipped"])))
    assert seen == [(1, 1, True), (2, 0, False), (3, 1, True), (4, 2, True), (4, 2, True), (4, 2, True), (4, 2, True)]
    with pytest.raises(ValueError, match=">= 1"):
        training.StepOptions(max_skipped_steps=0)


def test_members_in_one_step_are_each_members_own_step():
    """K adapters stacked and vmapped over one frozen base: member i's state after each step is what
    the single step gives it (same seeds, same batches), the learning rate is reported, and a member
    reaching the skip limit halts them all."""
    model, params, tx, _, _ = setup()
    schedule = training.learning_rate_schedule(1e-2, 6, 2)
    tx = flaxlora.lora_optimizer(schedule)
    options = training.StepOptions(max_skipped_steps=1, learning_rate=schedule)
    apply = training.logits_fn(model, CONFIG, "factored")
    heads = [{"head/kernel": jnp.full((16, 2), value)} for value in (0.01, -0.02)]  # each member's own classifier
    members, frozen = training.init_member_states(params, CONFIG, tx, [3, 7], extras=heads)
    singles = [training.init_train_state(params, CONFIG, tx, jax.random.key(seed))[0] for seed in (3, 7)]
    singles = [s.replace(trainable={**s.trainable, "extras": {**s.trainable["extras"], "head": {
        **s.trainable["extras"]["head"], "kernel": head["head/kernel"]}}}) for s, head in zip(singles, heads)]
    for x, y in zip(jax.tree.leaves(members), jax.tree.leaves(tuple(singles))):
        np.testing.assert_array_equal(x, y)
    together = jax.jit(lambda s, f, b: training.train_members_step(s, f, b, apply=apply, tx=tx, options=options))
    alone = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=apply, tx=tx, options=options))
    for batch in toy_batches(3, seed=8):
        members, metrics = together(members, frozen, batch)
        stepped = [alone(single, frozen, batch) for single in singles]
        singles = [single for single, _ in stepped]
        np.testing.assert_allclose(metrics["loss"], [float(m["loss"]) for _, m in stepped], rtol=1e-5)
        np.testing.assert_allclose(metrics["lr"], [float(schedule(int(members[0].step) - 1))] * 2, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(members), jax.tree.leaves(tuple(singles))):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    poisoned = toy_batches(1, seed=9)[0]
    poisoned["weights"][0] = np.nan
    members, _ = together(members, frozen, poisoned)  # both skip: the limit of 1 is reached
    after, metrics = together(members, frozen, toy_batches(1, seed=10)[0])
    assert [int(m.step) for m in after] == [4, 4] and bool(np.all(metrics["skipped"]))


def test_rdrop_adds_the_symmetric_kl_of_two_dropout_passes():
    """The loss is the mean of two passes' cross-entropies (two dropout masks) plus rdrop times the
    symmetric KL of their predictions; without dropout both passes agree and it is the plain loss."""
    for dropout in (0.0, 0.3):
        model, _, tx, state, frozen = setup(model=ToyClassifier(dropout=dropout))
        apply = training.logits_fn(model, CONFIG, "factored")
        batch = toy_batches(1, seed=11)[0]
        options = training.StepOptions(rdrop=2.0)
        _, metrics = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=apply, tx=tx, options=options))(
            state, frozen, batch)
        rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)[0]
        first, second = (apply(frozen, state.trainable, batch, r) for r in jax.random.split(rng))
        cross = [training.weighted_cross_entropy(x, batch["labels"], batch["weights"])[0] for x in (first, second)]
        p, q = jax.nn.softmax(first), jax.nn.softmax(second)
        kl = np.sum(np.sum((p - q) * (np.log(p) - np.log(q)), axis=-1) / 2 * batch["weights"])
        expected = ((cross[0] + cross[1]) / 2 + 2.0 * kl) / batch["weights"].sum()
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        assert (kl > 1e-4) == (dropout > 0)
    with pytest.raises(ValueError, match="rdrop must be >= 0"):
        training.StepOptions(rdrop=-1.0)
