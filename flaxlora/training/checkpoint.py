"""Orbax checkpoints of a LoRA run: adapters + extras, optimizer state, step, data position, config.

Layout under ``directory`` (one folder per step, written atomically by orbax, the last
``max_to_keep`` kept)::

    <step>/trainable/   {"lora": adapters, "extras": fully trained params}  (all inference needs)
    <step>/train/       {"step", "opt_state", "rng"}                          (for --resume)
    <step>/meta/        JSON: run config, LoRA config, data iterator position, metrics

The frozen base model is not saved: it is rebuilt from the saved config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxlora.pytree import PyTree
from flaxlora.training.step import TrainState

# orbax logs this (through absl) for every read-only manager, though read-only is what was asked.
_READ_ONLY_NOTICE = "Given directory is read only"


@contextlib.contextmanager
def _without_log(logger: str, prefix: str):
    """Drop the records of ``logger`` whose message starts with ``prefix`` inside the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


class Checkpointer:
    """Save and restore :class:`~flaxlora.training.step.TrainState` plus JSON metadata with orbax."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory at {self.directory}")
        if read_only:  # the settings orbax would otherwise override with a warning each
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        handlers = {
            "trainable": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        with _without_log("absl", _READ_ONLY_NOTICE):
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        self._manager.wait_until_finished()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], *, block: bool = True) -> None:
        """Save ``state`` at its step with ``meta`` (JSON-serialisable).

        ``block=False`` returns once a private copy of ``state`` is taken (so the caller may donate
        its buffers to the next step) and writes it in the background; the next save, a restore
        and :meth:`close` wait for it.
        """
        step = int(jax.device_get(state.step))
        self._manager.wait_until_finished()
        if not block:
            state = jax.tree.map(jnp.copy, state)
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(state.trainable),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if block:
            self._manager.wait_until_finished()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory} "
                f"(steps found: {self.all_steps()})"
            )
        return step

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore the state at ``step`` (default: latest) into the structure, shapes and shardings of
        ``target``, a freshly initialised state placed as the run wants it (any mesh), plus its
        metadata."""
        step = self._step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        train = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract.trainable),
                train=ocp.args.StandardRestore(train),
                meta=ocp.args.JsonRestore(),
            ),
        )
        t = restored["train"]
        state = TrainState(step=t["step"], trainable=restored["trainable"], opt_state=t["opt_state"], rng=t["rng"])
        return state, dict(restored["meta"])

    def restore_for_inference(self, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """``(trainable, meta)`` at ``step`` (default: latest), without the optimizer state, on this
        process's first device, whatever mesh the run was trained on."""
        step = self._step(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self._manager.item_metadata(step)["trainable"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored["trainable"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoints/ folder of a run output folder, or ``path`` itself if it is one."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no run or checkpoint folder at {path}")
