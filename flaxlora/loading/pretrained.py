"""`load_pretrained`: model, config, params and tokenizer from a folder, GGUF file, hub id or
short name."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.traverse_util import unflatten_dict
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerFast

from flaxlora.loading.convert import read_params
from flaxlora.loading.gguf_file import GGUFFile
from flaxlora.loading.hf_folder import HFFolder, download
from flaxlora.loading.provenance import provenance
from flaxlora.loading.registry import HUB_ALIASES, known_models, resolve
from flaxlora.models import (
    T5Config,
    config_from_hf,
    model_kind,
    sequence_classifier,
    text_to_text_classifier,
)
from flaxlora.models.auto import Config
from flaxlora.models.scan import scanned_config
from flaxlora.quant.tree import OPTIONS, quantizable
from flaxlora.training.sharding import param_shardings

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded sequence classifier.

    Attributes:
      model: the Flax module; `model.apply({'params': params}, input_ids, attention_mask,
        token_type_ids=None, deterministic=True)` gives logits (batch, num_labels), and
        `method='hidden_states'` the backbone output (batch, len, hidden).
      params: plain arrays, paths named after Hugging Face modules.
      tokenizer: right-padding, with a pad token.
      kind: 'encoder', 'decoder', 'encoder-decoder' (a T5 classifier) or 'text-to-text' (T5
        scoring label words).
      missing: params paths not in the checkpoint, initialised randomly from `seed`.
      unused: checkpoint tensors the model does not use (e.g. an LM head).
      init_missing: ``seed -> {path: param}``, the ``missing`` params as another seed initialises
        them (e.g. each member's classifier in an ensemble), placed as ``params``; one program.
    """

    model: nn.Module
    config: Config
    params: Any
    tokenizer: PreTrainedTokenizerFast
    kind: str
    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    init_missing: Callable[[int], dict[str, Any]] | None = None


def _locate(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The model's HF folder or .gguf file (a hub id is downloaded first)."""
    name = os.fspath(name_or_path)
    if name in known_models():
        path = resolve(name)
    elif os.path.exists(name):
        path = Path(name)
    elif name in HUB_ALIASES or _HUB_ID.match(name):
        path = download(HUB_ALIASES.get(name, name), revision)
    else:
        raise FileNotFoundError(f"{name!r} is neither an existing file or folder, a hub id, nor a "
                                f"short name ({', '.join(known_models() + tuple(HUB_ALIASES))}).")
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return ggufs[0]
    return path


def _open(name_or_path: str | os.PathLike, revision: str | None = None) -> HFFolder | GGUFFile:
    path = _locate(name_or_path, revision)
    return GGUFFile(path) if path.suffix == ".gguf" else HFFolder(path)


def _for_classification(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer :func:`load_pretrained` gives (right-padding, with a pad token), without
    reading any weight."""
    return _for_classification(_open(name_or_path).tokenizer())


def label_token_ids(tokenizer: PreTrainedTokenizerFast, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token ids of each label word, without special tokens."""
    ids = tuple(tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words)
    empty = [w for w, i in zip(words, ids) if not i]
    if empty:
        raise ValueError(f"label words {empty} tokenise to nothing")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(words)} do not all tokenise differently: {ids}")
    return ids


def _t5_complete(source: HFFolder, missing: tuple[str, ...]) -> None:
    """ValueError unless the checkpoint has every T5 weight (only a classification head may be new)."""
    lacking = [m for m in missing if not m.startswith("classification_head/")]
    if lacking:
        raise ValueError(f"{source.folder} lacks {len(lacking)} T5 weights, e.g. {', '.join(lacking[:3])}: "
                         "an encoder-only or other partial checkpoint? A T5 classifier needs the encoder, "
                         "the decoder and the shared embedding.")


def _quantizer(scheme: str | None, skip: str | None, source: HFFolder | GGUFFile):
    """``(path, shape) -> scheme or None`` for :func:`~flaxlora.loading.convert.params_from_hf`."""
    if scheme is None:
        return None
    if scheme == "gguf" and not isinstance(source, GGUFFile):
        raise ValueError(f"quantize='gguf' keeps a GGUF file's blocks: {source.folder} is not a GGUF model; "
                         "use nf4, nf4-dq or int8")
    if scheme not in OPTIONS:
        raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(OPTIONS)}")

    def pick(path: str, shape: tuple[int, ...]) -> str | None:
        if skip and re.search(skip, path):
            return None
        return scheme if quantizable(path, shape, "int8" if scheme == "gguf" else scheme) else None

    return pick


def base_provenance(name_or_path: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """Source, folder, hub revision and content hash of a model (see :mod:`flaxlora.loading.provenance`)."""
    return provenance(os.fspath(name_or_path), _locate(name_or_path, revision))


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """Whether the model is a GGUF file (its weights are llama.cpp blocks)."""
    return isinstance(_open(name_or_path), GGUFFile)


def load_config(name_or_path: str | os.PathLike, num_labels: int = 2) -> Config:
    """The model's config alone (``config.json`` or the GGUF metadata, no weight read), for checks
    that must pass before loading; FileNotFoundError / ValueError as :func:`load_pretrained`."""
    return config_from_hf(_open(name_or_path).config(), num_labels=num_labels)


def load_pretrained(
    name_or_path: str | os.PathLike,
    num_labels: int = 2,
    *,
    label_words: Sequence[str] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    revision: str | None = None,
    mesh: Mesh | None = None,
    remat: str = "none",
    scan_layers: bool = False,
    quantize: str | None = None,
    quantize_skip: str | None = None,
) -> Pretrained:
    """Loads a pretrained backbone with a sequence-classification head.

    Args:
      name_or_path: a short name (`known_models()`), a Hugging Face folder (config.json +
        model.safetensors or sharded safetensors), a .gguf file, or a hub id (downloaded with
        `huggingface_hub.snapshot_download`; needs hub access).
      num_labels: classifier outputs.
      label_words: T5 only: classify text-to-text instead, one class per word, the logit being
        the decoder's log-likelihood of the word (see `flaxlora.models.T5ForTextToText`); the
        LM head is the checkpoint's `lm_head` when it has one, else the shared embedding.
      dtype: computation dtype; param_dtype: storage dtype of params.
      seed: seeds the weights the checkpoint lacks (heads, a missing pooler).
      revision: the hub commit (or branch, tag) of a hub id; default the latest.
      mesh: place the params sharded on this mesh by their logical axes
        (:func:`flaxlora.training.sharding.param_shardings`); each process reads only the slices
        its devices hold. Default: the whole model on the first local device.
      remat: activation checkpointing of each layer in training, "none" | "block" | "full"
        (:data:`flaxlora.models.layers.REMAT_POLICIES`).
      scan_layers: the backbone's layers under ``nn.scan``, their params stacked
        (:mod:`flaxlora.models.scan`; BERT/RoBERTa and Llama).
      quantize: store every 2-D kernel quantized (QLoRA; :mod:`flaxlora.quant`), each as it is read:
        ``"nf4"``, ``"nf4-dq"``, ``"int8"``, or ``"gguf"`` (a GGUF file's Q4_0/Q4_1/Q8_0 blocks as
        stored); ``quantize_skip``: a regex of params paths kept in float (what is trained in full).

    Raises:
      FileNotFoundError: no such model, or a folder lacks config.json / weights.
      ValueError: unsupported architecture or tokenizer, a tensor shape mismatch, label words
        for a model that is not T5, a T5 checkpoint without its decoder, or scan_layers for T5
        or with quantize.
    """
    source = _open(name_or_path, revision)
    config = config_from_hf(source.config(), num_labels=len(label_words) if label_words else num_labels, remat=remat)
    if scan_layers:
        config = scanned_config(config, quantized=quantize is not None)
    tokenizer = _for_classification(source.tokenizer())
    if label_words:
        if isinstance(config, T5Config) and "lm_head.weight" in source.tensor_names():
            config = dataclasses.replace(config, tie_word_embeddings=False)
        model = text_to_text_classifier(config, label_token_ids(tokenizer, label_words), dtype=dtype,
                                        param_dtype=param_dtype)
    else:
        model = sequence_classifier(config, dtype=dtype, param_dtype=param_dtype)
    shardings = None if mesh is None else param_shardings(model, mesh)
    found, missing, unused, init_missing = read_params(model, source, param_dtype=param_dtype, shardings=shardings,
                                                       quantize=_quantizer(quantize, quantize_skip, source))
    params = unflatten_dict({**found, **init_missing(seed)}, sep="/")
    if isinstance(config, T5Config):
        _t5_complete(source, missing)
    if missing:
        log.info("Initialised randomly (not in the checkpoint): %s", ", ".join(missing))
    if unused:
        log.info("Checkpoint tensors not used by %s: %s", type(model).__name__, ", ".join(unused))
    return Pretrained(
        model=model,
        config=config,
        params=params,
        tokenizer=tokenizer,
        kind="text-to-text" if label_words else model_kind(config),
        missing=missing,
        unused=unused,
        init_missing=init_missing,
    )
