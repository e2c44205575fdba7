"""Logical axis names of the model parameters, default mesh rules, and unboxing.

Parameters are created boxed in `nn.LogicallyPartitioned` (logical axis names attached). The rest
of the library works on plain arrays: use `init_params` (init + unbox) and, for sharding,
`logical_partition_specs` together with `LOGICAL_AXIS_RULES`, e.g.
`nn.logical_to_mesh_sharding(logical_partition_specs(model), mesh, LOGICAL_AXIS_RULES)`.

Logical axes:
  vocab        vocabulary rows of token embeddings / LM head
  embed        the model (hidden) width
  embed_out    the output width of hidden -> hidden heads (pooler, RoBERTa head dense)
  heads        query heads x head_dim (the merged attention width; also BERT's key/value)
  kv           key/value heads x head_dim (grouped-query k_proj / v_proj outputs)
  mlp          feed-forward width
  norm         LayerNorm / RMSNorm parameters
  positions    absolute position embedding rows
  buckets      relative position bucket rows (T5)
  head_count   one column per attention head (T5's relative position bias)
  token_types  token type embedding rows
  classes      classification labels
  layers       the leading layer axis of a scanned stack's params (`flaxlora.models.scan`)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axis -> mesh axis (or axes, or None = replicated), for a mesh with axes
# ('data', 'fsdp', 'tensor'): FSDP shards the hidden width, tensor parallelism the heads/MLP/vocab.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("buckets", None),
    ("head_count", None),
    ("token_types", None),
    ("classes", None),
    ("layers", None),
)


def _boxed_init(model: nn.Module, rng: jax.Array) -> Any:
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids))["params"]


def init_params(model: nn.Module, rng: jax.Array) -> Any:
    """Randomly initialised parameters of `model`, as a tree of plain arrays."""
    return nn.meta.unbox(jax.jit(functools.partial(_boxed_init, model))(rng))


def logical_partition_specs(model: nn.Module) -> Any:
    """The params tree of `model` with a `PartitionSpec` of logical axis names per leaf
    (computed abstractly: nothing is allocated)."""
    boxed = jax.eval_shape(lambda: _boxed_init(model, jax.random.key(0)))
    return nn.get_partition_spec(boxed)

