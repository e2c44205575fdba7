"""Export a training run for PyTorch: ``python -m flaxlora.export``.

    python -m flaxlora.export --checkpoint runs/qqp-lora-... --format peft --out adapter/
    python -m flaxlora.export --checkpoint runs/qqp-lora-... --format merged --out model/

``peft``: a PEFT LoRA adapter folder for ``peft.PeftModel.from_pretrained(base, out)`` (see
:mod:`flaxlora.interop.peft`); ``merged``: the fine-tuned model as a Hugging Face folder for
``transformers.AutoModelForSequenceClassification.from_pretrained(out)`` (see
:mod:`flaxlora.interop.merged`). The export is written to a new folder next to ``--out`` and
renamed into place, so an existing ``--out`` survives any error. Every export folder holds
``flaxlora_export.json`` (what was exported, from where); ``--force`` replaces only a folder that
holds it, so a folder of anything else is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from flaxlora import __version__
from flaxlora.cli import ArgumentParser
from flaxlora.interop import save_merged, save_peft
from flaxlora.loading import known_models
from flaxlora.loading.registry import resolve
from flaxlora.lora.adapters import merge_pretrained
from flaxlora.qqp.predict import load_base
from flaxlora.training.checkpoint import Checkpointer, checkpoint_dir

FORMATS = ("peft", "merged")
QQP_LABELS = ("not_duplicate", "duplicate")
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


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str, *, step: int | None = None,
           force: bool = False) -> Path:
    """Export the run at ``checkpoint`` (its output or checkpoints/ folder) as ``fmt`` to ``out``.

    Raises:
      FileExistsError: ``out`` is a file, or a non-empty folder and not ``force``.
      FileNotFoundError: no checkpoint (at ``step``).
      ValueError: an unknown format, or a run PEFT cannot express (see :func:`flaxlora.interop.save_peft`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    source, out = checkpoint_dir(checkpoint).resolve(), Path(out).resolve()
    if out == source or out in source.parents:
        raise FileExistsError(f"{out} holds the checkpoint being exported: choose another --out")
    _check_replaceable(out, force)
    with Checkpointer(source, read_only=True) as ckpt:
        trainable, meta = ckpt.restore_for_inference(step)
    run, pretrained = load_base(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        if fmt == "peft":
            base_name = str(resolve(run.model)) if run.model in known_models() else run.model
            save_peft(staging, pretrained.params, trainable["lora"], run.lora, trainable["extras"],
                      save_modules=pretrained.missing, base_model_name_or_path=base_name)
        else:
            params = merge_pretrained(pretrained.params, trainable["lora"], run.lora, trainable["extras"])
            save_merged(staging, pretrained, params, QQP_LABELS)
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
