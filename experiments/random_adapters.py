"""Untrained adapters with random non-zero factors, saved as run folders that ``flaxlora.restore``
and ``flaxlora.restore_many`` read like trained ones: for speed measurements, where an adapter's
quality does not matter and training it would cost minutes of CPU (or a network on a GPU machine).

Each is a checkpoint of the QQP run format (``OUT/checkpoints/0``: the trainable tree, an empty
optimizer state and the run's meta with its RunConfig and base provenance), written by
:class:`flaxlora.training.checkpoint.Checkpointer`. ``b`` is drawn N(0, 0.02^2) instead of 0 and
the fully trained extras (head, BitFit biases and norms) are the base's plus N(0, 0.02^2), so
adapters differ as trained ones do.
"""

from __future__ import annotations

from pathlib import Path

import jax
import optax

from flaxlora import pytree
from flaxlora.loading import Pretrained, base_provenance
from flaxlora.lora import LoraConfig
from flaxlora.qqp.config import ENHANCED_LORA, PLAIN_LORA, RunConfig
from flaxlora.training import init_train_state
from flaxlora.training.checkpoint import Checkpointer

# Eight kinds of adapter served together: plain LoRA (q, v; head trained), the enhanced preset's (all
# linear layers and the pooler, rsLoRA, BitFit extras) at ranks 4, 8 and 16, DoRA on both, other targets.
VARIANTS: dict[str, LoraConfig] = {
    "lora r8 q,v": PLAIN_LORA,
    "enhanced r4": ENHANCED_LORA.replace(rank=4),
    "lora r2 q,k": PLAIN_LORA.replace(rank=2, targets=r"(query|key)/kernel$"),
    "enhanced r8": ENHANCED_LORA,
    "enhanced r4 DoRA": ENHANCED_LORA.replace(rank=4, use_dora=True),
    "lora r8 q,v DoRA": PLAIN_LORA.replace(use_dora=True),
    "enhanced r16": ENHANCED_LORA.replace(rank=16),
    "enhanced r4 alpha/r": ENHANCED_LORA.replace(rank=4, scaling="standard", alpha=8.0),
}
NOISE = 0.02


def random_run(pretrained: Pretrained, model: str, lora: LoraConfig, seed: int, out: Path,
               max_length: int = 128) -> Path:
    """Writes one untrained run of ``lora`` on ``pretrained`` (loaded from ``model``) to ``out``."""
    run = RunConfig(model=model, lora=lora, max_length=max_length, seed=seed)
    state, _ = init_train_state(pretrained.params, lora, optax.identity(), jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1000), len(jax.tree.leaves(state.trainable))))

    def perturb(path, x):
        name = pytree.path_str(path)
        if name.startswith("lora/") and not name.endswith("/b"):
            return x  # a: its init; magnitude: the norm of W at init (DoRA's)
        return x + NOISE * jax.random.normal(next(keys), x.shape, x.dtype)

    state = state.replace(trainable=jax.tree_util.tree_map_with_path(perturb, state.trainable))
    with Checkpointer(out / "checkpoints") as ckpt:
        ckpt.save(state, {"run": run.to_dict(), "data": {}, "model_kind": pretrained.kind,
                          "base": base_provenance(model)})
    return out


def random_runs(pretrained: Pretrained, model: str, count: int, folder: Path, max_length: int = 128) -> dict[str, Path]:
    """``{"a0": run, "a1": ...}``: ``count`` untrained runs cycling through ``VARIANTS``, seeds 0, 1, ...;
    a folder already holding a run is kept."""
    kinds = list(VARIANTS.values())
    runs = {}
    for i in range(count):
        out = folder / f"a{i}"
        if not (out / "checkpoints").is_dir():
            random_run(pretrained, model, kinds[i % len(kinds)], i, out, max_length)
        runs[f"a{i}"] = out
    return runs


def variant_names(count: int) -> list[str]:
    """The kind of each of ``random_runs``' ``count`` adapters."""
    return [list(VARIANTS)[i % len(VARIANTS)] for i in range(count)]
