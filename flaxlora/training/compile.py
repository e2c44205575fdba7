"""Compile once: JAX's persistent compilation cache, every program of a run compiled up front
and concurrently, and a count of what was compiled.

    use_compilation_cache(default_compilation_cache())   # or a folder, or None: off
    with CompileCounter() as counter:
        programs = compile_all({("train", 64): jax.jit(step).lower(state, frozen, batch64), ...})
    counter.programs, counter.from_cache   # 10, 10 the second time

XLA releases the GIL while it compiles, so lowered programs compiled in threads overlap; on a
GPU or TPU, where one program takes tens of seconds, that and the cache are most of a short
run's start-up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path

import jax
from jax import monitoring

from flaxlora.data.tokenize import default_cache_dir

# Events jax.monitoring records for every program handed to XLA (cache hit or not) and for hits.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_compilation_cache() -> Path:
    """``$FLAXLORA_CACHE_DIR/jax``, else ``~/.cache/flaxlora/jax``: beside the tokenisation cache."""
    return default_cache_dir() / "jax"


def use_compilation_cache(path: str | os.PathLike | None) -> None:
    """Programs compiled from now on in this process are read from and written to JAX's persistent
    compilation cache in ``path`` (created if missing), every program however quickly it compiled;
    ``None`` turns the cache off. Safe to call again with another folder."""
    from jax.experimental.compilation_cache import compilation_cache

    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", None if path is None else os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # the cache binds its folder once: let the next compile reopen it


@contextlib.contextmanager
def compilation_cache_off():
    """Programs compiled inside are compiled by XLA, never read from the persistent cache (a cached
    executable comes without XLA's dumps: what :func:`flaxlora.memory.memory_account` reads);
    the cache in use before is back on after."""
    path = jax.config.jax_compilation_cache_dir
    use_compilation_cache(None)
    try:
        yield
    finally:
        if path is not None:
            use_compilation_cache(path)


class CompileCounter:
    """Counts the programs handed to XLA, in any thread, while it is open (``with CompileCounter()
    as c``; it may be opened again and adds up): ``programs`` in all, ``from_cache`` read from the
    persistent cache, ``compiled`` the rest; ``seconds``: their compile (or cache read) times
    added up (programs compiled concurrently overlap: a wall clock around them reads less)."""

    def __init__(self):
        self.programs, self.from_cache, self.seconds = 0, 0, 0.0
        self._lock = threading.Lock()

    @property
    def compiled(self) -> int:
        return self.programs - self.from_cache

    def _on_duration(self, event: str, secs: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self.programs += 1
                self.seconds += secs

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            with self._lock:
                self.from_cache += 1

    def __enter__(self) -> "CompileCounter":
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

def compile_all(lowered: Mapping[Hashable, jax.stages.Lowered], threads: int | None = None) -> dict[Hashable, jax.stages.Compiled]:
    """``{key: lowered.compile()}``, compiled concurrently in ``threads`` threads (default: one per
    program, at most ``os.cpu_count()``). The first error is raised once all have finished."""
    if not lowered:
        return {}
    workers = threads or max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        futures = {key: pool.submit(program.compile) for key, program in lowered.items()}
    return {key: future.result() for key, future in futures.items()}
