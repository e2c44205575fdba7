"""PEFT LoRA adapters: export an adapter trained here, import one trained with PEFT in PyTorch.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose
tensors are named after the PyTorch modules of the ``*ForSequenceClassification`` base model
(see :mod:`flaxlora.interop.names`), in torch layout::

    base_model.model.<module>.lora_A.weight          (r, in)    a.T
    base_model.model.<module>.lora_B.weight          (out, r)   b.T
    base_model.model.<module>.lora_magnitude_vector  (out,)     magnitude (DoRA)
    base_model.model.<module>.base_layer.bias        (out,)     bias of a LoRA-adapted Linear (bias option)
    base_model.model.<module>.bias                   (n,)       bias of another module (bias="all")
    base_model.model.<module>.<weight|bias>          each parameter of a ``modules_to_save`` module

PEFT adds ``s * B @ A`` to the (out, in) weight, the transpose of our ``s * a @ b``, with s =
lora_alpha / r (``use_rslora``: lora_alpha / sqrt(r)) per module from ``rank_pattern`` /
``alpha_pattern``; DoRA's magnitude is the same per-output-unit vector.

Fully trained parameters (``LoraConfig.trainable``) map to PEFT as follows:

- biases through PEFT's ``bias`` option (BitFit): ``"lora_only"`` when every trained bias
  outside the modules saved whole belongs to a LoRA-adapted Linear, ``"all"`` otherwise. PEFT
  then saves (and loads) every such bias, so the untrained ones are written with their base
  values; those of adapted modules are named ``<module>.base_layer.bias`` (PEFT's wrapper keeps
  the original Linear as ``base_layer``).
- every other trained parameter (a norm's scale, the head's kernel) through ``modules_to_save``:
  PEFT saves and restores whole modules, so its untrained parameters are copied from the base.
  With ``task_type="SEQ_CLS"`` PEFT always wraps the head (``classifier`` / ``score``), so the
  head is always exported: the pretrained checkpoints have none (it is initialised randomly on
  both sides).
- with no LoRA targets at all (the ``head`` preset), ``target_modules`` is PEFT's
  ``"dummy-target-modules"``: an adapter of ``modules_to_save`` only. A run that trains every
  parameter (full fine-tuning) is refused: its adapter would be a second full copy of the model,
  which the merged export (:mod:`flaxlora.interop.merged`) is without the wrapping.

PiSSA / OLoRA adapters are relative to a residual base ``W - s a0 @ b0``. They are exported as
PEFT converts them (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``): a
plain LoRA of rank 2r against the original base, ``A' = [A; A0]``, ``B' = [B, -B0]``, so
``s B' A' = s (B A - B0 A0)``, with lora_alpha doubled (rsLoRA: times sqrt 2) to keep s.

Decoders: ``transformers`` pools the rightmost token that is not ``config.pad_token_id``, we pool
the last attended one. With a tokenizer that pads with eos (SmolLM2) and inputs ending in eos
(our QQP prompts), set the PyTorch base's ``config.pad_token_id`` to
``classification_pad_token(tokenizer)``'s id and pad with it (see :mod:`flaxlora.interop.merged`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from flaxlora import pytree
from flaxlora.interop.names import ancestors, module_name, tensor_name, tensor_names
from flaxlora.loading import to_hf
from flaxlora.loading.hf_folder import read_safetensors
from flaxlora.lora import (
    INITS,
    RESIDUAL_INITS,
    LoraConfig,
    adapters_by_path,
    init_adapter,
    lora_candidates,
    matched_adapters,
    merge_pretrained,
    with_extras,
)
from flaxlora.pytree import PyTree

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT adds these to modules_to_save for task_type SEQ_CLS.
SEQ_CLS_HEADS = ("classifier", "score")
# PEFT tensor suffix -> adapter leaf.
LORA_TENSORS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude"}
# PEFT's bias option: which biases are trained and saved besides the adapters.
BIASES = ("none", "lora_only", "all")
# PEFT's LoRA wrapper keeps the adapted Linear as this child: its bias is '<module>.base_layer.bias'.
BASE_LAYER = "base_layer"
# With bias="all" PEFT also saves the biases of these children of a modules_to_save wrapper: the
# original (unused once wrapped) and a duplicate of the saved one, which PEFT's load ignores.
WRAPPER_COPIES = ("original_module", "modules_to_save")
# peft.utils.constants.DUMMY_TARGET_MODULES: an adapter without LoRA layers (modules_to_save only).
NO_TARGETS = "dummy-target-modules"
# adapter_config.json options that change what a module computes and are not supported here.
UNSUPPORTED = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters",
               "fan_in_fan_out", "lora_bias", "use_qalora", "alora_invocation_tokens",
               "trainable_token_indices", "layer_replication", "use_bdlora")
# PEFT init_lora_weights -> ours: True / False is PEFT's default init (ours too), the others share
# our names. The rest (LoftQ, CorDA, randomised SVD, ...) alter the base weights in ways not
# reproduced here.
PEFT_INITS = {True: LoraConfig.init, False: LoraConfig.init,
              **{name: name for name in INITS if name != LoraConfig.init}}
MERGED_INSTEAD = "export the merged model instead (save_merged, or --format merged)"


class PeftAdapter(NamedTuple):
    """An imported adapter: the adapter tree, the fully trained parameters and a LoraConfig.

    ``config.init`` is "pissa" / "olora" for an unconverted PEFT PiSSA / OLoRA adapter, which
    applies to the residual of the base weights (PEFT recomputes it on load, as does :meth:`merged`).
    ``extras`` holds the modules_to_save parameters and the biases of the bias option.
    """

    lora: PyTree
    extras: PyTree
    config: LoraConfig

    def merged(self, params: PyTree) -> PyTree:
        """The fine-tuned params for the pretrained ``params``."""
        return merge_pretrained(params, self.lora, self.config, self.extras)


def _is_bias(path: str) -> bool:
    return path.endswith("/bias")


def _wrapped(module: str, modules_to_save: Iterable[str]) -> bool:
    """Whether PEFT wraps ``module`` or one containing it in a ModulesToSaveWrapper (suffix match)."""
    return any(m.endswith(s) for m in ancestors(module) for s in modules_to_save)


def _excluded(module: str, modules_to_save: Iterable[str]) -> bool:
    """PEFT's rule: no LoRA on a module inside (or named like) a modules_to_save entry."""
    return any(re.match(rf"(^|.*\.){s}($|\..*)", module) for s in modules_to_save)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(target_modules: str | Iterable[str], module: str) -> bool:
    """PEFT's target_modules rule: a regex matches the whole name, a list entry its last components."""
    if target_modules == NO_TARGETS:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _all_modules(params: PyTree) -> set[str]:
    return {m for p in pytree.flatten(params) for m in ancestors(module_name(p))}


def _saved_leaves(params: PyTree, modules_to_save: Iterable[str]) -> list[str]:
    """Params paths PEFT saves for ``modules_to_save``: every parameter of every wrapped module."""
    modules_to_save = tuple(modules_to_save)
    return [p for p in pytree.flatten(params) if _wrapped(module_name(p), modules_to_save)]


def _bias_leaves(params: PyTree, bias: str, adapted: Iterable[str], modules_to_save: Iterable[str]) -> list[str]:
    """Params paths of the biases PEFT saves for its ``bias`` option, besides ``modules_to_save``."""
    if bias == "none":
        return []
    adapted, wrapped = set(adapted), set(_saved_leaves(params, modules_to_save))
    return [p for p in pytree.flatten(params) if _is_bias(p) and p not in wrapped
            and (bias == "all" or module_name(p) in adapted)]


def _bias_name(path: str, adapted: Iterable[str]) -> str:
    """The PEFT tensor name of the bias at ``path`` ('<module>.base_layer.bias' in adapted modules)."""
    module = module_name(path)
    return f"{PREFIX}{module}.{BASE_LAYER}.bias" if module in adapted else PREFIX + tensor_name(path)


def _shortest(names: set[str], modules: set[str], selects: Callable[[list[str], str], bool]) -> list[str]:
    """Last name components (["query", "value"]) when they ``selects`` exactly ``names`` among
    ``modules``, else the full names."""
    short = sorted({n.rpartition(".")[2] for n in names})
    return short if {m for m in modules if selects(short, m)} == names else sorted(names)


def _patterns(values: Mapping[str, Any], default: Any, last: Callable[[str], str],
              short_key: Callable[[str], str], full_key: Callable[[str], str]) -> dict[str, Any]:
    """rank / alpha patterns giving each name in ``values`` its value, ``default`` unless listed.

    One key per last name component (``last``) where all names sharing it agree, else one key
    per name; per-name keys come first, as the first matching key wins.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(values):
        groups.setdefault(last(name), []).append(name)
    full, short = {}, {}
    for s, names in groups.items():
        if len({values[n] for n in names}) == 1:
            short.update({short_key(s): values[names[0]]} if values[names[0]] != default else {})
        else:
            full.update({full_key(n): values[n] for n in names if values[n] != default})
    return {**full, **short}


# _patterns keys in our params paths: a kernel's module name, or its full path.
OUR_KEYS = (lambda p: p.split("/")[-2], lambda s: rf"(^|/){re.escape(s)}/kernel$", lambda p: rf"^{re.escape(p)}$")


def _selecting(paths: Iterable[str], universe: Iterable[str]) -> str:
    """A regex (``re.search``) selecting exactly ``paths`` among ``universe``: by their module's
    last name and leaf ('query/kernel') when that suffices, else by full path."""
    paths = set(paths)
    tails = sorted({"/".join(p.split("/")[-2:]) for p in paths})
    short = rf"(^|/)({'|'.join(map(re.escape, tails))})$"
    if {p for p in universe if re.search(short, p)} == paths:
        return short
    return rf"^({'|'.join(map(re.escape, sorted(paths)))})$"


def _against_original_base(params: PyTree, adapters: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """PiSSA / OLoRA adapters as plain LoRA of rank 2r against ``params``, as PEFT converts them:
    a' = [a, a0] (in, 2r), b' = [b; -b0] (2r, out), so s a' @ b' = s (a @ b - a0 @ b0)."""
    initial = adapters_by_path(init_adapter(params, config, jax.random.key(0))[1])
    return {p: {**ad, "a": jnp.concatenate([ad["a"], initial[p]["a"]], axis=-1),
                "b": jnp.concatenate([ad["b"], -initial[p]["b"]], axis=0)}
            for p, ad in adapters.items()}


def _examples(names: list[str]) -> str:
    return repr(names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def save_peft(
    folder: str | os.PathLike,
    params: PyTree,
    lora: PyTree,
    config: LoraConfig,
    extras: PyTree | None = None,
    *,
    save_modules: Iterable[str] = (),
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter folder (task_type SEQ_CLS) for the classifier with ``params``.

    Args:
      folder: created if needed; adapter_config.json and adapter_model.safetensors are written.
      params: the pretrained params, not a PiSSA / OLoRA residual (the conversion is done here).
      lora: the adapter tree ``{path: {"a": (in, r), "b": (r, out)[, "magnitude": (out,)]}}``
        ({} for ``config.targets=None``).
      config: its LoraConfig.
      extras: fully trained params (a tree of some leaves of ``params``), or None.
      save_modules: params paths whose modules are exported whole although not trained, e.g.
        ``Pretrained.missing`` (initialised randomly, so not in the base checkpoint).
      base_model_name_or_path: recorded in adapter_config.json.

    Returns:
      the adapter_config.json written.

    Raises:
      ValueError: before anything is written, when the adapter does not fit ``params`` or PEFT
        cannot express it (a target that is not a 2-D Linear weight, LoRA on a module PEFT saves
        whole, every parameter trained), naming the setting and the alternative.
    """
    targets, adapters = matched_adapters(params, lora, config)
    flat = pytree.flatten(params)
    bad = [p for p, t in targets.items() if t.stack or flat[p].ndim != 2 or not p.endswith("/kernel")]
    if bad:
        raise ValueError(f"PEFT adapts 2-D Linear weights, not the kernel {_examples(bad)} (LoraConfig.targets / "
                         f"in_axes / stack_axes): {MERGED_INSTEAD}")
    trained = list(pytree.flatten(extras)) if extras else []
    unknown = sorted(set(trained) - set(flat))
    if unknown:
        raise ValueError(f"extras {unknown[:5]} are not parameters of the base model")
    adapted = {module_name(p): p for p in targets}
    all_modules = _all_modules(params)
    whole = ({module_name(p) for p in trained if not _is_bias(p)} | {module_name(p) for p in save_modules}
             | {h for h in SEQ_CLS_HEADS if h in all_modules})
    modules_to_save = _shortest(whole, all_modules, lambda short, m: any(m.endswith(s) for s in short))
    wrapped = set(_saved_leaves(params, modules_to_save))
    if wrapped == set(flat):
        raise ValueError(f"every parameter is trained (LoraConfig.trainable={config.trainable!r}: full fine-tuning), "
                         f"which a PEFT adapter could only hold as a second full copy of the model: {MERGED_INSTEAD}")
    clash = sorted(m for m in adapted if _excluded(m, modules_to_save))
    if clash:
        raise ValueError(f"LoRA on {_examples(clash)} cannot be expressed in PEFT, which saves that module whole "
                         "(modules_to_save: a trained non-bias parameter, the SEQ_CLS head or a module missing "
                         f"from the pretrained checkpoint): {MERGED_INSTEAD}")
    loose = [p for p in trained if p not in wrapped]  # biases only: other trained leaves are wrapped
    bias = "none" if not loose else "lora_only" if all(module_name(p) in adapted for p in loose) else "all"

    factor, alpha_factor = 1, 1.0
    if config.init in RESIDUAL_INITS:
        factor, alpha_factor = 2, (math.sqrt(2) if config.scaling == "rslora" else 2.0)
        adapters = _against_original_base(params, adapters, config)
    tensors = {}
    for m, p in adapted.items():
        ad = {k: np.asarray(v, np.float32) for k, v in adapters[p].items()}
        tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(ad["a"].T)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(ad["b"].T)
        if config.use_dora:
            tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = ad["magnitude"]
    full = pytree.flatten(with_extras(params, extras))
    saved = to_hf(pytree.unflatten({p: full[p] for p in sorted(wrapped)}))
    tensors.update({PREFIX + name: np.asarray(value, np.float32) for name, value in saved.items()})
    tensors.update({_bias_name(p, adapted): np.asarray(full[p], np.float32)
                    for p in _bias_leaves(params, bias, adapted, modules_to_save)})

    rank, alpha = config.rank * factor, config.alpha * alpha_factor
    last = lambda m: m.rpartition(".")[2]  # noqa: E731
    ranks = _patterns({m: config.rank_for(p) * factor for m, p in adapted.items()}, rank, last, str, str)
    alphas = _patterns({m: config.alpha_for(p) * alpha_factor for m, p in adapted.items()}, alpha, last, str, str)
    target_modules = NO_TARGETS if not adapted else _shortest(
        set(adapted), all_modules, lambda short, m: _targeted(short, m) and not _excluded(m, modules_to_save))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": config.scaling == "rslora",
        "use_dora": config.use_dora,
        "target_modules": target_modules,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "modules_to_save": modules_to_save,
        "lora_dropout": config.dropout,
        "bias": bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return adapter_config


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no PEFT adapter folder at {folder}")
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if settings.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {settings.get('peft_type')!r}; only LORA adapters are supported")
    if settings.get("task_type") not in (None, "SEQ_CLS"):
        raise ValueError(f"{file}: task_type {settings['task_type']!r}; only SEQ_CLS (sequence "
                         "classification) adapters are supported")
    unsupported = [k for k in UNSUPPORTED if settings.get(k)]
    unsupported += ["bias"] if settings.get("bias", "none") not in BIASES else []
    if unsupported:
        raise ValueError(f"{file}: unsupported PEFT options {', '.join(f'{k}={settings[k]!r}' for k in unsupported)}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if settings.get(k) is None]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}")
    _check_regexes(settings, file)
    init = settings.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in PEFT_INITS:
        raise ValueError(f"{file}: init_lora_weights={init!r} changes the base weights in a way not reproduced "
                         f"here (supported: {list(PEFT_INITS)}); convert it to plain LoRA in PEFT with "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    return settings


MAX_PATTERN = 1000  # longest regex accepted from a foreign adapter_config.json


def _check_regexes(settings: Mapping[str, Any], file: Path) -> None:
    """ValueError naming the field unless every regex the adapter brings (``target_modules`` as a
    string, ``rank_pattern`` / ``alpha_pattern`` keys, ``modules_to_save`` entries) is a string of
    at most ``MAX_PATTERN`` characters that compiles as :func:`_targeted` and friends use it."""
    targets = settings["target_modules"]
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{file}: target_modules must be a regex string or a list of module names, got {targets!r:.80}")
    regexes = [("target_modules", targets)] if isinstance(targets, str) else []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = settings.get(field) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{file}: {field} must be an object of regex keys, got {patterns!r:.80}")
        regexes += [(f"{field} key", rf"(.*\.)?({key})$" if isinstance(key, str) else key) for key in patterns]
    saved = settings.get("modules_to_save") or []
    if not isinstance(saved, list):
        raise ValueError(f"{file}: modules_to_save must be a list of module names, got {saved!r:.80}")
    regexes += [("modules_to_save entry", rf"(^|.*\.){m}($|\..*)" if isinstance(m, str) else m) for m in saved]
    for field, regex in regexes:
        if not isinstance(regex, str) or len(regex) > MAX_PATTERN:
            raise ValueError(f"{file}: {field} must be a regex string of at most {MAX_PATTERN} characters, "
                             f"got {regex!r:.80}")
        try:
            re.compile(regex)
        except re.error as err:
            raise ValueError(f"{file}: {field} {regex!r:.80} is not a valid regex ({err})") from None


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        hint = (": adapter_model.bin is a pickle, which is never loaded (unpickling can run code); "
                "re-save it with save_pretrained(..., safe_serialization=True)"
                if (folder / "adapter_model.bin").exists() else "")
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        return {name: np.asarray(value, np.float32) for name, value in read_safetensors(file)}
    except SafetensorError as err:
        raise ValueError(f"{file} is not a valid safetensors file: {err}") from None


def _split(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """({module: {"a", "b"[, "magnitude"]}} in torch layout, {tensor name: array} of the others)."""
    lora: dict[str, dict[str, np.ndarray]] = {}
    saved = {}
    for name, value in tensors.items():
        if not name.startswith(PREFIX):
            raise ValueError(f"{WEIGHTS_FILE}: tensor {name!r} does not start with {PREFIX!r}")
        name = name[len(PREFIX):]
        suffix = next((s for s in LORA_TENSORS if name.endswith("." + s)), None)
        if suffix is not None:
            lora.setdefault(name[: -len(suffix) - 1], {})[LORA_TENSORS[suffix]] = value
        elif ".lora_" in name:
            raise ValueError(f"{WEIGHTS_FILE}: unsupported LoRA tensor {PREFIX + name!r} (supported: Linear "
                             f"layers, {', '.join(LORA_TENSORS)})")
        else:
            saved[name] = value
    return lora, saved


def _check_shapes(module: str, parts: Mapping[str, np.ndarray], n_in: int, n_out: int, use_dora: bool) -> int:
    """The adapter's rank; ValueError naming the tensor when a shape does not fit an n_in -> n_out layer."""
    suffix = {leaf: s for s, leaf in LORA_TENSORS.items()}
    expected_parts = {"a", "b", "magnitude"} if use_dora else {"a", "b"}
    if set(parts) != expected_parts:
        raise ValueError(f"{WEIGHTS_FILE}: module {module!r} has {sorted(suffix[k] for k in parts)}, expected "
                         f"{sorted(suffix[k] for k in expected_parts)} (use_dora={use_dora})")
    rank = parts["a"].shape[0] if parts["a"].ndim == 2 else "r"
    expected = {"a": (rank, n_in), "b": (n_out, rank), "magnitude": (n_out,)}
    for leaf, value in parts.items():
        if value.shape != expected[leaf] or not value.size:
            raise ValueError(f"{WEIGHTS_FILE}: {PREFIX}{module}.{suffix[leaf]} has shape {value.shape}, expected "
                             f"{expected[leaf]} for the base model's {n_in} -> {n_out} layer (an adapter for "
                             "another model or hidden size?)")
    return rank


def _extras(saved: Mapping[str, np.ndarray], params: PyTree, modules_to_save: list[str], bias: str,
            adapted: set[str]) -> dict[str, jax.Array]:
    """``{params path: value}`` of the modules_to_save parameters and the biases of the ``bias``
    option, checked to be exactly what PEFT saves for them."""
    flat, names = pytree.flatten(params), tensor_names(params)
    extras = {}
    for name, value in saved.items():
        module, _, leaf = name.rpartition(".")
        owner, _, child = module.rpartition(".")
        if bias == "all" and leaf == "bias" and child in WRAPPER_COPIES and _wrapped(owner, modules_to_save):
            continue  # PEFT's copies inside a modules_to_save wrapper, unused once loaded
        biased = bias != "none" and leaf == "bias" and child == BASE_LAYER and owner in adapted
        path = names.get(f"{owner}.bias" if biased else name)
        if path is None:
            raise ValueError(f"{WEIGHTS_FILE}: tensor {PREFIX + name!r} is not a parameter of the base model")
        if module in adapted:
            raise ValueError(f"{WEIGHTS_FILE}: {PREFIX + name} is a parameter of a LoRA-adapted module, which PEFT "
                             f"keeps as {PREFIX}{module}.{BASE_LAYER}.{leaf} (a tensor of this name is ignored)")
        value = value.T if path.endswith("/kernel") else value  # torch (out, in) -> (in, out), as to_hf
        if value.shape != flat[path].shape:
            raise ValueError(f"{WEIGHTS_FILE}: {PREFIX + name} has shape {value.shape} (in our layout), the base "
                             f"model's {path} has {flat[path].shape}")
        extras[path] = jnp.asarray(value, flat[path].dtype)
    wrapped = set(_saved_leaves(params, modules_to_save))
    expected = wrapped | set(_bias_leaves(params, bias, adapted, modules_to_save))
    if set(extras) != expected:
        peft_name = lambda p: PREFIX + tensor_name(p) if p in wrapped else _bias_name(p, adapted)  # noqa: E731
        raise ValueError(f"{WEIGHTS_FILE} does not match modules_to_save={modules_to_save} and bias={bias!r}: "
                         f"missing {sorted(map(peft_name, expected - set(extras)))[:5]}, not saved for them "
                         f"{sorted(map(peft_name, set(extras) - expected))[:5]}")
    return extras


def load_peft(folder: str | os.PathLike, params: PyTree) -> PeftAdapter:
    """Import a PEFT LoRA adapter folder for the classifier with ``params``.

    Everything is checked against ``params`` before use: tensor names (no unknown modules, none
    missing for what ``target_modules`` selects), shapes, ranks against ``r`` / ``rank_pattern``,
    the modules_to_save parameters and the biases of the ``bias`` option. Only safetensors are
    read (``adapter_model.bin`` is refused).

    Raises:
      FileNotFoundError: no folder, adapter_config.json or adapter_model.safetensors.
      ValueError: an unsupported option, or an adapter that does not fit ``params``, naming it.
    """
    folder = Path(folder)
    settings = _read_config(folder)
    lora_parts, saved = _split(_read_tensors(folder))
    if not lora_parts and settings["target_modules"] != NO_TARGETS:
        raise ValueError(f"{folder / WEIGHTS_FILE} holds no LoRA tensors (lora_A / lora_B)")
    flat = pytree.flatten(params)
    kernels = {module_name(p): p for p in flat if p.endswith("/kernel") and np.ndim(flat[p]) == 2}
    unknown = sorted(set(lora_parts) - set(kernels))
    if unknown:
        raise ValueError(f"the adapter targets modules that are not Linear layers of the base model: {unknown[:5]} "
                         "(an adapter for another architecture?)")
    modules_to_save = [*(settings.get("modules_to_save") or []),
                       *(SEQ_CLS_HEADS if settings.get("task_type") == "SEQ_CLS" else ())]
    targeted = {m for m in kernels
                if _targeted(settings["target_modules"], m) and not _excluded(m, modules_to_save)}
    if targeted != set(lora_parts):
        raise ValueError(f"{WEIGHTS_FILE} does not match target_modules={settings['target_modules']!r}: no "
                         f"LoRA tensors for {sorted(targeted - set(lora_parts))[:5]}, tensors for modules it "
                         f"does not select: {sorted(set(lora_parts) - targeted)[:5]}")

    use_dora = bool(settings.get("use_dora", False))
    rank, alpha = settings["r"], settings["lora_alpha"]
    lora, ranks, alphas = {}, {}, {}
    for m, parts in lora_parts.items():
        path = kernels[m]
        r = _check_shapes(m, parts, *flat[path].shape, use_dora)
        declared = _pattern_value(settings.get("rank_pattern") or {}, m, rank)
        if r != declared:
            raise ValueError(f"{WEIGHTS_FILE}: {m!r} has rank {r}, but adapter_config.json (r / rank_pattern) says {declared}")
        lora[path] = {leaf: jnp.asarray(value.T) for leaf, value in parts.items()}
        ranks[path], alphas[path] = r, _pattern_value(settings.get("alpha_pattern") or {}, m, alpha)

    extras = _extras(saved, params, modules_to_save, settings.get("bias", "none"), set(lora_parts))
    if not lora and not extras:
        raise ValueError(f"{folder} adapts nothing: no LoRA tensors and no modules_to_save or biases")

    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        targets=_selecting(lora, [p for p, _ in lora_candidates(params)]) if lora else None,
        rank_pattern=_patterns(ranks, rank, *OUR_KEYS),
        alpha_pattern=_patterns(alphas, alpha, *OUR_KEYS),
        dropout=float(settings.get("lora_dropout") or 0.0),
        init=PEFT_INITS[settings.get("init_lora_weights", True)],
        scaling="rslora" if settings.get("use_rslora") else "standard",
        use_dora=use_dora,
        trainable=_selecting(extras, flat) if extras else None,
    )
    lora_tree = pytree.unflatten({f"{p}/{k}": v for p, ad in lora.items() for k, v in ad.items()})
    matched_adapters(params, lora_tree, config)
    return PeftAdapter(lora=lora_tree, extras=pytree.unflatten(extras), config=config)

