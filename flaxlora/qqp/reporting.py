"""What a run reports: metrics.jsonl + TensorBoard, the curves PNG, the one-screen summary."""

from __future__ import annotations

import io
import json
import logging
import os
import resource
from typing import Any

import numpy as np
from etils import epath

from flaxlora.paths import is_url

log = logging.getLogger(__name__)


class RunLog:
    """metrics.jsonl + TensorBoard; on resume, records after the restored step are dropped.

    Only the writing process (``enabled``: process 0 of several) reads and writes the files, so
    no process reads metrics.jsonl while another rewrites it; the others keep only the records
    of this session. A local metrics.jsonl is appended to; one at a URL (``gs://``: objects cannot
    be appended to) is rewritten whole at each record, a few hundred short lines at most.
    """

    def __init__(self, output_dir: epath.Path, resume_step: int | None, enabled: bool = True):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        records = []
        if enabled and resume_step is not None and self.path.exists():
            records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
        self.records = records
        self._tb = None
        if not enabled:
            return
        self._rewrite()
        self._tb = _summary_writer(output_dir / "tb")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if is_url(self.path):
            self._rewrite()
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "split"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def _rewrite(self) -> None:
        """metrics.jsonl holding exactly ``self.records``."""
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _summary_writer(logdir: epath.Path):
    """tensorboardX's writer at ``logdir``, or None where it cannot write there (TensorBoard is
    optional: metrics.jsonl is always written)."""
    try:
        from tensorboardX import SummaryWriter

        if is_url(logdir):
            import google.cloud.storage  # noqa: F401  (what tensorboardX writes gs:// with)
    except ImportError as err:
        log.info("no TensorBoard events (%s)", err)
        return None
    return SummaryWriter(os.fspath(logdir))


def plot_curves(records: list[dict[str, Any]], path: epath.Path) -> None:
    """PNG of the training loss and the evaluation accuracy / MCC against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = [r for r in records if "split" not in r and r.get("loss") is not None]  # None: all skipped
    left.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train loss (mean of each log window)")
    for split, style in (("eval", "o-"), ("test", "s--")):
        evals = [r for r in records if r.get("split") == split]
        if evals:
            left.plot([r["step"] for r in evals], [r["loss"] for r in evals], style, label=f"{split} loss")
            for metric in ("accuracy", "mcc"):
                right.plot([r["step"] for r in evals], [r[metric] for r in evals], style, label=f"{split} {metric}")
    left.set_xlabel("step"), left.legend(), right.set_xlabel("step"), right.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(png.getvalue())


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_throughput(records: list[dict[str, Any]]) -> float | None:
    """Mean train tokens/s over logged windows, skipping the first (the warm-up of the first steps)."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return float(np.mean(rates)) if rates else None


def one_screen_summary(results: dict[str, Any], output_dir: str | os.PathLike) -> str:
    """The run in a few lines: model, data, budget, parameters, metrics per split, outputs."""
    lines = [
        f"model      {results['model']}   ({results['devices']}, seed {results['seed']})",
        f"data       {results['data']}",
        "examples   " + ", ".join(f"{k} {v:,} ({100 * results['positive_rate'][k]:.1f}% dup)" for k, v in results["examples"].items()),
        f"trained    {results['steps']} steps, {results['trainable_params']:,} of {results['total_params']:,} "
        f"params ({results['trainable_percent']:.2f}%)",
        f"speed      {results['train_tokens_per_s'] or float('nan'):,.0f} tokens/s; wall {results['wall_seconds']:.0f} s",
    ]
    for split, m in results["splits"].items():
        lines.append(f"{split:<10} accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  MCC {m['mcc']:.4f}  "
                     f"loss {m['loss']:.4f}  (n={m['n']:,})")
    if "members" in results:  # an ensemble run (flaxlora.qqp.ensemble)
        held_out = results["held_out_split"]
        lines.append(f"members    {len(results['members'])} adapters, seeds " + ", ".join(str(m["seed"]) for m in results["members"])
                     + f"; alone: {held_out} MCC " + ", ".join(f"{m['splits'][held_out]['mcc']:.4f}" for m in results["members"]))
        lines.append(f"outputs    {os.fspath(output_dir)}/results.json, members/0..{len(results['members']) - 1}/ (each a run's outputs)")
    else:
        lines.append(f"outputs    {os.fspath(output_dir)}/results.json, metrics.jsonl, curves.png, tb/, checkpoints/")
    return "\n".join(lines)
