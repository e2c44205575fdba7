"""Export a training run for PyTorch: ``python -m flaxlora.export``.

    python -m flaxlora.export --checkpoint runs/qqp-lora-... --format peft --out adapter/
    python -m flaxlora.export --checkpoint runs/qqp-lora-... --format merged --out model/

``peft``: a PEFT LoRA adapter folder for ``peft.PeftModel.from_pretrained(base, out)`` (see
:mod:`flaxlora.interop.peft`); ``merged``: the fine-tuned model as a Hugging Face folder for
``transformers.AutoModelForSequenceClassification.from_pretrained(out)`` (see
:mod:`flaxlora.interop.merged`). Both carry a model card, README.md (see
:mod:`flaxlora.interop.card`), with the run's held-out metrics from its results.json. The export
is written to a new folder next to ``--out`` and renamed into place, so an existing ``--out``
survives any error. Every export folder holds ``flaxlora_export.json`` (what was exported, from
where); ``--force`` replaces only a folder that holds it, so a folder of anything else is never
touched. Nothing but the result line is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from flaxlora import __version__
from flaxlora.cli import ArgumentParser
from flaxlora.data.tokenize import PROMPT, pair_format_for
from flaxlora.interop.card import FILE as CARD_FILE
from flaxlora.interop.card import ExportInfo, model_card
from flaxlora.interop.merged import classification_pad_token, save_merged
from flaxlora.interop.peft import save_peft
from flaxlora.loading import Pretrained, known_models
from flaxlora.loading.registry import HUB_ALIASES, resolve
from flaxlora.lora import merge_pretrained, summarize
from flaxlora.qqp.config import PRESETS, RunConfig
from flaxlora.qqp.data import LABEL_WORDS
from flaxlora.qqp.predict import ensemble_members, load_base, unrolled
from flaxlora.training.checkpoint import Checkpointer, checkpoint_dir

FORMATS = ("peft", "merged")
MARKER = "flaxlora_export.json"


def _check_replaceable(out: Path, force: bool) -> None:
    """FileExistsError unless ``out`` is absent, an empty folder, or (with ``force``) an export of this tool."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{out} is not empty: pass --force to replace a previous export, or choose another --out")
    if not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is not empty and holds no {MARKER}, so it is not a previous export of "
                              "flaxlora: --force replaces only those; choose another --out")


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is removed only once the rename is done."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old)


def base_reference(model: str) -> tuple[str, str | None]:
    """(folder or hub id, .gguf file name in it or None) of a run's base model, for transformers."""
    path = resolve(model) if model in known_models() else Path(model)
    if not path.exists():
        return HUB_ALIASES.get(model, model), None
    path = path.resolve()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    path = ggufs[0] if len(ggufs) == 1 else path
    return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)


def base_args(model: str, pretrained: Pretrained) -> str:
    """The arguments of ``AutoModelForSequenceClassification.from_pretrained`` for the base model."""
    folder, gguf = base_reference(model)
    args = repr(folder) + (f", gguf_file={gguf!r}" if gguf else "") + f", num_labels={len(LABEL_WORDS)}"
    if pretrained.kind == "decoder":
        pad = pretrained.tokenizer.convert_tokens_to_ids(classification_pad_token(pretrained.tokenizer))
        args += f", pad_token_id={pad}"
    return args


def _inputs(run: RunConfig, pretrained: Pretrained) -> str:
    if pair_format_for(pretrained.kind) == "template":  # encoders and the T5 classifier
        return f"the tokenizer's text pair, `tokenizer(question1, question2)`, at most {run.max_length} tokens"
    prompt = "".join(f"{part} {{q{i}}}" for i, part in enumerate(PROMPT[:2], 1)) + PROMPT[2]
    return (f"the prompt {prompt!r} then the eos token, at most {run.max_length} tokens, padded with "
            f"{classification_pad_token(pretrained.tokenizer)!r} (`flaxlora.encode_pairs(..., pair_format=\"prompt\")`)")


def _results(source: Path) -> dict | None:
    """The run's results.json (next to its checkpoints/ folder), or None."""
    file = source.parent / "results.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str, *, step: int | None = None,
           force: bool = False) -> Path:
    """Export the run at ``checkpoint`` (its output or checkpoints/ folder) as ``fmt`` to ``out``.

    Raises:
      FileExistsError: ``out`` is a file, or a non-empty folder and not ``force`` or without flaxlora_export.json.
      FileNotFoundError: no checkpoint (at ``step``).
      ValueError: an unknown format, an ensemble run, or a run PEFT cannot express (see :func:`flaxlora.interop.save_peft`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if (members := ensemble_members(checkpoint)) is not None:
        raise ValueError(f"{checkpoint} is an ensemble of {len(members)} adapters, which neither one PEFT adapter nor "
                         f"one merged model holds: export each member ({', '.join(map(str, members))})")
    source, out = Path(checkpoint_dir(checkpoint)).resolve(), Path(out).resolve()  # exports are local folders
    if out == source or out in source.parents:
        raise FileExistsError(f"{out} holds the checkpoint being exported: choose another --out")
    _check_replaceable(out, force)
    with Checkpointer(source, read_only=True) as ckpt:
        trainable, meta = ckpt.restore_for_inference(step)
        if step is None:  # the newest readable step, which restore_for_inference fell back to
            unreadable = {s for s, _ in ckpt.skipped}
            step = max(s for s in ckpt.all_steps() if s not in unreadable)
    if RunConfig.from_dict(meta["run"]).text_to_text:
        raise ValueError("a text-to-text run scores label words with T5's LM head, which neither a PEFT SEQ_CLS "
                         "adapter nor a sequence-classifier folder expresses: use flaxlora.restore(RUN) instead")
    run, pretrained = load_base(meta)
    trainable = unrolled(trainable, run)
    lora, extras = trainable["lora"], trainable["extras"]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        folder, gguf = base_reference(run.model)
        base, peft_config = str(Path(folder) / gguf) if gguf else folder, None
        if fmt == "peft":
            peft_config = save_peft(staging, pretrained.params, lora, run.lora, extras, save_modules=pretrained.missing,
                                    base_model_name_or_path=base)
        else:
            save_merged(staging, pretrained, merge_pretrained(pretrained.params, lora, run.lora, extras), LABEL_WORDS)
        info = ExportInfo(
            fmt=fmt, folder=str(out), model=run.model, base=base, base_args=base_args(run.model, pretrained),
            preset=next((name for name, preset in PRESETS.items() if preset.lora == run.lora), None),
            lora=run.lora, summary=summarize(pretrained.params, lora, run.lora, extras), step=step,
            results=_results(source), labels=LABEL_WORDS, inputs=_inputs(run, pretrained), peft_config=peft_config)
        (staging / CARD_FILE).write_text(model_card(info), encoding="utf-8")
        marker = {"tool": "flaxlora", "version": __version__, "format": fmt, "checkpoint": str(source),
                  "model": run.model, "base": meta.get("base")}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m flaxlora.export", description="Export a saved run for PyTorch.")
    p.add_argument("--checkpoint", required=True, help="run output folder or its checkpoints/ folder")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="peft: PEFT LoRA adapter folder; merged: Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--force", action="store_true", help=f"replace a previous export at --out (a folder with {MARKER})")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format, step=args.step, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        p.fail(err)
    print(f"wrote {args.format} export to {out}")


if __name__ == "__main__":
    main()
