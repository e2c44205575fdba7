"""Run by test_train.py in a subprocess with 8 fake CPU devices: losses on a (data=4, fsdp=2)
mesh and on one device, printed as JSON."""

import json

import jax
from toy_models import ToyClassifier, toy_batches

import flaxlora
from flaxlora import sharding, train

CONFIG = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", trainable=r"^head/")


def losses(mesh):
    model = ToyClassifier(dropout=0.1)
    batches = toy_batches(6, batch_size=16, seed=1)
    params = model.init(jax.random.key(0), batches[0]["input_ids"], batches[0]["attention_mask"])["params"]
    tx = flaxlora.lora_optimizer(1e-2)
    state, frozen = train.init_train_state(params, CONFIG.replace(dropout=0.1), tx, jax.random.key(1))
    frozen_shardings = sharding.fsdp_shardings(frozen, mesh)
    frozen = jax.device_put(frozen, frozen_shardings)
    apply = train.logits_fn(model, CONFIG.replace(dropout=0.1), "factored")
    step, state_shardings = train.jit_train_step(apply, tx, mesh, state, frozen_shardings,
                                                 train.StepOptions(accum_steps=2))
    state = jax.device_put(state, state_shardings)
    out = []
    for b in batches:
        state, metrics = step(state, frozen, sharding.global_batch(b, mesh))
        out.append(float(metrics["loss"]))
    split = any(len(s.device_set) > 1 and not s.is_fully_replicated for s in jax.tree.leaves(frozen_shardings))
    return out, split


single, _ = losses(sharding.make_mesh("data=1", jax.devices()[:1]))
mesh, split = losses(sharding.make_mesh("data=4,fsdp=2"))
print(json.dumps({"devices": jax.device_count(), "single": single, "mesh": mesh, "sharded_frozen": split}))
