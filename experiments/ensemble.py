"""Held-out figures of several saved runs and of their ensemble (adapters on one shared base).

    python experiments/ensemble.py --runs runs/enhanced-s0 runs/enhanced-s1 runs/enhanced-s2 --json OUT.json

Each run is restored (`flaxlora.restore`) and scored on the validation and test splits of its
data (the runs' own QQP source and split); the ensemble (`flaxlora.restore_ensemble`) averages
the runs' class probabilities. Prints a table and writes OUT.json: accuracy, F1, MCC and log loss
per split, per run and for the ensemble.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.data import load_qqp
from flaxlora.qqp.ensemble import score
from flaxlora.qqp.predict import restore, restore_ensemble
from flaxlora.qqp.run import labelled_splits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run output folders (two or more)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    run = RunConfig.from_dict(json.loads((Path(args.runs[0]) / "results.json").read_text())["run"])
    data = load_qqp(run.data_dir, from_hub=run.from_hub)
    splits = {k: v for k, v in labelled_splits(data, run.eval_examples).items() if k in ("validation", "test")}
    result = {"command": shlex.join(["python", "experiments/ensemble.py", *(argv or sys.argv[1:])]),
              "runs": {path: score(restore(path), splits) for path in args.runs}}
    result["ensemble"] = score(restore_ensemble(args.runs), splits)
    rows = [*result["runs"].items(), ("ensemble of the above", result["ensemble"])]
    print("| run | " + " | ".join(f"{s} acc | {s} F1 | {s} MCC" for s in splits) + " |")
    print("| --- |" + " --- | --- | --- |" * len(splits))
    for name, figures in rows:
        print(f"| {name} | " + " | ".join(f"{figures[s]['accuracy']:.4f} | {figures[s]['f1']:.4f} | {figures[s]['mcc']:.4f}"
                                           for s in splits) + " |")
    singles = {s: float(np.mean([f[s]["mcc"] for f in result["runs"].values()])) for s in splits}
    print("mean single-run MCC: " + ", ".join(f"{s} {m:.4f}" for s, m in singles.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
