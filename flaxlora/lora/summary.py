"""How many parameters are trained: totals and a row per adapted target."""

from __future__ import annotations

import dataclasses
import math

from flaxlora import pytree
from flaxlora.lora.adapters import adapters_by_path, with_extras
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.targets import resolve_targets
from flaxlora.pytree import PyTree


def count(tree: PyTree) -> int:
    """Number of scalars in ``tree``."""
    return sum(math.prod(x.shape) for x in pytree.flatten(tree).values())


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    """Parameter counts. ``total`` counts the base model plus the adapters (as PEFT does)."""

    base: int
    adapter: int
    extras: int
    rows: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (path, kernel shape, rank, adapter params)

    @property
    def trainable(self) -> int:
        return self.adapter + self.extras

    @property
    def total(self) -> int:
        return self.base + self.adapter

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        lines = [f"{'target':<{width}}  {'kernel shape':<18} {'rank':>4} {'params':>10}"]
        lines += [f"{p:<{width}}  {str(s):<18} {r:>4} {n:>10,}" for p, s, r, n in self.rows]
        lines.append(
            f"trainable: {self.trainable:,} (adapters {self.adapter:,} + extras {self.extras:,}) "
            f"of {self.total:,} = {100 * self.trainable_fraction:.3f}%"
        )
        return "\n".join(lines)


def summarize(params: PyTree, lora_params: PyTree, config: LoraConfig, extras: PyTree | None = None) -> ParamSummary:
    """Trainable vs total parameters and a row per target of ``config``."""
    adapters = adapters_by_path(lora_params)
    params = with_extras(params, extras)  # a frozen tree may be held without its extras
    flat = pytree.flatten(params)
    rows = tuple(
        (p, tuple(flat[p].shape), t.rank, count(adapters[p])) for p, t in resolve_targets(params, config).items()
    )
    return ParamSummary(
        base=count(params),
        adapter=count(lora_params),
        extras=count(extras) if extras is not None else 0,
        rows=rows,
    )
