"""Static-shape batches: length buckets, a resumable shuffled train iterator, an eval iterator.

Every example goes to the smallest bucket length that holds it. An epoch is planned bucket by
bucket, shortest first: each bucket's examples (plus those carried over from the shorter bucket
before it) fill whole batches of that bucket's length, and the remainder carries over to the
next longer bucket. So an epoch has ceil(n / batch_size) batches, holds every example exactly
once, and only its last batch, padded to full size with copies of weight 0, is ever partial.
The batch shapes are (batch_size, bucket) for the given buckets only, so nothing recompiles.

A batch is a dict of numpy arrays: input_ids, attention_mask, token_type_ids (batch, seq) int32,
labels (batch,) int32 and weights (batch,) float32 (1 real, 0 padding). A batch is the global
batch: with several processes each builds the same one (cheap: token ids are in memory), and
:func:`flaxlora.training.sharding.global_batch` copies to each device only the rows it holds.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from flaxlora.data.tokenize import EncodedPairs

Batch = dict[str, np.ndarray]
T = TypeVar("T")
# Every batch's arrays: (batch, seq) TOKEN_KEYS and (batch,) labels and weights, in these dtypes.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
BATCH_DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32,
                "labels": np.int32, "weights": np.float32}
# One planned batch: its bucket length, its example indices (<= batch_size) in order.
_Planned = tuple[int, np.ndarray]


def default_buckets(max_length: int, num_buckets: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """``num_buckets`` evenly spaced lengths up to ``max_length``, rounded up to ``multiple``.

    ``default_buckets(128) == (32, 64, 96, 128)``.
    """
    lengths = {
        min(max_length, multiple * math.ceil(max_length * k / num_buckets / multiple))
        for k in range(1, num_buckets + 1)
    }
    return tuple(sorted(lengths))


def check_buckets(buckets: Sequence[int], max_length: int | None = None) -> None:
    """ValueError unless ``buckets`` are increasing positive lengths (ending at ``max_length`` if given)."""
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets must be increasing positive lengths, got {tuple(buckets)}")
    if max_length is not None and buckets[-1] != max_length:
        raise ValueError(f"buckets must end at max_length {max_length}, got {tuple(buckets)}")


def _bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """(n,) index into ``buckets`` of the smallest bucket that holds each example of ``lengths`` (n,)."""
    check_buckets(buckets)
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(f"an example has {lengths.max()} tokens > the largest bucket")
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _plan(
    bucket_of: np.ndarray, buckets: Sequence[int], batch_size: int, rng: np.random.Generator | None
) -> list[_Planned]:
    """The batches of one epoch; shuffled within buckets and in order when ``rng`` is given."""
    plan: list[_Planned] = []
    carry = np.zeros(0, np.int64)
    for k, length in enumerate(buckets):
        members = np.concatenate([carry, np.flatnonzero(bucket_of == k)])
        if rng is not None:
            members = rng.permutation(members)
        full = len(members) // batch_size * batch_size
        plan.extend((length, chunk) for chunk in members[:full].reshape(-1, batch_size))
        carry = members[full:]
    if len(carry):
        plan.append((buckets[-1], carry))
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def batch_lengths(data: EncodedPairs, batch_size: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """The sequence lengths of the batches that :class:`TrainIterator` and :func:`eval_batches`
    make of ``data`` (every epoch has the same ones: shuffling moves examples, not counts): the
    shapes a step compiles for."""
    return tuple(sorted({length for length, _ in _plan(_bucket_of(data.lengths, buckets), buckets, batch_size, rng=None)}))


def _assemble(data: EncodedPairs, planned: _Planned, batch_size: int,
              swapped: EncodedPairs | None = None, flip: np.ndarray | None = None) -> Batch:
    """The batch ``planned``, padded to ``batch_size`` rows with weight-0 copies; each example ``i``
    with ``flip[i]`` taken from ``swapped`` (the same pairs, questions in the other order)."""
    length, indices = planned
    rows = np.resize(indices, batch_size)  # Repeats real examples to fill the batch.
    batch = data.pad(rows, length)
    if swapped is not None:
        other, take = swapped.pad(rows, length), flip[rows][:, None]
        batch = {k: np.where(take, other[k], v) for k, v in batch.items()}
    batch["labels"] = data.labels[rows].astype(BATCH_DTYPES["labels"])
    batch["weights"] = (np.arange(batch_size) < len(indices)).astype(BATCH_DTYPES["weights"])
    return batch


class TrainIterator(Iterator[Batch]):
    """Endless shuffled batches, deterministic in (seed, epoch) and resumable from ``state``.

    Each epoch is a fresh plan from ``np.random.default_rng([seed, epoch])``. With ``swapped`` (the
    same pairs encoded with their two texts in the other order: a label symmetric in the pair), each
    epoch also draws, per example, which of the two orders it is trained in; an example's bucket
    holds both. ``state`` is
    ``{"epoch": e, "step_in_epoch": i}``, the position of the next batch; building an iterator
    with that state yields exactly the batches the saved one would have yielded next.
    """

    def __init__(
        self,
        data: EncodedPairs,
        batch_size: int,
        buckets: Sequence[int],
        *,
        seed: int,
        state: dict[str, Any] | None = None,
        swapped: EncodedPairs | None = None,
    ):
        if not len(data):
            raise ValueError("no training examples")
        if np.any(data.labels < 0):
            raise ValueError("training examples must all be labelled")
        if swapped is not None and (len(swapped) != len(data) or np.any(swapped.labels != data.labels)):
            raise ValueError("swapped must hold the same pairs, with the same labels, as data")
        self.data, self.swapped = data, swapped
        self.batch_size = batch_size
        self.buckets = tuple(buckets)
        self.seed = seed
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        longest = data.lengths if swapped is None else np.maximum(data.lengths, swapped.lengths)
        self._bucket_of = _bucket_of(longest, self.buckets)
        self._epoch, self._step = 0, 0
        self._plan_epoch = -1
        self._epoch_plan: list[_Planned] = []
        self._flip: np.ndarray | None = None
        if state is not None:
            self.restore(state)

    @property
    def state(self) -> dict[str, int]:
        """JSON-serialisable position of the next batch."""
        return {"epoch": self._epoch, "step_in_epoch": self._step}

    def restore(self, state: dict[str, Any]) -> None:
        """Moves to ``state``, as saved from an iterator with the same data and arguments."""
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"state {state} is outside an epoch of {self.steps_per_epoch} steps")
        self._epoch, self._step = epoch, step

    def __next__(self) -> Batch:
        if self._plan_epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._epoch_plan = _plan(self._bucket_of, self.buckets, self.batch_size, rng)
            if self.swapped is not None:  # drawn after the plan: the same batches as without swapped
                self._flip = rng.random(len(self.data)) < 0.5
            self._plan_epoch = self._epoch
        batch = _assemble(self.data, self._epoch_plan[self._step], self.batch_size, self.swapped, self._flip)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch


def inference_batches(data: EncodedPairs, batch_size: int, buckets: Sequence[int]) -> Iterator[tuple[np.ndarray, Batch]]:
    """``(rows, batch)`` covering each example once, bucket by bucket: ``rows`` (<= batch_size,)
    are the example indices held by the first ``len(rows)`` rows of ``batch`` (input_ids,
    attention_mask, token_type_ids); the rest repeat them as padding. Unlike training and
    evaluation batches, nothing moves to a longer bucket: each example is padded to its own."""
    bucket_of = _bucket_of(data.lengths, buckets)
    for k, length in enumerate(buckets):
        members = np.flatnonzero(bucket_of == k)
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            yield rows, data.pad(np.resize(rows, batch_size), length)


def eval_batches(data: EncodedPairs, batch_size: int, buckets: Sequence[int]) -> Iterator[Batch]:
    """Each example once, in fixed order (by bucket, then index): ceil(n / batch_size) batches."""
    plan = _plan(_bucket_of(data.lengths, buckets), buckets, batch_size, rng=None)
    return (_assemble(data, p, batch_size) for p in plan)


def prefetch(iterator: Iterator[Batch], prepare: Callable[[Batch], T], depth: int = 2) -> Iterator[T]:
    """``prepare(b)`` for each batch ``b`` of ``iterator``, computed ``depth`` batches ahead by a
    background thread, so that assembling and placing the next batch overlaps the current step.

    ``prepare`` runs right after its batch is drawn: it may read the iterator's position (e.g.
    ``TrainIterator.state``) to pair the batch with it. An error in the thread is raised here.
    """
    ready: queue.Queue = queue.Queue(depth)

    def work() -> None:
        try:
            for batch in iterator:
                ready.put((prepare(batch), None))
        except Exception as err:  # handed to the consumer
            ready.put((None, err))
        ready.put((None, StopIteration()))

    threading.Thread(target=work, daemon=True).start()
    while True:
        item, err = ready.get()
        if isinstance(err, StopIteration):
            return
        if err is not None:
            raise err
        yield item
