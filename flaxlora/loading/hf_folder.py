"""Hugging Face model folders (config.json + safetensors), local or downloaded from the hub."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# What `download` fetches: config, weights and tokenizer files, no PyTorch/TF/ONNX duplicates.
HUB_PATTERNS = (CONFIG, "*.safetensors", WEIGHTS_INDEX, "tokenizer*", "vocab*", "merges.txt",
                "special_tokens_map.json", "added_tokens.json", "*.model")


Index = tuple[slice, ...]


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, JSON header) of a safetensors file (8-byte little-endian header
    size, JSON header, raw data)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def read_slice(file: Path, name: str, index: Index = ()) -> np.ndarray:
    """``tensor[index]`` of tensor ``name`` in ``file``: only those bytes are read.

    BF16, which ``safetensors`` cannot return as numpy, is read from a memory map of the file.
    """
    with safe_open(file, framework="np") as st:
        part = st.get_slice(name)
        if part.get_dtype() != "BF16":
            return part[index] if index else part[:]
    start, header = _header(file)
    entry = header[name]
    whole = np.memmap(file, dtype=jnp.bfloat16, mode="r", offset=start + entry["data_offsets"][0],
                      shape=tuple(entry["shape"]))
    return np.array(whole[index])


def read_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    with safe_open(file, framework="np") as st:
        names = list(st.keys())
    for name in names:
        yield name, read_slice(file, name)


class HFFolder:
    """A local Hugging Face model folder: config.json, model.safetensors (or shards listed in
    model.safetensors.index.json), tokenizer files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / CONFIG).is_file():
            raise FileNotFoundError(f"{self.folder} has no {CONFIG}: expected a Hugging Face model "
                                    f"folder ({CONFIG} + {WEIGHTS}) or a .gguf file.")

    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / CONFIG).read_text())

    def weight_files(self) -> list[Path]:
        index = self.folder / WEIGHTS_INDEX
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.folder / s for s in shards]
        else:
            files = [self.folder / WEIGHTS]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{self.folder} has no {f.name}: expected {WEIGHTS} or {WEIGHTS_INDEX} with its "
                    f"shards (PyTorch .bin checkpoints are not read; convert them to safetensors).")
        return files

    def tensor_names(self) -> set[str]:
        """The names of the checkpoint's tensors (read from the file headers only)."""
        return set(self._index)

    @functools.cached_property
    def _index(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """{HF name: (file, shape)}, from the file headers alone."""
        return {name: (file, tuple(entry["shape"])) for file in self.weight_files()
                for name, entry in _header(file)[1].items() if name != "__metadata__"}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF name: shape} of every tensor (from the file headers: no tensor data is read)."""
        return {name: shape for name, (_, shape) in self._index.items()}

    def read(self, name: str, index: Index = ()) -> np.ndarray:
        """``tensor[index]`` in Hugging Face layout; only the bytes of that slice are read."""
        return read_slice(self._index[name][0], name, index)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"{self.folder}: expected a fast tokenizer, got {type(tokenizer).__name__}.")
        return tokenizer


def download(repo_id: str, revision: str | None = None) -> Path:
    """Downloads (or finds in the local cache) a hub repository at ``revision`` (default the latest);
    returns its folder.

    Raises:
      FileNotFoundError: the hub is unreachable (offline) or the repository does not exist.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without hub access, pass a local folder (config.json + model.safetensors + tokenizer "
            "files), a .gguf file, or a short name from flaxlora.loading.known_models()."
        ) from err
