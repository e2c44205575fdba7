"""Importance-based rank allocation: spread a fixed total rank over the targets before training.

A target's importance is read from the mean loss gradient G of its frozen weight over a few
batches. To first order, the best rank-k update of unit norm lowers the loss by
``||G_k||_F = sqrt(sum_{j<=k} sigma_j(G)^2)``, so each extra rank unit is worth the next squared
singular value of G. Greedily giving rank units to the target with the largest next
``sigma_j^2`` maximises the total first-order gain ``sum_t sum_{j<=r_t} sigma_j(G_t)^2`` under
``sum_t r_t = budget``. Unlike AdaLoRA, which prunes ranks during training, the ranks are fixed
up front, so every shape stays static and nothing recompiles.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import pytree
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.targets import resolve_targets
from flaxlora.pytree import PyTree


def gradient_spectra(
    loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, config: LoraConfig, batches: Iterable[Any]
) -> dict[str, np.ndarray]:
    """Singular values (descending) of the mean gradient of ``loss_fn(params, batch)`` w.r.t.
    each target weight of ``config``, viewed as its (n_in, n_out) matrix; for stacked targets,
    the mean over the stack of the squared values, square-rooted."""
    targets = resolve_targets(params, config)
    flat = pytree.flatten(params)
    weights = {p: flat[p] for p in targets}

    @jax.jit
    def grads(weights, batch):
        return jax.grad(lambda w: loss_fn(pytree.replace(params, w), batch))(weights)

    total, count = None, 0
    for batch in batches:
        g = grads(weights, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if not count:
        raise ValueError("gradient_spectra needs at least one batch")
    spectra = {}
    for p, t in targets.items():
        g = (total[p] / count).astype(jnp.float32).reshape(-1, t.n_in, t.n_out)
        s2 = jnp.mean(jnp.square(jnp.linalg.svd(g, compute_uv=False)), axis=0)
        spectra[p] = np.sqrt(np.asarray(s2))
    return spectra


def allocate_ranks(
    spectra: dict[str, np.ndarray], budget: int, min_rank: int = 1, max_rank: int | None = None
) -> dict[str, int]:
    """Ranks summing to ``budget``: ``min_rank`` each, the rest greedily by next sigma^2."""
    if budget < min_rank * len(spectra):
        raise ValueError(f"rank budget {budget} < min_rank {min_rank} x {len(spectra)} targets")
    caps = {p: min(len(s), max_rank or len(s)) for p, s in spectra.items()}
    if budget > sum(caps.values()):
        raise ValueError(f"rank budget {budget} exceeds the most the targets can hold ({sum(caps.values())})")
    ranks = {p: min_rank for p in spectra}
    heap = [(-float(s[min_rank] ** 2), p) for p, s in spectra.items() if min_rank < caps[p]]
    heapq.heapify(heap)
    for _ in range(budget - min_rank * len(spectra)):
        _, p = heapq.heappop(heap)
        ranks[p] += 1
        if ranks[p] < caps[p]:
            heapq.heappush(heap, (-float(spectra[p][ranks[p]] ** 2), p))
    return ranks


def with_ranks(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """``config`` with a per-target rank; alpha follows the rank so alpha/r (or alpha/sqrt r) stays
    what ``config`` gives at its base rank."""
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("rank allocation sets every target's rank and alpha: start from a config "
                         "without rank_pattern / alpha_pattern")
    ratio = (lambda r: r / config.rank) if config.scaling == "standard" else (lambda r: (r / config.rank) ** 0.5)
    exact = lambda p: f"^{re.escape(p)}$"  # noqa: E731
    return config.replace(
        rank_pattern={exact(p): r for p, r in ranks.items()},
        alpha_pattern={exact(p): config.alpha * ratio(r) for p, r in ranks.items()},
    )


def allocate(
    config: LoraConfig,
    params: PyTree,
    loss_fn: Callable[[PyTree, Any], jax.Array],
    batches: Iterable[Any],
    budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> LoraConfig:
    """``config`` with its targets' ranks re-spread by gradient importance; the default budget
    is ``config.rank`` per target (the same parameter count for equal-shaped targets)."""
    spectra = gradient_spectra(loss_fn, params, config, batches)
    budget = budget if budget is not None else config.rank * len(spectra)
    return with_ranks(config, allocate_ranks(spectra, budget, min_rank, max_rank))
