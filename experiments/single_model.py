"""Single-model candidates made from finished runs' checkpoints, scored on validation and test.

    python experiments/single_model.py --runs RUN [RUN ...] --json OUT.json [--tails 0.25 0.5] [--emas 0.99 0.995]

For each run folder (one adapter, or an ensemble run with OUT/members/i) the candidates are one
adapter each, exported and served as any run's:

    final      the adapter saved at the last step (an ensemble: each member's, and ``fold``: the
               members folded into one adapter of K times the rank, their mean update, flaxlora.fold)
    tail-F     the uniform average of the trained tree over the checkpoints of the last fraction F of
               the steps (stochastic weight averaging over the saved snapshots; with members: folded)
    ema-D      the exponential average over the snapshots, decay D per step (D ** interval per
               snapshot, started at the first snapshot; with members: folded)

Averages need the run's periodic checkpoints kept (``qqp.py --save-every 20 --keep-checkpoints 80``).
Every candidate is merged into the run's base and scored as ``flaxlora.restore`` scores (accuracy,
F1, MCC, log loss; threshold P = 0.5) on the run's validation and test splits; the ensemble's own
figures (the mean of the members' probabilities) come from its results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from flaxlora.data.batching import default_buckets
from flaxlora.data.tokenize import pair_format_for
from flaxlora.lora.adapters import merge_pretrained
from flaxlora.lora.fold import fold
from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.data import load_qqp
from flaxlora.qqp.ensemble import member_folders, score
from flaxlora.qqp.predict import Predictor, ensemble_members, load_base, unrolled
from flaxlora.qqp.run import labelled_splits
from flaxlora.training.checkpoint import Checkpointer


def snapshots(folder: Path) -> dict[int, dict]:
    """``{step: trained tree}`` of every readable checkpoint of a run folder."""
    with Checkpointer(folder / "checkpoints", read_only=True) as ckpt:
        return {step: ckpt.restore_for_inference(step)[0] for step in ckpt.all_steps()}


def mean(trees: list) -> dict:
    return jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0), *trees)


def averages(history: dict[int, dict], total: int, tails: list[float], emas: list[float]) -> dict[str, dict]:
    """The candidates of one adapter's snapshots ``{step: tree}`` (the last at ``total``)."""
    steps = sorted(history)
    out = {"final": history[total]}
    for fraction in tails:
        kept = [s for s in steps if s > total * (1 - fraction)]
        out[f"tail-{fraction:g}"] = mean([history[s] for s in kept])
    for decay in emas:
        average, previous = history[steps[0]], steps[0]
        for s in steps[1:]:
            weight = decay ** (s - previous)
            average = jax.tree.map(lambda a, x, w=weight: w * a + (1 - w) * x, average, history[s])
            previous = s
        out[f"ema-{decay:g}"] = average
    return out


def candidates(run_dir: Path, tails: list[float], emas: list[float]) -> tuple[dict[str, tuple], dict]:
    """``({name: (trained tree, its lora config)}, checkpoint metadata)``; an ensemble run's
    candidates are folded over its members (``member-i``: each member's own final adapter)."""
    results = json.loads((run_dir / "results.json").read_text())
    folders = ensemble_members(run_dir) or member_folders(run_dir, 1)
    with Checkpointer(folders[0] / "checkpoints", read_only=True) as ckpt:
        meta = ckpt.read_meta()
    config = RunConfig.from_dict(meta["run"]).lora
    per_member = [averages(snapshots(folder), results["steps"], tails, emas) for folder in folders]
    if len(folders) == 1:
        return {name: (tree, config) for name, tree in per_member[0].items()}, meta
    out = {f"member-{i}": (m["final"], config) for i, m in enumerate(per_member)}
    for name in per_member[0]:
        out["fold" if name == "final" else f"fold-{name}"] = fold([m[name] for m in per_member], config)
    return out, meta


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="single_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run output folders (single or ensemble runs)")
    p.add_argument("--tails", nargs="*", type=float, default=[0.25, 0.5], help="fractions of the steps to average over")
    p.add_argument("--emas", nargs="*", type=float, default=[0.99, 0.995, 0.998], help="decays per step")
    p.add_argument("--json", required=True, help="write the scores here (one entry per run)")
    args = p.parse_args(argv)
    out = Path(args.json)
    table = json.loads(out.read_text()) if out.exists() else {}
    for run_dir in map(Path, args.runs):
        if str(run_dir) in table:
            continue
        trees, meta = candidates(run_dir, args.tails, args.emas)
        run, pretrained = load_base(meta)
        splits = {k: v for k, v in labelled_splits(load_qqp(run.data_dir, from_hub=run.from_hub), run.eval_examples).items()
                  if k != "train"}
        predictor = Predictor(pretrained.model, pretrained.params, pretrained.tokenizer, pair_format_for(pretrained.kind),
                              run.max_length, run.buckets or default_buckets(run.max_length))  # compiled once, for all
        scores = {}
        for name, (tree, config) in trees.items():
            tree = unrolled(tree, run)
            predictor.params = merge_pretrained(pretrained.params, tree["lora"], config, tree["extras"])
            scores[name] = score(predictor, splits)
            print(run_dir.name, name, {s: round(v["mcc"], 4) for s, v in scores[name].items()}, flush=True)
        table[str(run_dir)] = {"results": {s: json.loads((run_dir / "results.json").read_text())["splits"][s] for s in splits},
                               "candidates": scores}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
