"""Hugging Face model folders (config.json + safetensors), local or downloaded from the hub."""

from __future__ import annotations

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


def _bfloat16_reader(file: Path):
    """Reads BF16 tensors, which `safetensors` cannot return as numpy, from the file layout
    (8-byte little-endian header size, JSON header, raw data)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))

    def read(name: str) -> np.ndarray:
        start, end = header[name]["data_offsets"]
        flat = np.fromfile(file, dtype=jnp.bfloat16, count=(end - start) // 2, offset=8 + size + start)
        return flat.reshape(header[name]["shape"])

    return read


def read_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    with safe_open(file, framework="np") as st:
        bf16 = None
        for name in st.keys():
            if st.get_slice(name).get_dtype() == "BF16":
                bf16 = bf16 or _bfloat16_reader(file)
                yield name, bf16(name)
            else:
                yield name, st.get_tensor(name)


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
        names = set()
        for file in self.weight_files():
            with safe_open(file, framework="np") as st:
                names.update(st.keys())
        return names

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, numpy array) for every tensor, one at a time."""
        for file in self.weight_files():
            yield from read_safetensors(file)

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
