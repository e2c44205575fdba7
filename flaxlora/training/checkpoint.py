"""Orbax checkpoints of a LoRA run: adapters + extras, optimizer state, step, data position, config.

Layout under ``directory`` (one folder per step, written atomically by orbax, the last
``max_to_keep`` kept)::

    <step>/trainable/   {"lora": adapters, "extras": fully trained params}  (all inference needs)
    <step>/train/       {"step", "opt_state", "rng"}                          (for --resume)
    <step>/meta/        JSON: run config, LoRA config, data iterator position, metrics

The frozen base model is not saved: it is rebuilt from the saved config.

Reading the latest step (``step=None``) falls back to the newest step that reads: a step whose
files are truncated, garbled (orbax's CRC-32C and decompression checks) or missing is skipped with
a warning naming it and why. A writable checkpointer moves such a step to ``<directory>.unreadable/``
so that the run can save that step again; nothing is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from flaxlora.paths import as_path
from flaxlora.pytree import PyTree
from flaxlora.training.step import TrainState, all_finite

log = logging.getLogger(__name__)
T = TypeVar("T")
_all_finite = jax.jit(all_finite)

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
        self.directory = as_path(directory)  # a local folder or a URL (gs://...)
        self.read_only = read_only
        self.skipped: list[tuple[int, str]] = []  # (step, why) of the unreadable steps passed over
        if read_only and not self.directory.is_dir():
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

    def save(self, state: TrainState, meta: dict[str, Any], *, block: bool = True, check_finite: bool = True) -> None:
        """Save ``state`` at its step with ``meta`` (JSON-serialisable).

        ``block=False`` returns once orbax has copied ``state`` to host memory (so the caller may
        donate its buffers to the next step) and writes it in the background; the next save, a
        restore and :meth:`close` wait for it.

        Raises FloatingPointError, saving nothing, if a trainable value is not finite
        (``check_finite=False``: the caller guarantees it, as the train step does by skipping
        non-finite updates; the check is one more program to compile)."""
        step = int(jax.device_get(state.step))
        if check_finite and not bool(_all_finite(state.trainable)):
            raise FloatingPointError(f"refusing to save step {step}: the trainable params hold NaN or Inf")
        self._manager.wait_until_finished()
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

    def _newest_readable(self, read: Callable[[int], T], step: int | None) -> T:
        """``read(step)``; for ``step=None``, ``read`` of the newest step it can read (see the module
        docstring), ValueError naming every step and why when none reads."""
        if step is not None:
            step = self._step(step)
            try:
                return read(step)
            except Exception as err:  # orbax, tensorstore and json raise many types for a bad file
                raise ValueError(f"checkpoint step {step} in {self.directory} is unreadable: {_one_line(err)}") from err
        self._step(None)  # FileNotFoundError when there is no checkpoint at all
        problems = []
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                value = read(candidate)
            except Exception as err:
                why = _one_line(err)
                log.warning("skipping unreadable checkpoint step %d in %s: %s", candidate, self.directory, why)
                problems.append((candidate, why))
                continue
            self._set_aside(problems)
            return value
        raise ValueError(f"no readable checkpoint in {self.directory}: "
                         + "; ".join(f"step {s}: {why}" for s, why in problems))

    def _set_aside(self, problems: list[tuple[int, str]]) -> None:
        """Move the unreadable steps to ``<directory>.unreadable/`` (writable checkpointers only)."""
        self.skipped += problems
        if self.read_only or not problems or jax.process_index() != 0:
            return
        for step, _ in problems:
            source = self.directory / str(step)
            target = self.directory.parent / f"{self.directory.name}.unreadable" / str(step)
            while target.exists():
                target = target.with_name(target.name + "+")
            if source.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                log.warning("moved unreadable checkpoint step %d to %s", step, target)
        self._manager.reload()

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore the state at ``step`` (default: the newest readable) into the structure, shapes and
        shardings of ``target``, a freshly initialised state placed as the run wants it (any mesh),
        plus its metadata. ``skipped_in_a_row`` is not saved: ``target``'s (0) is kept."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        train = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
        args = ocp.args.Composite(
            trainable=ocp.args.StandardRestore(abstract.trainable),
            train=ocp.args.StandardRestore(train),
            meta=ocp.args.JsonRestore(),
        )
        restored = self._newest_readable(lambda s: self._manager.restore(s, args=args), step)
        t = restored["train"]
        state = TrainState(step=t["step"], trainable=restored["trainable"], opt_state=t["opt_state"], rng=t["rng"],
                           skipped_in_a_row=target.skipped_in_a_row)
        return state, dict(restored["meta"])

    def restore_for_inference(self, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """``(trainable, meta)`` at ``step`` (default: the newest readable), without the optimizer
        state, on this process's first device, whatever mesh the run was trained on."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def read(step: int):
            saved = self._manager.item_metadata(step)["trainable"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree)
            return self._manager.restore(
                step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )

        restored = self._newest_readable(read, step)
        return restored["trainable"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata at ``step`` (default: the newest step whose metadata reads)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return dict(self._newest_readable(lambda s: self._manager.restore(s, args=args), step)["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(err: Exception) -> str:
    """``Type: first line of the message`` (tensorstore messages run to pages), at most 300 chars."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
    """The checkpoints/ folder of a run output folder, or ``path`` itself if it is one."""
    path = as_path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no run or checkpoint folder at {path}")
