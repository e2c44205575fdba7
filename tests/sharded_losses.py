"""Run by test_train.py in a subprocess with 8 fake CPU devices: training losses of a tiny BERT
(frozen weights sharded by their logical axes) on a (data=4, fsdp=2) mesh and on one device, and
of the same BERT with its layers scanned (stacked params) on (fsdp=4, tensor=2) and on one device,
printed as JSON."""

import json

import jax
from test_models import tiny_bert
from toy_models import toy_batches

import flaxlora
from flaxlora import training
from flaxlora.models import (
    init_params,
    sequence_classifier,
)
from flaxlora.models.scan import SCANNED_STACK_AXES
from flaxlora.training import sharding

CONFIG = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", trainable=r"^classifier/", dropout=0.1)


def losses(mesh, scan=False):
    config = CONFIG.replace(stack_axes=SCANNED_STACK_AXES) if scan else CONFIG
    model = sequence_classifier(tiny_bert(num_labels=2, vocab_size=32, scan_layers=scan))
    params = jax.device_put(init_params(model, jax.random.key(0)), sharding.param_shardings(model, mesh))
    tx = flaxlora.lora_optimizer(1e-2)
    state, frozen = training.init_train_state(params, config, tx, jax.random.key(1), mesh)
    apply = training.logits_fn(model, config, "factored")
    step, _ = training.jit_train_step(apply, tx, mesh, state, frozen, training.StepOptions(accum_steps=2))
    out = []
    for b in toy_batches(6, batch_size=16, seed=1):
        state, metrics = step(state, frozen, sharding.global_batch(b, mesh))
        out.append(float(metrics["loss"]))
    split = [x.sharding.spec for x in jax.tree.leaves(frozen) if "fsdp" in str(x.sharding.spec)]
    return out, bool(split)


single, _ = losses(sharding.make_mesh("data=1", jax.devices()[:1]))
mesh, split = losses(sharding.make_mesh("data=4,fsdp=2"))
scanned_single, _ = losses(sharding.make_mesh("data=1", jax.devices()[:1]), scan=True)
scanned_mesh, scanned_split = losses(sharding.make_mesh("fsdp=4,tensor=2"), scan=True)
print(json.dumps({"devices": jax.device_count(), "single": single, "mesh": mesh, "sharded_frozen": split,
                  "scanned_single": scanned_single, "scanned_mesh": scanned_mesh, "scanned_sharded_frozen": scanned_split}))
