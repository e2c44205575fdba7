"""Run by test_loading.py in a subprocess with 8 fake CPU devices: a tiny BERT folder loaded
straight into its shards on a (fsdp=4, tensor=2) mesh in bfloat16, then a PiSSA adapter with
trained extras initialised under the mesh; prints what the test checks as JSON.

    python tests/sharded_loading.py FOLDER
"""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from test_models import tiny_bert

import flaxlora
from flaxlora import pytree, training
from flaxlora.loading import HFFolder, load_pretrained, to_hf
from flaxlora.loading.registry import resolve
from flaxlora.models import init_params, sequence_classifier
from flaxlora.training import sharding

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
config = tiny_bert(num_labels=2)
params = init_params(sequence_classifier(config), jax.random.key(7))
(folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(resolve("minilm-l6") / name, folder)
save_file(to_hf(params), folder / "model.safetensors")

reads = []  # elements of every slice read from the file
read = HFFolder.read


def recording_read(self, name, index=()):
    value = read(self, name, index)
    reads.append(value.size)
    return value


HFFolder.read = recording_read

mesh = sharding.make_mesh("fsdp=4,tensor=2")
loaded = load_pretrained(folder, mesh=mesh, param_dtype=jnp.bfloat16)
expected_shardings = pytree.flatten(sharding.param_shardings(loaded.model, mesh))
flat = pytree.flatten(loaded.params)
from_file = {p: x for p, x in flat.items() if p not in loaded.missing}
rounded = pytree.flatten(jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), params))

config = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", init="pissa",
                             trainable=r"^(classifier|bert/encoder/layer/0/intermediate)/")
tx = flaxlora.lora_optimizer(1e-3)
state, frozen = training.init_train_state(loaded.params, config, tx, jax.random.key(1), mesh)
on_one = jax.device_put(loaded.params, jax.local_devices()[0])
one_state, one_frozen = training.init_train_state(on_one, config, tx, jax.random.key(1))

extras = pytree.flatten(state.trainable["extras"])
moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (32, 48)]
residuals = [p for p in pytree.flatten(frozen) if p.endswith(("query/kernel", "value/kernel"))]
print(json.dumps({
    "devices": jax.device_count(),
    "values_equal": all(np.array_equal(np.asarray(x), rounded[p]) for p, x in from_file.items()),
    "dtypes": sorted({str(x.dtype) for x in flat.values()}),
    "shardings_as_logical_axes": all(x.sharding == expected_shardings[p] for p, x in flat.items()),
    "split_params": sum(x.sharding.spec != jax.sharding.PartitionSpec() and
                        any(s is not None for s in x.sharding.spec) for x in flat.values()),
    "elements_read": sum(reads),
    "elements_of_distinct_shards": sum(math.prod(x.sharding.shard_shape(x.shape)) * len(
        {str(i) for i in x.sharding.devices_indices_map(x.shape).values()}) for x in from_file.values()),
    "elements_in_file": sum(x.size for x in from_file.values()),
    "residuals_sharded_like_weights": all(pytree.flatten(frozen)[p].sharding == expected_shardings[p]
                                          for p in residuals),
    "extras_sharded_like_weights": all(x.sharding == expected_shardings[p] for p, x in extras.items()),
    "extras_not_in_frozen": not set(extras) & set(pytree.flatten(frozen)),
    "adam_moments_sharded": len(moments) == 2 and all(m.sharding == extras[
        "bert/encoder/layer/0/intermediate/dense/kernel"].sharding for m in moments),
    "lora_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.trainable["lora"])),
    "same_as_one_device": all(np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)
                              for x, y in zip(jax.tree.leaves((state, frozen)), jax.tree.leaves((one_state, one_frozen)))),
}))

# QLoRA on the mesh (int8 here: the tiny widths are no multiple of NF4's blocks): codes and scales
# sharded along the mesh axes of their weight's dimensions; the forward equals one device's.
qlora = config.replace(init="lora")
quantized = load_pretrained(folder, mesh=mesh, quantize="int8", quantize_skip=qlora.trainable)
single = load_pretrained(folder, quantize="int8", quantize_skip=qlora.trainable)
q_state, q_frozen = training.init_train_state(quantized.params, qlora, tx, jax.random.key(1), mesh)
s_state, s_frozen = training.init_train_state(single.params, qlora, tx, jax.random.key(1))
kernel = pytree.flatten(q_frozen)["bert/encoder/layer/1/intermediate/dense/kernel"]
ids = np.arange(2, 66).reshape(8, 8) % 60 + 2
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": None}
forward = jax.jit(lambda f, t: training.logits_fn(quantized.model, qlora)(f, t, batch))
weight = jax.random.normal(jax.random.key(3), (256, 64))
placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
nf4 = jax.eval_shape(lambda w: flaxlora.quant.quantize_weight(w, "nf4"), weight)
nf4_sharded = jax.jit(lambda w: flaxlora.quant.quantize_weight(w, "nf4"), out_shardings=nf4.replace(
    data=nf4.data_shardings(placed)))(jax.device_put(weight, placed))
print(json.dumps({
    "nf4_codes_split": all(not x.sharding.is_fully_replicated for x in nf4_sharded.data.values()),
    "nf4_decodes_alike": bool(np.array_equal(flaxlora.quant.dequantize_weight(nf4_sharded),
                                             flaxlora.quant.dequantize_weight(flaxlora.quant.quantize_weight(weight, "nf4")))),
    "quantized_codes_sharded": kernel.data["codes"].sharding.spec == expected_shardings[
        "bert/encoder/layer/1/intermediate/dense/kernel"].spec,
    "quantized_logits_close": bool(np.allclose(forward(q_frozen, q_state.trainable), forward(s_frozen, s_state.trainable),
                                               atol=1e-5)),
}))
