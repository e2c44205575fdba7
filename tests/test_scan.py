"""Scanned layer stacks (``scan_layers``): the same function as the unrolled model, stacked params
and adapters, loading straight into the stacked layout, and a --scan-layers run restored unrolled."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from safetensors import safe_open

import flaxlora
from flaxlora import pytree, training
from flaxlora.interop.export import export
from flaxlora.loading.convert import params_from_hf, to_hf
from flaxlora.lora.factored import adapter_collections, adapters_by_module
from flaxlora.models import (
    BertConfig,
    LlamaConfig,
    init_params,
    logical_partition_specs,
    sequence_classifier,
)
from flaxlora.models.scan import (
    SCANNED,
    SCANNED_STACK_AXES,
    scanned_config,
    stack_layers,
    unstack_layers,
)
from flaxlora.qqp.data import load_qqp
from flaxlora.training.checkpoint import Checkpointer

CONFIGS = {
    "bert": BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=40),
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2),
}
ALL_LINEAR = r"(query|key|value|dense|(q|k|v|o|gate|up|down)_proj)/kernel$"


def models(kind, remat="none"):
    config = dataclasses.replace(CONFIGS[kind], remat=remat)
    return sequence_classifier(config), sequence_classifier(scanned_config(config))


def inputs():
    ids = jax.random.randint(jax.random.key(5), (2, 9), 2, 64)
    return ids, jnp.ones_like(ids).at[1, 6:].set(0)


def stacked_params(kind, seed=0, remat="none"):
    unrolled, scanned = models(kind, remat)
    params = init_params(unrolled, jax.random.key(seed))
    shapes = jax.eval_shape(functools.partial(init_params, scanned), jax.random.key(0))
    return unrolled, scanned, params, stack_layers(params, like=shapes)


@pytest.mark.parametrize("kind", CONFIGS)
def test_scanned_model_is_the_unrolled_model_with_stacked_params(kind):
    unrolled, scanned, params, stacked = stacked_params(kind)
    layers = CONFIGS[kind].num_hidden_layers
    flat = {"/".join(p): x for p, x in flatten_dict(stacked).items()}
    in_stack = [p for p in flat if f"/{SCANNED}/" in p]
    assert in_stack and all(flat[p].shape[0] == layers for p in in_stack)
    assert not any("/0/" in p for p in flat)
    specs = {"/".join(p): s for p, s in flatten_dict(logical_partition_specs(scanned)).items()}
    assert all(specs[p][0] == "layers" for p in in_stack)  # the layer axis is named, and replicated by the rules
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    ids, mask = inputs()
    expected = unrolled.apply({"params": params}, ids, mask)
    np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "dora", "remat"), [("bert", False, "none"), ("bert", True, "full"),
                                                     ("llama", False, "block"), ("llama", True, "none")])
def test_factored_lora_on_a_scanned_stack_equals_the_unrolled_model(kind, dora, remat):
    """Values and gradients, also with the scanned layer rematerialised (--remat under the scan)."""
    unrolled, scanned, params, stacked = stacked_params(kind, remat=remat)
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=ALL_LINEAR, use_dora=dora)
    scan_config = config.replace(stack_axes=SCANNED_STACK_AXES)
    lora = flaxlora.init_lora(params, config, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), lora)
    stacked_lora = stack_layers(lora, like=flaxlora.init_lora(stacked, scan_config, jax.random.key(1)))
    ids, mask = inputs()

    def loss(model, params, lora, config):
        return jnp.sum(flaxlora.apply_factored(model, {"params": params}, lora, config, ids, mask) ** 2)

    expected, grads = jax.value_and_grad(loss, argnums=2)(unrolled, params, lora, config)
    value, stacked_grads = jax.value_and_grad(loss, argnums=2)(scanned, stacked, stacked_lora, scan_config)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), unstack_layers(stacked_grads), grads)
    merged = scanned.apply({"params": flaxlora.apply_lora(stacked, stacked_lora, scan_config)}, ids, mask)
    np.testing.assert_allclose(jnp.sum(merged**2), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_scanned_stack_computes_in_bfloat16(kind):
    """With bf16 compute the scanned stack's carry keeps one dtype (Llama's float32 residual stream,
    BERT's bf16 LayerNorm output): forward and a train step give the unrolled model's results."""
    unrolled, scanned, params, stacked = stacked_params(kind)
    unrolled, scanned = (sequence_classifier(m.config, dtype=jnp.bfloat16) for m in (unrolled, scanned))
    ids, mask = inputs()
    expected = unrolled.apply({"params": params}, ids, mask)
    logits = scanned.apply({"params": stacked}, ids, mask)
    assert logits.dtype == jnp.float32  # a head returns float32
    np.testing.assert_allclose(logits, expected, rtol=1e-2, atol=1e-2)
    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=ALL_LINEAR, trainable=r"^(classifier|score)/")
    tx = optax.sgd(1.0)  # the update is the gradient
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": jnp.zeros_like(ids),
             "labels": jnp.array([0, 1]), "weights": jnp.ones(2)}

    def step(model, config, state, frozen):
        return jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, config),
                                                           tx=tx))(state, frozen, batch)

    state, frozen = training.init_train_state(params, config, tx, jax.random.key(1))
    trainable = stack_layers(state.trainable, like=training.init_train_state(
        stacked, config.replace(stack_axes=SCANNED_STACK_AXES), tx, jax.random.key(1))[0].trainable)
    scanned_state = state.replace(trainable=trainable, opt_state=tx.init(trainable))
    after, metrics = step(scanned, config.replace(stack_axes=SCANNED_STACK_AXES), scanned_state,
                          stack_layers(frozen, like=stacked))
    expected_after, expected = step(unrolled, config, state, frozen)
    assert not metrics["skipped"] and np.isfinite(metrics["loss"]) and float(metrics["grad_norm"]) > 0
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-2)
    np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], rtol=5e-2)
    steps = lambda new: pytree.flatten(jax.tree.map(jnp.subtract, new, state.trainable))  # noqa: E731
    grads, expected_grads = steps(unstack_layers(after.trainable)), steps(expected_after.trainable)
    scale = max(float(jnp.abs(g).max()) for g in expected_grads.values())
    for path, g in expected_grads.items():
        np.testing.assert_allclose(grads[path], g, atol=0.05 * scale, err_msg=path)


def test_lora_dropout_draws_one_key_per_layer_of_a_scanned_stack():
    _, scanned, _, stacked = stacked_params("llama")
    config = flaxlora.LoraConfig(rank=2, targets=r"q_proj/kernel$", stack_axes=SCANNED_STACK_AXES, dropout=0.5)
    lora = jax.tree.map(lambda x: x + 0.1, flaxlora.init_lora(stacked, config, jax.random.key(1)))  # b != 0
    keys = flatten_dict(adapter_collections(adapters_by_module(lora), config, jax.random.key(2))["lora_rng"])
    (key,) = keys.values()
    data = np.asarray(jax.random.key_data(key))
    assert data.shape[0] == CONFIGS["llama"].num_hidden_layers and len({tuple(row) for row in data}) == data.shape[0]
    ids, mask = inputs()
    train = lambda rng: flaxlora.apply_factored(scanned, {"params": stacked}, lora, config, ids, mask,  # noqa: E731
                                                lora_rng=rng)
    assert not np.allclose(train(jax.random.key(3)), train(jax.random.key(4)))


@pytest.mark.parametrize("kind", CONFIGS)
def test_checkpoint_tensors_load_straight_into_the_stacked_layout(kind):
    unrolled, scanned, params, stacked = stacked_params(kind, seed=3)
    state = to_hf(params)
    loaded, missing, unused = params_from_hf(scanned, state)
    assert not missing and not unused
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
    del state[next(name for name in state if ".1." in name)]  # one layer's tensor absent: named, not guessed
    with pytest.raises(ValueError, match=r"lacks layers \[1\]"):
        params_from_hf(scanned, state)


def test_scan_layers_refuses_t5_and_quantized_weights():
    t5 = flaxlora.models.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    with pytest.raises(ValueError, match="cannot be stacked"):
        scanned_config(t5)
    with pytest.raises(ValueError, match="--quantize"):
        scanned_config(CONFIGS["bert"], quantized=True)


def test_scan_layers_run_restores_and_exports_unrolled(qqp_script, data_dir, tmp_path):
    """A --scan-layers run trains with its layers stacked; restore and export see the unrolled
    model, whose predictions reproduce the run's own final evaluation."""
    out = tmp_path / "scanned"
    results = qqp_script.main(["--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "3",
                               "--batch-size", "8", "--max-length", "48", "--buckets", "48", "--eval-batch-size", "16",
                               "--scan-layers", "--dora", "--members", "1", "--quiet"])
    assert json.loads((out / "results.json").read_text())["mcc"] == results["mcc"]
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        trainable, _ = ckpt.restore_for_inference()
    assert any(f"/{SCANNED}/" in p for p in flaxlora.pytree.flatten(trainable))
    predictor = flaxlora.restore(out)
    test = load_qqp(data_dir)["test"]
    predicted = predictor.predict(test.question1, test.question2)
    assert np.mean(predicted == test.labels) == pytest.approx(results["accuracy"], abs=1e-6)
    exported = export(out, tmp_path / "peft", "peft")
    with safe_open(str(exported / "adapter_model.safetensors"), "np") as f:
        names = list(f.keys())
    assert any(".layer.5." in n for n in names) and not any(SCANNED in n for n in names)
    with pytest.raises(SystemExit, match="--quantize"):
        qqp_script.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "q"), "--scan-layers",
                         "--quantize", "nf4", "--quiet"])


def test_scan_layers_refuses_patterns_that_pick_some_layers_of_a_stack(qqp_script, data_dir, tmp_path):
    out = tmp_path / "indexed"
    with pytest.raises(SystemExit) as err:
        qqp_script.main(["--data-dir", str(data_dir), "--output-dir", str(out), "--scan-layers",
                         "--targets", r"layer/2/attention/self/query/kernel$", "--quiet"])
    assert "select bert/encoder/layer/2/attention/self/query/kernel but not the same parameter" in str(err.value)
    assert not out.exists()
