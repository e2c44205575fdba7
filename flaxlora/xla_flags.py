"""XLA flags flaxlora sets by default, in ``XLA_FLAGS``, when it is imported.

XLA reads ``XLA_FLAGS`` when JAX starts its first backend, so a flag set here takes effect where
``flaxlora`` is imported before the first JAX computation, and not otherwise. A flag that
``XLA_FLAGS`` already names is left as the user set it (set it to the other value to opt out).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# XLA:CPU's concurrency-optimized scheduler orders a step's ops for parallelism and keeps more of
# its activations live at once. Off, MiniLM's train step (B32 S128) needs 0.72-0.85x the temporary
# buffers (lora 1,259 -> 910 MB, enhanced 1,562 -> 1,316, full 1,454 -> 1,110) at the same or a
# shorter step time (lora 0.92x, enhanced 1.00x): experiments/README.md "Speed". Only XLA:CPU reads it.
DEFAULT_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def with_defaults(flags: str, defaults: tuple[str, ...] = DEFAULT_FLAGS) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) plus each of ``defaults`` whose flag it does not name."""
    named = {f.split("=", 1)[0] for f in flags.split()}
    missing = [d for d in defaults if d.split("=", 1)[0] not in named]
    return " ".join([flags.strip(), *missing]).strip()


def set_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Puts :data:`DEFAULT_FLAGS` into ``environ["XLA_FLAGS"]`` unless it names them already."""
    environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))
