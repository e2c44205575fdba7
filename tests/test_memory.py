"""XLA's account of a compiled step's memory (flaxlora.memory), and the memory model against it."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from flaxlora.dataflow import checkpoint_after_cotangent, f32_accumulated_dot
from flaxlora.loading import load_config
from flaxlora.memory import estimate_memory, largest_batch, memory_account
from flaxlora.models import LlamaConfig, T5Config
from flaxlora.qqp.config import PRESETS


def _chain_gradient(dot):
    """The input gradient of four tanh layers on frozen float32 weights, multiplied in bf16."""
    def loss(x, weights):
        h = x
        for w in weights:
            h = jnp.tanh(dot(h, w))
        return jnp.sum(h.astype(jnp.float32))

    return jax.jit(jax.grad(loss))


def test_the_account_finds_the_bf16_copies_of_frozen_weights_a_plain_cast_keeps():
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    weights = [jax.ShapeDtypeStruct((256, 256), jnp.float32)] * 4
    plain = lambda h, w: h @ w.astype(jnp.bfloat16)  # noqa: E731  (the cast is kept for the backward pass)
    ours = lambda h, w: f32_accumulated_dot(h, w).astype(h.dtype)  # noqa: E731
    _, cast = memory_account(_chain_gradient(plain).lower(x, weights), ("batch", "frozen"))
    _, kept = memory_account(_chain_gradient(ours).lower(x, weights), ("batch", "frozen"))
    for account in (cast, kept):
        assert account.by_category["frozen"] == 4 * 256 * 256 * 4 and account.by_category["batch"] == 64 * 256 * 2
        assert account.by_category["activations"] > 0
        assert account.peak <= account.argument + account.output + account.temp
    assert cast.by_category["copies"] >= 3 * 256 * 256 * 2 and set(cast.copies_of) == {"frozen"}
    assert kept.by_category["copies"] == 0


def _adapted_stack_step(remat):
    """Loss and adapter gradients of six residual layers, each an RMS norm, a frozen (256, 768)
    weight with a rank-4 adapter (trained in layers 0, 2 and 4, frozen in the others: one layer
    function, called with different weights trained) and the weight's transpose back, under ``remat``."""
    def layer(weights, x):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        adapter = f32_accumulated_dot(f32_accumulated_dot(h, weights["a"]), weights["b"])
        h = f32_accumulated_dot(h, weights["w"]) + adapter
        return jnp.tanh(jnp.tanh(h) @ weights["w"].T) + x

    def loss(trained, frozen, x):
        for i, weights in enumerate(frozen):
            x = remat(layer)({**weights, **trained.get(str(i), {})}, x)
        return jnp.sum(x * x)

    key = jax.random.key(0)
    normal = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape) / 16  # noqa: E731
    adapter = lambda i: {"a": normal(10 + i, (256, 4)), "b": normal(20 + i, (4, 768))}  # noqa: E731
    frozen = [{"w": normal(i, (256, 768)), **({} if i % 2 == 0 else adapter(i))} for i in range(6)]
    args = ({str(i): adapter(i) for i in range(0, 6, 2)}, frozen, normal(99, (512, 256)) * 16)
    return jax.jit(jax.value_and_grad(loss)), args


def test_a_layer_checkpointed_after_its_cotangent_is_recomputed_one_at_a_time():
    """XLA:CPU drops jax.checkpoint's optimization barriers and hoists every layer's recomputation
    to the start of the backward pass; tied to the cotangent, one layer's is alive at a time. The
    same loss and gradients, and no gradient of a frozen weight formed (no dot of its shape in the
    lowered program)."""
    plain, args = _adapted_stack_step(lambda f: f)
    # jax.checkpoint of a new function per call: of one it has seen, it reuses the trace, which fails
    # where another layer trains other weights
    checkpointed, _ = _adapted_stack_step(lambda f: jax.checkpoint(lambda *args: f(*args)))
    ours, _ = _adapted_stack_step(checkpoint_after_cotangent)
    for got, want in zip(jax.tree.leaves(ours(*args)), jax.tree.leaves(plain(*args))):
        assert jnp.allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    names = ("trained", "frozen", "batch")
    _, jax_account = memory_account(checkpointed.lower(*args), names)
    _, account = memory_account(ours.lower(*args), names)
    assert account.by_category["activations"] <= 6 * 512 * 256 * 4  # the layers' inputs, nothing recomputed
    assert account.peak < 0.8 * jax_account.peak
    weight_gradients = re.findall(r"dot_general.*-> tensor<(256x768|768x256)xf32>", ours.lower(*args).as_text())
    assert not weight_gradients


def test_a_checkpoint_after_cotangent_takes_integer_and_untrained_outputs():
    """An integer output first (its cotangent float0) and an output the loss does not read."""
    fun = checkpoint_after_cotangent(lambda w, x: (jnp.argmax(x @ w, -1), jnp.tanh(x @ w), x @ w))
    plain = lambda w, x: (jnp.argmax(x @ w, -1), jnp.tanh(x @ w), x @ w)  # noqa: E731
    w, x = jnp.ones((4, 3)) / 4, jnp.arange(8.0).reshape(2, 4)
    for f in (fun, plain):
        assert f(w, x)[0].dtype == jnp.int32
    grads = [jax.grad(lambda w: jnp.sum(f(w, x)[1]))(w) for f in (fun, plain)]
    assert jnp.allclose(grads[0], grads[1], rtol=1e-6)


def test_the_account_is_xlas_own_with_the_persistent_cache_warm(tmp_path):
    """A program read back from the persistent cache comes without XLA's dumps: the account
    compiles past the cache, and the cache is on again after."""
    from flaxlora.training.compile import CompileCounter, use_compilation_cache

    lower = lambda: _chain_gradient(jnp.dot).lower(jax.ShapeDtypeStruct((8, 32), jnp.float32),  # noqa: E731
                                                   [jax.ShapeDtypeStruct((32, 32), jnp.float32)] * 2)
    use_compilation_cache(tmp_path)
    try:
        lower().compile()  # now in the cache
        _, account = memory_account(lower(), ("batch", "frozen"))
        assert account.by_category["frozen"] == 2 * 32 * 32 * 4 and not account.note
        with CompileCounter() as counter:
            lower().compile()
        assert (counter.programs, counter.from_cache) == (1, 1)
    finally:
        use_compilation_cache(None)


SMALL_LLAMA = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True)


@pytest.mark.parametrize(("model", "batch", "seq_len", "dtype", "remat"), [
    ("llama", 4, 128, "bfloat16", "none"), ("llama", 4, 128, "float32", "none"), ("llama", 8, 512, "bfloat16", "none"),
    ("llama", 4, 128, "bfloat16", "block"), ("llama", 4, 128, "bfloat16", "full"), ("minilm-l6", 32, 128, "float32", "none"),
])
def test_the_memory_model_is_within_15_percent_of_xlas_account(model, batch, seq_len, dtype, remat):
    """The model's peak against the live bytes at the peak of XLA's heap simulation of the compiled
    step; the weights exactly."""
    import bench_memory  # experiments/

    config = load_config(model) if model != "llama" else LlamaConfig(**SMALL_LLAMA)
    config = dataclasses.replace(config, remat=remat)
    lowered, _ = bench_memory.abstract_train_step(config, preset="lora", dtype=dtype, param_dtype="float32",
                                                  batch=batch, seq_len=seq_len)
    _, account = memory_account(lowered, ("state", "frozen", "batch"))
    estimate = estimate_memory(config, batch=batch, seq_len=seq_len, lora=PRESETS["lora"].lora, compute_dtype=dtype,
                               remat=remat)
    assert estimate.weights == account.by_category["frozen"]
    assert abs(estimate.peak / account.peak - 1) <= 0.15, (estimate, account.peak)


def test_the_largest_batch_is_the_last_that_fits():
    config, lora = LlamaConfig(**SMALL_LLAMA), PRESETS["lora"].lora
    budget = 200 * 2**20
    options = dict(seq_len=256, lora=lora, compute_dtype="bfloat16")
    largest = largest_batch(config, budget, usable=1.0, **options)
    assert largest > 1
    assert estimate_memory(config, batch=largest, **options).required <= budget
    assert estimate_memory(config, batch=largest + 1, **options).required > budget
    assert largest_batch(config, budget, usable=1.0, remat="full", **options) > largest  # less kept per example
    assert largest_batch(config, 10 * 2**20, **options) == 0  # not even the weights fit
    sharded = largest_batch(config, budget, usable=1.0, devices=8, **options)
    assert sharded % 8 == 0 and sharded > largest


def test_fsdp_shards_the_frozen_matrices_and_the_batch():
    config, lora = LlamaConfig(**SMALL_LLAMA), PRESETS["lora"].lora
    one = estimate_memory(config, batch=8, seq_len=128, lora=lora)
    eight = estimate_memory(config, batch=8, seq_len=128, lora=lora, devices=8, remat="full")
    assert eight.weights < one.weights / 7 and eight.activations < one.activations / 8
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        estimate_memory(config, batch=4, seq_len=128, lora=lora, devices=8)
    with pytest.raises(ValueError, match="Llama and BERT"):
        estimate_memory(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4), batch=1,
                        seq_len=8, lora=lora)


def test_a_live_range_dump_without_its_peak_section_is_refused_by_name():
    from flaxlora.memory.account import peak_buffers

    with pytest.raises(ValueError, match="Live ranges at N"):
        peak_buffers("HloLiveRange (max 3):\n  InstructionSequence:\n    0:p\n")
