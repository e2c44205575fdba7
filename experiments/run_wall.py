"""Wall time of the same ``experiments/qqp.py`` run under two source trees, alternating, in one invocation.

    python experiments/run_wall.py --vs-root /path/to/older/flaxlora --rounds 2 \
        --flags "--members 2 --max-steps 120" --json experiments/results/members-one-step/wall.json

Each round runs ``qqp.py FLAGS`` once with this tree's flaxlora and once with --vs-root's (each in
its own process, a fresh output folder, the persistent compilation cache off), so that a change in
the machine's load falls on both; it reports each run's wall, train and compile seconds (from
results.json; the older tree may lack compile figures) and the medians' ratio, ours / theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(root: Path, flags: list[str], out: Path) -> dict:
    """The figures of one qqp.py run of ``root``'s code into ``out``."""
    command = [sys.executable, str(root / "experiments" / "qqp.py"), *flags, "--output-dir", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    subprocess.run(command, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    return {k: results.get(k) for k in ("wall_seconds", "train_seconds", "compile_seconds", "programs", "steps", "mcc")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="run_wall.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", required=True, help="qqp.py flags of both runs (quoted)")
    p.add_argument("--vs-flags", help="qqp.py flags of the --vs-root runs, if they differ")
    p.add_argument("--vs-root", required=True, help="the other flaxlora source tree")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    flags = {"ours": shlex.split(args.flags), "vs": shlex.split(args.vs_flags or args.flags)}
    roots = {"ours": ROOT, "vs": Path(args.vs_root).resolve()}
    runs = {name: [] for name in roots}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, root in roots.items():
                runs[name].append(run(root, flags[name], Path(tmp) / f"{name}-{round_}"))
                print(name, round_, runs[name][-1], flush=True)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_seconds", "train_seconds")}
              for name, rs in runs.items()}
    result = {"flags": flags, "vs_root": args.vs_root, "runs": runs, "median": median,
              "wall_ratio": median["ours"]["wall_seconds"] / median["vs"]["wall_seconds"],
              "train_ratio": median["ours"]["train_seconds"] / median["vs"]["train_seconds"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
