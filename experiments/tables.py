"""The summary tables README.md and experiments/README.md quote, made from committed results.

    python experiments/tables.py     # rewrite every table in TABLES from its JSON

Each table is a function of committed JSON files plus the command, code and machine that made
them, written as a caption above the table; tests/test_results.py checks that each committed
table is what its function makes, tests/test_readme.py that the documents quote it verbatim.
(Tables of runs come from their own scripts: ``default_runs.py --table-only``, ``ablation.py``.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Source:
    """Results files (relative to experiments/results/) and how they were made."""

    files: tuple[str, ...]
    about: str  # what was measured, one sentence
    command: str
    code: str  # the commit the command ran at
    machine: str

    def caption(self) -> str:
        return f"{self.about}. Command: `{self.command}`; code at {self.code}; {self.machine}."

    def load(self) -> list[dict]:
        return [json.loads((RESULTS / f).read_text()) for f in self.files]


def speed_vs_peft(source: Source) -> str:
    """Our train step and evaluation against PEFT's, from one ``bench.py --peer peft [--vs ...]`` JSON."""
    (r,) = source.load()
    peft = r["peer"]
    sides = [("flaxlora (defaults)", r)]
    if "vs" in r:
        sides.append((f"flaxlora, `{r['vs']['flags']}`", r["vs"]))
    c = r["config"]
    lines = [f"{c['model']}, `--preset {c['preset']}`, batch {c['batch']} x {c['seq_len']} tokens, {c['dtype']}: "
             f"median of {c['steps']} train steps after {c['warmup']}, {c['eval_batches']} x {c['rounds']} "
             f"evaluation batches of {c['eval_batch']}, the sides alternating in {c['rounds']} rounds. "
             + source.caption(), "",
             "| side | train step s | eval pairs/s | peak RSS MiB | train throughput vs PEFT | peak RSS vs PEFT |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, side in sides:
        lines.append(f"| {name} | {side['train_step_s']:.3f} | {side['eval_pairs_per_s']:.1f} | "
                     f"{side['peak_rss_mb']:,.0f} | {peft['train_step_s'] / side['train_step_s']:.2f}x | "
                     f"{side['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x |")
    lines.append(f"| PEFT + PyTorch {peft['torch'].split('+')[0]} | {peft['train_step_s']:.3f} | "
                 f"{peft['eval_pairs_per_s']:.1f} | {peft['peak_rss_mb']:,.0f} | 1.00x | 1.00x |")
    return "\n".join(lines) + "\n"


def memory_per_process(source: Source) -> str:
    """Peak resident memory of each process of short runs, from ``bench_memory.py`` JSONs."""
    lines = [source.caption(), "",
             "| model | layout (processes x devices) | mesh | frozen kernels | peak RSS per process GiB | "
             "target GiB | train tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in zip(source.files, source.load()):
        kernels = "NF4" if name.endswith("-nf4.json") else r["param_dtype"]
        for run in r["runs"]:
            rss = " / ".join(f"{g:.2f}" for g in run["peak_rss_GiB"])
            lines.append(f"| {Path(r['model']).name} ({r['model_GiB']} GiB) | {run['processes']} x "
                         f"{run['devices_per_process']} | {r['mesh']} | {kernels} | {rss} | {run['target_GiB']} | "
                         f"{run['train_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, tuple[Callable[[Source], str], Source]] = {
    "speed/vs-peft.md": (speed_vs_peft, Source(
        files=("speed/lora-vs-peft.json",),
        about="Each side in its own process on the same real QQP pairs; throughput ratio = PEFT's step time / ours",
        command="python experiments/bench.py --model minilm-l6 --preset lora --batch 32 --seq-len 128 "
                "--dtype float32 --steps 10 --peer peft --vs='--remat full' --json experiments/results/speed/lora-vs-peft.json",
        code="1d7197e", machine="a 2-core AMD EPYC VM shared with other jobs: compare ratios, not times")),
    "memory-llama-2.6g.md": (memory_per_process, Source(
        files=("memory-llama-2.6g-1x1-float.json", "memory-llama-2.6g-1x1-nf4.json", "memory-llama-2.6g.json"),
        about="A random Llama-architecture model of 642 M parameters (`bench_memory.py --make-model`: hidden 2048, "
              "12 layers), `--preset lora`, 2 steps of batch 8 x 32 tokens, evaluation and the final checkpoint; "
              "peak RSS includes loading; target: the process's share of the model + 2 GB (NF4: a quarter of it)",
        command="python experiments/bench_memory.py --model runs/llama-2.6g --layouts 1x1 --mesh data=1 "
                "[--extra --quantize nf4]; the same with --layouts 1x8 2x4 (--mesh fsdp=8)",
        code="16a1d34 (sharded runs) and cff05db (one device)",
        machine="a 2-core AMD EPYC VM, fp32, its CPU split into devices with "
                "XLA_FLAGS=--xla_force_host_platform_device_count")),
}


def write_all() -> None:
    for path, (make, source) in TABLES.items():
        (RESULTS / path).write_text(make(source))
        print(RESULTS / path)


if __name__ == "__main__":
    write_all()
