"""An ensemble run (``RunConfig.members = k > 1``): k adapters on one frozen base, in one job.

:func:`flaxlora.qqp.run.finetune` trains the k members together, in one jitted step (their
adapters and optimizer states stacked and vmapped over the shared base, which is read once per
step), on one shared order of batches (member 0's). Member i's seed ``k * seed + i`` seeds its
adapter, its classifier and its dropout, as the single run ``qqp.py --members 1 --seed k*seed+i``
would; each member is written as a complete run folder:

    OUT/members/0/, OUT/members/1/, ...   each a run folder (results.json, checkpoints/, ...)
    OUT/results.json                      the ensemble's figures, the members' beside them

The ensemble averages the members' class probabilities (the same figures as
:func:`flaxlora.qqp.predict.restore_ensemble`, which ``flaxlora.restore(OUT)`` serves).
``--resume`` continues all members from their common newest step.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from flaxlora.qqp.baselines import scores
from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.predict import MEMBERS, Predictor


def member_folders(out: epath.Path, members: int) -> list[epath.Path]:
    """The run folder of each member: ``out`` itself for one adapter, else ``out/members/i``."""
    return [out] if members == 1 else [out / MEMBERS / str(i) for i in range(members)]


def score(predictor: Predictor, splits: dict) -> dict[str, dict[str, float]]:
    """Accuracy, F1, MCC, log loss and n (pairs) of ``predictor`` per labelled split (threshold P = 0.5)."""
    out = {}
    for name, split in splits.items():
        proba = predictor.predict_proba(split.question1, split.question2)
        out[name] = {**scores(split.labels, (proba >= 0.5).astype(int), proba), "n": len(split.labels)}
    return out


def ensemble_results(run: RunConfig, members: list[dict[str, Any]], per_split: dict[str, dict[str, float]]) -> dict[str, Any]:
    """An ensemble run's results.json: what a single run's holds, with the ensemble's metrics per
    split (``per_split``), ``trainable_params`` and ``trainable_percent`` of all members together,
    the job's steps and times, and ``members``: each member's folder, seed and per-split metrics."""
    first = members[0]
    held_out = first["held_out_split"]
    shared = ("held_out_split", "model", "base_model", "data", "data_report", "examples", "positive_rate", "steps",
              "total_params", "train_tokens_per_s", "train_seconds", "wall_seconds", "programs", "compiles",
              "compiles_from_cache", "compile_seconds", "devices")
    return {
        **{k: per_split[held_out][k] for k in ("accuracy", "f1", "mcc", "loss")},
        "splits": per_split,
        **{k: first[k] for k in shared},
        "skipped_steps": sum(m["skipped_steps"] for m in members),
        "trainable_params": sum(m["trainable_params"] for m in members),
        "trainable_percent": sum(m["trainable_percent"] for m in members),
        "peak_rss_MiB": max(m["peak_rss_MiB"] for m in members),
        "seed": run.seed,
        "run": run.to_dict(),
        "members": [{"output_dir": f"{MEMBERS}/{i}", "seed": m["seed"],
                     "splits": {name: {k: m["splits"][name][k] for k in ("accuracy", "f1", "mcc")} for name in per_split}}
                    for i, m in enumerate(members)],
    }
