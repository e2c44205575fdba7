"""Resolve a LoraConfig against a parameter tree: which leaves are adapted, and how."""

from __future__ import annotations

import dataclasses
import math
import re

from flaxlora import pytree
from flaxlora.lora.config import LoraConfig, first_match
from flaxlora.pytree import PyTree


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel of shape ``stack + fan_in + fan_out``.

    The adapter is ``a: (*stack, *fan_in, rank)`` and ``b: (*stack, rank, *fan_out)`` (and
    ``magnitude: (*stack, *fan_out)`` for DoRA); the update is ``scale * a @ b`` over the
    flattened fan-in and fan-out axes.
    """

    path: str
    rank: int
    scale: float
    stack: tuple[int, ...]
    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]

    @property
    def n_in(self) -> int:
        return math.prod(self.fan_in)

    @property
    def n_out(self) -> int:
        return math.prod(self.fan_out)


def lora_candidates(params: PyTree) -> list[tuple[str, tuple[int, ...]]]:
    """Paths and shapes of the leaves LoRA can adapt (every leaf with two or more axes).

    Use it to write ``LoraConfig.targets``: the regex is searched in these paths.
    """
    return [(p, tuple(x.shape)) for p, x in pytree.flatten(params).items() if getattr(x, "ndim", 0) >= 2]


def _candidates_hint(params: PyTree, limit: int = 12) -> str:
    names = [p for p, _ in lora_candidates(params)]
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_targets(params: PyTree, config: LoraConfig) -> dict[str, Target]:
    """``{path: Target}`` for every leaf of ``params`` that ``config.targets`` selects.

    Raises ValueError naming the problem when a pattern matches nothing, a kernel has too few axes
    for its layout, a rank exceeds min(fan_in, fan_out), or a leaf is both adapted and trainable.
    """
    if config.targets is None:
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError("LoraConfig.rank_pattern / alpha_pattern given but targets is None")
        return {}
    candidates = lora_candidates(params)
    for field in ("in_axes", "stack_axes"):
        for pattern, _ in getattr(config, field):
            if not any(re.search(pattern, p) for p, _ in candidates):
                raise ValueError(f"LoraConfig.{field} pattern {pattern!r} matches no parameter with >= 2 axes")
    targets: dict[str, Target] = {}
    for path, shape in candidates:
        if not re.search(config.targets, path):
            continue
        n_stack = first_match(config.stack_axes, path, 0)
        n_in = first_match(config.in_axes, path, 1)
        if len(shape) < n_stack + n_in + 1:
            raise ValueError(
                f"LoRA target {path!r} has shape {shape}: too few axes for {n_stack} stacked and "
                f"{n_in} input axes plus at least one output axis (check stack_axes / in_axes)"
            )
        target = Target(
            path=path,
            rank=config.rank_for(path),
            scale=config.scale_for(path),
            stack=shape[:n_stack],
            fan_in=shape[n_stack : n_stack + n_in],
            fan_out=shape[n_stack + n_in :],
        )
        if target.rank > min(target.n_in, target.n_out):
            raise ValueError(
                f"LoRA rank {target.rank} for {path!r} exceeds min(fan_in, fan_out) = "
                f"min({target.n_in}, {target.n_out}) of its kernel of shape {shape}"
            )
        targets[path] = target
    if not targets:
        raise ValueError(
            f"LoraConfig.targets {config.targets!r} matches no parameter with >= 2 axes; "
            f"candidates are: {_candidates_hint(params)}"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern, _ in getattr(config, field):
            if not any(re.search(pattern, p) for p in targets):
                raise ValueError(f"LoraConfig.{field} pattern {pattern!r} matches no LoRA target")
    overlap = [p for p in targets if config.trainable and re.search(config.trainable, p)]
    if overlap:
        raise ValueError(f"parameters both LoRA-adapted and fully trainable: {overlap[:5]}")
    return targets


def trainable_paths(params: PyTree, config: LoraConfig) -> list[str]:
    """Paths of the parameters trained in full (``config.trainable``); [] when it is None."""
    if config.trainable is None:
        return []
    found = [p for p in pytree.flatten(params) if re.search(config.trainable, p)]
    if not found:
        names = list(pytree.flatten(params))
        raise ValueError(
            f"LoraConfig.trainable {config.trainable!r} matches no parameter; parameters include: "
            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
    return found
