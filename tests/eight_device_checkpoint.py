"""Run by test_checkpoint.py with 8 fake CPU devices: save a replicated train state and print the
sum of one adapter leaf."""

import sys

import jax
import numpy as np
from toy_models import ToyClassifier, toy_batches

import flaxlora
from flaxlora import training
from flaxlora.training import sharding
from flaxlora.training.checkpoint import Checkpointer

model = ToyClassifier(dropout=0.0)
batch = toy_batches(1)[0]
params = model.init(jax.random.key(0), batch["input_ids"], batch["attention_mask"])["params"]
config = flaxlora.LoraConfig(rank=4, targets=r"(query|value)/kernel$", trainable="^head/")
state, _ = training.init_train_state(params, config, flaxlora.lora_optimizer(1e-2), jax.random.key(1))
state = jax.device_put(state, sharding.replicated(sharding.make_mesh("data=8")))
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(state, {"x": 1})
print(repr(float(np.asarray(state.trainable["lora"]["query"]["kernel"]["a"]).sum())))
