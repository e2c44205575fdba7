"""QLoRA: the NF4 code book and round trip, int8, GGUF blocks decoded bit for bit like gguf's own
dequantisation, x @ deq(W) with LoRA (and DoRA) on top, and quantized runs end to end."""

import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from jax.scipy.special import ndtri
from test_models import tiny_bert

import flaxlora
from flaxlora import pytree, training
from flaxlora.loading import GGUFFile, load_pretrained
from flaxlora.loading.gguf_file import hf_name, unpermute_rows
from flaxlora.loading.registry import resolve
from flaxlora.models import init_params, sequence_classifier
from flaxlora.quant import (
    NF4_CODEBOOK,
    dequantize,
    dequantize_weight,
    from_gguf_blocks,
    quantize,
    quantize_weight,
)
from flaxlora.quant.arrays import NF4_BLOCK


def test_nf4_codebook_is_the_papers_normal_quantiles():
    """Dettmers et al. 2023: 2^(k-1) quantiles of N(0, 1) for the positive half and 2^(k-1) - 1 for
    the negative one (from 1 - 0.5 * (1/32 + 1/30) down to the median), normalised to [-1, 1], 0 exact."""
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = ndtri(jnp.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(jnp.linspace(offset, 0.5, 8)[:-1])
    values = jnp.sort(jnp.concatenate([positive, jnp.zeros(1), negative]))
    np.testing.assert_allclose(NF4_CODEBOOK, values / values.max(), atol=1e-6)  # float32 quantiles
    assert NF4_CODEBOOK[7] == 0 and NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[-1] == 1


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq", "int8"])
def test_round_trip_error_within_half_a_code_step(scheme):
    w = jax.random.normal(jax.random.key(0), (256, 96)) * jnp.linspace(0.1, 3.0, 96)
    q = quantize_weight(w, scheme)
    back = dequantize_weight(q)
    assert q.shape == (256, 96) and back.shape == w.shape
    if scheme == "int8":
        bound = jnp.max(jnp.abs(w), axis=0) / 127 / 2 + 1e-6
        assert bool(jnp.all(jnp.abs(back - w) <= bound))
        assert q.nbytes < w.size * 1.1
        return
    blocks = jnp.abs(w).reshape(-1, NF4_BLOCK, 96).max(axis=1)  # absmax of each block
    half_gap = np.max(np.diff(NF4_CODEBOOK)) / 2
    # Double quantization moves each absmax by at most half its int8 step (|code| <= 1).
    scale_error = float(jnp.max(q.data["absmax_step"])) / 2 if scheme == "nf4-dq" else 0.0
    bound = jnp.repeat(blocks, NF4_BLOCK, axis=0) * half_gap + scale_error + 1e-6
    assert bool(jnp.all(jnp.abs(back - w) <= bound))
    if scheme == "nf4":  # each weight is the nearest code times its block's absmax: quantizing again changes nothing
        np.testing.assert_array_equal(dequantize_weight(quantize_weight(back, scheme)), back)
    assert q.nbytes * 8 / w.size <= (4.5 if scheme == "nf4" else 4.35)


def test_gguf_blocks_decode_bit_for_bit_like_gguf():
    """Q4_1 and Q8_0 tensors of the SmolLM2 file, and Q4_0 / Q4_1 / Q8_0 written by gguf's own
    quantizer: our JAX decoding equals gguf's numpy dequantisation exactly (q/k rows in HF order)."""
    file = GGUFFile(resolve("smollm2-135m"))
    heads = file.config()["num_attention_heads"]
    types = set()
    for t in (t for t in file.reader.tensors if t.name in ("token_embd.weight", "blk.0.attn_q.weight",
                                                             "blk.0.attn_k.weight", "blk.0.ffn_down.weight")):
        name = hf_name(t.name)
        expected = gguf_dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if "q_proj" in name or "k_proj" in name:
            expected = unpermute_rows(expected, heads if "q_proj" in name else file.config()["num_key_value_heads"])
        type_name, raw = file.read_blocks(name)
        q = from_gguf_blocks(raw, type_name, expected.shape[::-1])
        np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_weight)(q)), expected.T, err_msg=name)
        types.add(type_name)
    assert types == {"Q4_1", "Q8_0"}
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)  # (out, in) as stored
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        raw = gguf_quantize(w, qtype)
        q = from_gguf_blocks(raw, qtype.name, (128, 48))
        np.testing.assert_array_equal(np.asarray(dequantize_weight(q)), gguf_dequantize(raw, qtype).T)
    with pytest.raises(ValueError, match="Q3_K is not kept as stored"):
        from_gguf_blocks(raw, "Q3_K", (128, 48))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_decode_bit_for_bit_like_gguf(type_name):
    """Super-blocks of 256 with packed 6-bit (Q4_K, Q5_K) or int8 (Q6_K) sub-block scales, as in
    Q4_K_M / Q5_K_M / Q6_K files: every bit pattern of codes and sub-scales (random bytes, fp16
    scales random but finite) decodes, eagerly and jitted, exactly as gguf dequantises it, and
    the codes and scales shard along the weight's input axis by super-block."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_out, n_in = 16, 4 * block
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    fp16 = [slice(0, 4)] if type_name != "Q6_K" else [slice(size - 2, size)]  # d (and dmin) fields
    for where in fp16:
        width = where.stop - where.start
        raw[..., where] = (rng.standard_normal((n_out, n_in // block, width // 2)) * 0.01).astype(
            np.float16).view(np.uint8)
    raw = raw.reshape(n_out, -1)
    expected = gguf_dequantize(raw, qtype).reshape(n_out, n_in).T
    q = from_gguf_blocks(raw, type_name, (n_in, n_out))
    assert q.nbytes == raw.nbytes and q.scheme == type_name.lower()
    np.testing.assert_array_equal(np.asarray(dequantize_weight(q)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_weight)(q)), expected)
    mesh = training.sharding.make_mesh(f"fsdp={len(jax.devices())}")
    weight = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    placed = jax.device_put(q, q.replace(data=q.data_shardings(weight)))
    assert all(tuple(x.sharding.spec)[:2] == (None, "fsdp") for x in placed.data.values())
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_weight)(placed)), expected)


def test_gguf_type_that_cannot_be_kept_is_named_before_any_tensor_is_read(monkeypatch):
    stored_as = GGUFFile.tensor_type
    odd = "model.layers.3.mlp.up_proj.weight"
    monkeypatch.setattr(GGUFFile, "tensor_type", lambda self, name: "Q3_K" if name == odd else stored_as(self, name))
    for method in ("read", "read_blocks"):
        monkeypatch.setattr(GGUFFile, method, lambda *_: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=rf"{re.escape(odd)} is stored as Q3_K.*keeps Q4_0.*Q6_K.*--quantize nf4"):
        load_pretrained("smollm2-135m", quantize="gguf")


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(use_dora):
    """x @ deq(W) + s (x@a)@b: logits and adapter gradients as on the float weights deq(W), no
    gradient for codes or scales, and the train step never differentiates them."""
    model = sequence_classifier(tiny_bert(num_labels=2, hidden_size=64, intermediate_size=128))
    params = init_params(model, jax.random.key(0))
    config = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", trainable=r"^classifier/",
                                 use_dora=use_dora)
    quantized = quantize(params, "nf4", targets=r"^bert/encoder/.*kernel$")
    assert sum(flaxlora.quant.is_quantized(x) for x in pytree.flatten(quantized).values()) == 12
    tx = flaxlora.lora_optimizer(1e-2)
    state, frozen = training.init_train_state(quantized, config, tx, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.01, state.trainable)
    ids = jax.random.randint(jax.random.key(2), (2, 8), 1, 60)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": None}
    apply = training.logits_fn(model, config)
    on_codes = jax.jit(lambda f, t: apply(f, t, batch))(frozen, trainable)
    on_floats = apply(dequantize(frozen), trainable, batch)
    np.testing.assert_allclose(on_codes, on_floats, atol=1e-6)
    grads = jax.grad(lambda t: apply(frozen, t, batch).sum())(trainable)
    float_grads = jax.grad(lambda t: apply(dequantize(frozen), t, batch).sum())(trainable)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(float_grads)):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    codes_grads = jax.grad(lambda f: apply(f, trainable, batch).sum(), allow_int=True)(frozen)
    query = codes_grads["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert all(not np.any(np.asarray(x, np.float32)) for x in jax.tree.leaves(query.data)
               if x.dtype != jax.dtypes.float0)


def test_quantized_run_trains_restores_and_refuses_what_it_cannot_do(qqp_script, data_dir, tmp_path):
    def flags(out, *extra):
        return ["--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8",
                "--max-length", "32", "--buckets", "32", "--eval-batch-size", "16", "--eval-examples", "32",
                "--eval-every", "0", "--seed", "2", "--members", "1", "--quiet", *extra]

    out = tmp_path / "nf4"
    results = qqp_script.main(flags(out, "--quantize", "nf4"))
    assert results["run"]["quantize"] == "nf4" and np.isfinite(results["loss"])
    from flaxlora.qqp.data import load_qqp

    test = load_qqp(data_dir)["test"].sample(32)
    predicted = flaxlora.restore(out).predict(test.question1, test.question2)
    assert np.mean(predicted == test.labels) == pytest.approx(results["accuracy"], abs=1.5 / 32)
    # The merged export folds the adapter into the decoded base, the weights the run trained on.
    from flaxlora.interop.export import export
    from flaxlora.loading import load_pretrained

    export(out, tmp_path / "merged", "merged")
    merged = load_pretrained(tmp_path / "merged")
    pairs = merged.tokenizer(test.question1[:4], test.question2[:4], padding="max_length", truncation=True,
                             max_length=32, return_tensors="np")
    logits = merged.model.apply({"params": merged.params}, pairs["input_ids"], pairs["attention_mask"],
                                pairs["token_type_ids"])
    np.testing.assert_allclose(logits, flaxlora.restore(out).logits(test.question1[:4], test.question2[:4]),
                               atol=1e-4)
    for extra, message in ((["--quantize", "gguf"], "not a GGUF model"),
                           (["--quantize", "nf4", "--preset", "full"], "full fine-tuning freezes none"),
                           (["--quantize", "nf4", "--lora-path", "merged"], "factored")):
        with pytest.raises(SystemExit) as err:
            qqp_script.main(flags(tmp_path / "bad", *extra))
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "bad" / "checkpoints").exists()


def test_gguf_blocks_train_like_their_dequantized_weights(qqp_script, data_dir, tmp_path):
    """SmolLM2 with --quantize gguf (Q4_1/Q8_0 blocks as stored) gives the loss curve of the same
    run on the file dequantised (same weights: equal up to float rounding)."""
    def flags(out, *extra):
        return ["--model", "smollm2-135m", "--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "3",
                "--log-every", "1", "--batch-size", "8", "--max-length", "32", "--buckets", "32",
                "--eval-batch-size", "8", "--eval-examples", "8", "--eval-every", "0", "--preset", "lora", "--quiet",
                *extra]

    import json

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "split" not in r]

    qqp_script.main(flags(tmp_path / "gguf", "--quantize", "gguf"))
    qqp_script.main(flags(tmp_path / "float"))
    np.testing.assert_allclose(losses(tmp_path / "gguf"), losses(tmp_path / "float"), rtol=2e-4)
    assert len(losses(tmp_path / "gguf")) == 3
