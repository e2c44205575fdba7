"""LoraConfig: what to adapt, with which rank, scaling, initialisation and variant."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from flaxlora.lora.variants import INITS

SCALINGS = ("standard", "rslora")

Patterns = tuple[tuple[str, Any], ...]


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{field}: invalid regex {pattern!r}: {err}") from None


def _as_patterns(field: str, value: Mapping[str, Any] | Patterns, check) -> Patterns:
    items = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(kv) for kv in value)
    for pattern, v in items:
        _check_regex(field, pattern)
        check(pattern, v)
    return items


def first_match(patterns: Patterns, path: str, default: Any) -> Any:
    """The value of the first pattern searched in ``path``, else ``default``."""
    for pattern, value in patterns:
        if re.search(pattern, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A validated, hashable LoRA configuration (usable as a static argument of ``jax.jit``).

    Attributes:
      rank: adapter rank r.
      alpha: scaling numerator: the update is ``(alpha / r) * a @ b`` (``alpha / sqrt(r)`` with
        ``scaling="rslora"``, Kalajdzievski 2023).
      targets: regex searched (``re.search``) in the '/'-joined path of every leaf with >= 2 axes
        (see :func:`flaxlora.lora_candidates`), like PEFT's ``target_modules``; None for no
        adapters at all (full or head-only fine-tuning through ``trainable``).
      rank_pattern / alpha_pattern: ``{regex: value}`` overrides of rank / alpha per target; the
        first regex found in a target's path wins.
      dropout: dropout on the adapter's input (factored path only, see :func:`flaxlora.lora_interceptor`).
      init: ``"lora"`` (Kaiming-uniform a, zero b: Hu et al. and PEFT's default), ``"gaussian"``
        (a ~ N(0, 1/r^2), zero b), ``"pissa"`` (principal singular vectors, Meng et al. 2024) or
        ``"olora"`` (QR, Büyükakyüz 2024). The last two move the adapted part out of the frozen
        weight: use :func:`flaxlora.init_adapter`, which also returns the residual base.
      scaling: ``"standard"`` or ``"rslora"``.
      use_dora: weight-decomposed LoRA (Liu et al. 2024): per-output-unit magnitude times the
        normalised direction of ``W + s a @ b``.
      trainable: regex of parameters trained in full (head, biases, LayerNorm: PEFT's
        ``modules_to_save``), or None.
      in_axes: ``{regex: n}``: number of input axes of multi-dimensional kernels (default 1). A
        kernel of shape ``(*stack, *in, *out)`` is adapted as the matrix (prod(in), prod(out)).
        Flax ``DenseGeneral`` q/k/v kernels (d_model, heads, head_dim) need no entry; an output
        projection (heads, head_dim, d_model) needs 2.
      stack_axes: ``{regex: n}``: number of leading axes that index independent layers, e.g. 1
        for params stacked by ``nn.scan`` (default 0). Each layer gets its own adapter.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | None = r"(query|value|q_proj|v_proj)/kernel$"
    rank_pattern: Mapping[str, int] | Patterns = ()
    alpha_pattern: Mapping[str, float] | Patterns = ()
    dropout: float = 0.0
    init: str = "lora"
    scaling: str = "standard"
    use_dora: bool = False
    trainable: str | None = None
    in_axes: Mapping[str, int] | Patterns = ()
    stack_axes: Mapping[str, int] | Patterns = ()

    def __post_init__(self) -> None:
        def positive_int(field):
            def check(pattern, v):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"LoraConfig.{field}[{pattern!r}] must be an integer >= 1, got {v!r}")
            return check

        def positive_float(pattern, v):
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{pattern!r}] must be > 0, got {v!r}")

        def non_negative_int(pattern, v):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"LoraConfig.stack_axes[{pattern!r}] must be an integer >= 0, got {v!r}")

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if self.targets is None:
            if self.trainable is None:
                raise ValueError("LoraConfig with targets=None trains nothing: set `trainable` too")
        elif not isinstance(self.targets, str) or not self.targets:
            raise ValueError("LoraConfig.targets must be a non-empty regex string or None")
        else:
            _check_regex("targets", self.targets)
        if self.trainable is not None:
            _check_regex("trainable", self.trainable)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {tuple(INITS)}, got {self.init!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"LoraConfig.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("rank_pattern", _as_patterns("rank_pattern", self.rank_pattern, positive_int("rank_pattern")))
        set_("alpha_pattern", _as_patterns("alpha_pattern", self.alpha_pattern, positive_float))
        set_("in_axes", _as_patterns("in_axes", self.in_axes, positive_int("in_axes")))
        set_("stack_axes", _as_patterns("stack_axes", self.stack_axes, non_negative_int))
        set_("alpha", float(self.alpha))

    def rank_for(self, path: str) -> int:
        return first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return float(first_match(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        """The factor s multiplying ``a @ b`` at ``path``: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.scaling == "rslora" else r)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``LoraConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        for name in ("rank_pattern", "alpha_pattern", "in_axes", "stack_axes"):
            d[name] = dict(getattr(self, name))
        return d

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)
