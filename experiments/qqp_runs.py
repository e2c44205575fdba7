"""What the experiment scripts (ablation, default_runs, sweep) share: one ``qqp.py`` run per
process, skipped when finished and resumed when interrupted, and the mean ± std of their tables."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

QQP = Path(__file__).with_name("qqp.py")


def run_qqp(flags: list[str], seed: int, out: Path) -> dict[str, Any]:
    """results.json of ``qqp.py FLAGS --seed SEED --output-dir OUT``, run first unless it is there."""
    if not (out / "results.json").exists():
        command = [sys.executable, str(QQP), *flags, "--seed", str(seed), "--output-dir", str(out), "--quiet"]
        if (out / "checkpoints").is_dir() or (out / "members").is_dir():
            command.append("--resume")  # an interrupted run (or ensemble) continues where it stopped
        print("+", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads((out / "results.json").read_text())


def mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std"}``; the sample std (ddof 1), 0 for one value."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
