"""Where a run writes: a local folder or any URL ``etils.epath`` reads and writes (``gs://``, ``s3://``).

Orbax checkpoints go through epath too, so one path type serves checkpoints, metrics, results and
curves alike; on a pod, every process names the same bucket folder.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote location (``scheme://...``) rather than a local one."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL as it is, a local path made absolute (orbax wants one)."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))
