"""Fold K adapters of one layout into one adapter of rank K r whose update is their mean.

    trainable, config_k = fold([member_0, member_1], config)   # {"lora": ..., "extras": ...} each

The mean of K LoRA updates ``(1/K) sum_k s a_k @ b_k`` is itself a LoRA update of rank K r:
``A = [a_1 ... a_K]`` (the a's side by side along the rank axis), ``B`` the b's stacked along it,
scaled by ``s / (K s')`` where ``s'`` is the folded adapter's own scale (alpha / (K r), or
alpha / sqrt(K r) for rsLoRA, with the same alpha), so that ``s' A @ B`` is the mean exactly and the
folded adapter is an ordinary one: it merges, exports to PEFT and serves as any other. Fully
trained extras (biases, norms, the head) are averaged. DoRA's magnitudes are averaged too, which
is not exact (its direction is normalised after the update): ``fold`` refuses DoRA adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.lora.adapters import adapters_by_path
from flaxlora.lora.config import LoraConfig, first_match
from flaxlora.pytree import PyTree


def fold(trainables: Sequence[PyTree], config: LoraConfig) -> tuple[PyTree, LoraConfig]:
    """``({"lora": folded adapters, "extras": mean extras}, config of rank K r)`` of K trained trees
    ``{"lora": adapters, "extras": params}`` of ``config``'s layout (e.g. an ensemble's members)."""
    k = len(trainables)
    if k < 1:
        raise ValueError("fold needs at least one trained tree")
    if config.use_dora:
        raise ValueError("fold: a DoRA update is normalised per output after it is added, so the mean of K DoRA "
                         "adapters is no DoRA adapter; keep them as an ensemble")
    folded_config = config.replace(rank=k * config.rank,
                                   rank_pattern={p: k * r for p, r in config.rank_pattern})
    members = [adapters_by_path(t["lora"]) for t in trainables]
    lora = {}
    for path, first in members[0].items():
        rank_axis = first_match(config.stack_axes, path, 0)  # b: (*stack, r, *fan_out); a: (..., r)
        factor = config.scale_for(path) / (k * folded_config.scale_for(path))
        lora[f"{path}/a"] = jnp.concatenate([m[path]["a"] for m in members], axis=-1)
        lora[f"{path}/b"] = factor * jnp.concatenate([m[path]["b"] for m in members], axis=rank_axis)
    extras = jax.tree.map(lambda *x: sum(x) / k, *[t["extras"] for t in trainables])
    return {"lora": pytree.unflatten(lora), "extras": extras}, folded_config
