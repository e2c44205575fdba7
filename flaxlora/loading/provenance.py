"""Where a base model came from: its name, folder, hub revision and a content hash.

    base_provenance("minilm-l6")
    -> {"source": "minilm-l6", "path": ".../all-MiniLM-L6-v2", "revision": None,
        "sha256": "9d3c...", "files": {"config.json": "...", "model.safetensors": "..."}}

``sha256`` covers what defines the model's function: ``config.json`` and the safetensors of a
Hugging Face folder, or the .gguf file. The hash of each file is cached in
``<cache dir>/file_sha256.json`` under its path, size and modification time, so a file is read
once, not once per run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flaxlora.data.tokenize import default_cache_dir
from flaxlora.loading.hf_folder import CONFIG, HFFolder

CACHE_FILE = "file_sha256.json"


def model_files(path: Path) -> list[Path]:
    """The files whose content defines the model at ``path`` (a .gguf file or an HF folder):
    the .gguf file, or config.json and the safetensors."""
    if path.suffix == ".gguf":
        return [path]
    return [path / CONFIG, *HFFolder(path).weight_files()]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: start afresh
        return {}
    return cache if isinstance(cache, dict) else {}


def file_sha256(file: Path, cache_dir: Path | None = None) -> str:
    """The sha256 of ``file``, from the cache when its size and modification time are unchanged."""
    cache_path = (cache_dir or default_cache_dir()) / CACHE_FILE
    stat = file.stat()
    key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
    cache = _read_cache(cache_path)
    if isinstance(cache.get(key), dict) and cache[key].get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    cache = {**_read_cache(cache_path), key: {"stamp": stamp, "sha256": digest.hexdigest()}}
    try:  # written whole and renamed, so concurrent runs never read half a file
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temp = cache_path.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(cache))
        os.replace(temp, cache_path)
    except OSError:  # a read-only cache only costs time
        pass
    return digest.hexdigest()


def hub_revision(folder: Path) -> str | None:
    """The commit of a ``huggingface_hub`` snapshot folder (``.../snapshots/<commit>``), else None."""
    return folder.name if folder.parent.name == "snapshots" else None


def provenance(name: str, path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The record of base model ``name`` found at ``path`` (see the module docstring)."""
    root = path.parent if path.suffix == ".gguf" else path
    files = {os.path.relpath(f, root): file_sha256(f, cache_dir) for f in model_files(path)}
    combined = hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return {"source": name, "path": str(path), "revision": hub_revision(root), "sha256": combined, "files": files}


def check_same_base(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """ValueError unless ``current`` has the content hash recorded in ``saved`` (None: a run saved
    before provenance was recorded, which cannot be checked)."""
    if saved is None or saved.get("sha256") == current["sha256"]:
        return
    revision = f" at hub revision {saved['revision']}" if saved.get("revision") else ""
    raise ValueError(
        f"the base model {current['source']!r} ({current['path']}) has sha256 {current['sha256'][:16]}..., but the "
        f"run was trained on {saved.get('source')!r}{revision} with sha256 {str(saved.get('sha256'))[:16]}... "
        f"({saved.get('path')}); adapters are only valid on the base they were trained on: restore that model")
