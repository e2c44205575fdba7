"""An ensemble run (``RunConfig.members = k > 1``): k adapters on one frozen base, in one job.

Member i is trained as the single-adapter run ``run.member(i)`` (seed ``k * seed + i``: a member is
the run ``qqp.py --members 1 --seed k*seed+i`` would make) into its own complete run folder, one
after another:

    OUT/members/0/, OUT/members/1/, ...   each a run folder (results.json, checkpoints/, ...)
    OUT/results.json                      the ensemble's figures, the members' beside them

The ensemble averages the members' class probabilities (:func:`flaxlora.qqp.predict.restore_ensemble`:
the base held once, the adapters vmapped); ``flaxlora.restore(OUT)`` serves it. ``--resume`` skips
finished members and resumes an interrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

from flaxlora.paths import as_path
from flaxlora.qqp.baselines import scores
from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.data import load_qqp
from flaxlora.qqp.predict import MEMBERS, Predictor, restore_ensemble
from flaxlora.qqp.reporting import peak_rss_mib
from flaxlora.qqp.run import check_resumable, finetune, labelled_splits
from flaxlora.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def score(predictor: Predictor, splits: dict) -> dict[str, dict[str, float]]:
    """Accuracy, F1, MCC, log loss and n (pairs) of ``predictor`` per labelled split (threshold P = 0.5)."""
    out = {}
    for name, split in splits.items():
        proba = predictor.predict_proba(split.question1, split.question2)
        out[name] = {**scores(split.labels, (proba >= 0.5).astype(int), proba), "n": len(split.labels)}
    return out


def _finished_members(run: RunConfig, folders: list, resume: bool) -> dict[int, dict[str, Any]]:
    """The results of the members that finished before, by index. Before any work: FileExistsError
    for saved members without ``resume``; ValueError for saved members of another configuration."""
    finished = {}
    for i, folder in enumerate(folders):
        saved = None
        if (folder / "results.json").is_file():
            finished[i] = json.loads((folder / "results.json").read_text())
            saved = finished[i]["run"]
        elif (folder / "checkpoints").is_dir():
            with Checkpointer(folder / "checkpoints", read_only=True) as ckpt:
                saved = ckpt.read_meta()["run"] if ckpt.latest_step() is not None else None
        if saved is None:
            continue
        if not resume:
            raise FileExistsError(f"{folder} already holds a member's run: pass --resume or use a new --output-dir")
        check_resumable(saved, run.member(i))
    return finished


def finetune_ensemble(run: RunConfig, output_dir: str | os.PathLike, *, resume: bool = False,
                      progress: bool = True) -> dict[str, Any]:
    """Train ``run.members`` adapters one after another, then score their ensemble on validation
    and test; returns (and writes to OUT/results.json) its figures.

    The results hold what a single run's do: the ensemble's metrics per split; ``steps``,
    ``train_seconds``, ``wall_seconds`` and ``trainable_params`` summed over the members
    (``trainable_percent`` of the model's parameters); ``members``: each member's folder, seed and
    per-split metrics.
    """
    out = as_path(output_dir)
    folders = [out / MEMBERS / str(i) for i in range(run.members)]
    finished = _finished_members(run, folders, resume)
    members = []
    for i, folder in enumerate(folders):
        if i in finished:
            members.append(finished[i])
            log.info("member %d of %d: finished before, in %s", i + 1, run.members, folder)
            continue
        log.info("member %d of %d (seed %d) into %s", i + 1, run.members, run.member(i).seed, folder)
        members.append(finetune(run.member(i), folder, resume=resume, progress=progress))

    started = time.perf_counter()
    data = load_qqp(run.data_dir, from_hub=run.from_hub)
    splits = {name: s for name, s in labelled_splits(data, run.eval_examples).items() if name != "train"}
    per_split = score(restore_ensemble(folders), splits)
    held_out = "test" if "test" in per_split else "validation"
    first = members[0]
    total = lambda key: sum(m[key] for m in members)  # noqa: E731
    results = {
        **{k: per_split[held_out][k] for k in ("accuracy", "f1", "mcc", "loss")},
        "held_out_split": held_out,
        "splits": per_split,
        **{k: first[k] for k in ("model", "base_model", "data", "data_report", "examples", "positive_rate", "devices")},
        "steps": total("steps"),
        "skipped_steps": total("skipped_steps"),
        "trainable_params": total("trainable_params"),
        "total_params": first["total_params"],
        "trainable_percent": total("trainable_percent"),
        "train_tokens_per_s": first["train_tokens_per_s"],
        "train_seconds": total("train_seconds"),
        "wall_seconds": total("wall_seconds") + time.perf_counter() - started,
        "peak_rss_MiB": max(peak_rss_mib(), *(m["peak_rss_MiB"] for m in members)),
        "seed": run.seed,
        "run": run.to_dict(),
        "members": [{"output_dir": f"{MEMBERS}/{i}", "seed": m["seed"],
                     "splits": {name: {k: m["splits"][name][k] for k in ("accuracy", "f1", "mcc")} for name in per_split}}
                    for i, m in enumerate(members)],
    }
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
