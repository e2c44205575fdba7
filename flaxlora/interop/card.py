"""Model cards: the README.md written into every export folder.

    model_card(ExportInfo(...))   # -> Markdown: base model, preset, LoRA settings, trainable
                                  #    parameters, held-out metrics and the Python that loads it
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flaxlora.lora import LoraConfig, ParamSummary

FILE = "README.md"
TITLES = {"peft": "PEFT LoRA adapter", "merged": "merged Hugging Face model"}


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What a card says about one export.

    Attributes:
      fmt: "peft" or "merged".
      folder: where the export lives (the path the load snippet opens).
      model: the run's model name (a short name, hub id, folder or .gguf file).
      base: where transformers finds it (folder, .gguf file or hub id).
      base_args: Python source of the arguments of ``from_pretrained`` that build the base, e.g.
        ``'"/path/to/model", num_labels=2'``.
      preset: the preset whose LoRA settings the run used, or None (custom).
      lora: the run's LoraConfig.
      summary: trainable vs total parameters.
      step: the exported checkpoint's step.
      results: the run's results.json, or None.
      labels: class names by index.
      inputs: one sentence on how a question pair becomes model input.
      peft_config: the adapter_config.json written (PEFT exports only).
    """

    fmt: str
    folder: str
    model: str
    base: str
    base_args: str
    preset: str | None
    lora: LoraConfig
    summary: ParamSummary
    step: int
    results: Mapping[str, Any] | None
    labels: Sequence[str]
    inputs: str
    peft_config: Mapping[str, Any] | None = None


def lora_settings(config: LoraConfig) -> str:
    """One line: rank, alpha and scaling, targets, per-module patterns, init and variant."""
    if config.targets is None:
        return "no adapters"
    scale = "alpha / sqrt(r) (rsLoRA)" if config.scaling == "rslora" else "alpha / r"
    parts = [f"rank {config.rank}, alpha {config.alpha:g}, scale {scale}", f"targets `{config.targets}`"]
    parts += [f"{name} `{dict(value)}`" for name, value in (("rank_pattern", config.rank_pattern),
                                                            ("alpha_pattern", config.alpha_pattern)) if value]
    parts += [f"init {config.init}"] + (["DoRA"] if config.use_dora else [])
    parts += [f"dropout {config.dropout:g}"] if config.dropout else []
    return ", ".join(parts)


def held_out(results: Mapping[str, Any] | None, step: int) -> str:
    """The held-out metrics of ``results`` (results.json) with their split, if they are for ``step``."""
    if results is None:
        return "none recorded (the run folder has no results.json)"
    if results.get("steps") != step:
        return f"none for this checkpoint (results.json is for step {results.get('steps')})"
    split = results["held_out_split"]
    m = results["splits"][split]
    return (f"{split} split (n={m['n']}): accuracy {m['accuracy']:.4f}, F1 {m['f1']:.4f}, MCC {m['mcc']:.4f}, "
            f"loss {m['loss']:.4f}; data: {results['data']}")


def load_snippet(info: ExportInfo) -> str:
    """The Python that loads the export (imports, then the lines that build ``model``)."""
    if info.fmt == "peft":
        return ("from peft import PeftModel\n"
                "from transformers import AutoModelForSequenceClassification\n\n"
                f"base = AutoModelForSequenceClassification.from_pretrained({info.base_args})\n"
                f"model = PeftModel.from_pretrained(base, {info.folder!r})\n")
    return ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({info.folder!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({info.folder!r})\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def model_card(info: ExportInfo) -> str:
    """The README.md of an export folder."""
    s = info.summary
    rows = [
        ("Base model", f"`{info.model}`" + (f" ({info.base})" if info.base != info.model else "")),
        ("Preset", info.preset or "custom (no preset has these LoRA settings)"),
        ("LoRA", lora_settings(info.lora)),
        ("Trained in full", f"`{info.lora.trainable}`" if info.lora.trainable else "nothing"),
        ("Trainable parameters", f"{s.trainable:,} of {s.total:,} ({100 * s.trainable_fraction:.3f}%)"),
        ("Held-out metrics", held_out(info.results, info.step)),
        ("Labels", ", ".join(f"{i} {name}" for i, name in enumerate(info.labels))),
        ("Inputs", info.inputs),
    ]
    if info.peft_config is not None:
        c = info.peft_config
        rows.append(("PEFT settings", f"target_modules `{c['target_modules']}`, modules_to_save "
                                      f"`{c['modules_to_save']}`, bias `{c['bias']}`, r {c['r']}, lora_alpha "
                                      f"{c['lora_alpha']:g}, use_rslora {c['use_rslora']}, use_dora {c['use_dora']}"))
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows)
    return (f"# {info.model} fine-tuned on QQP (duplicate questions): {TITLES[info.fmt]}\n\n"
            f"Exported by flaxlora (`python -m flaxlora.export`) from step {info.step} of the run.\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            f"## Load\n\n```python\n{load_snippet(info)}```\n")
