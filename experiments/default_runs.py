"""The default run's table: `experiments/qqp.py` at its full budget, per preset (or variant) and seed.

    python experiments/default_runs.py --output-dir experiments/results/default-runs
    python experiments/default_runs.py --variants enhanced "nf4=--quantize nf4" --seeds 0 1 2 --output-dir ...

A variant is a preset name (``enhanced``, ``lora``, ``full``: ``--preset NAME``) or ``NAME=FLAGS``,
qqp.py flags on top of the default preset. Each (variant, seed) runs ``experiments/qqp.py`` in its
own process into OUT/<variant>-s<seed>/ (kept: results.json and metrics.jsonl); finished runs are
skipped, so an interrupted table resumes. Writes OUT/table.md and OUT/table.json: mean and
standard deviation over the seeds of held-out test accuracy, F1 and MCC, validation MCC, train and
wall seconds; the steps, peak RSS, the trainable share, and each run's own figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from qqp_runs import mean_std, run_qqp

PRESETS = ("enhanced", "lora", "full")


def variant_flags(variant: str) -> tuple[str, list[str]]:
    """(name, qqp.py flags) of ``enhanced`` / ``lora`` / ``full`` or ``NAME=FLAGS``."""
    name, _, flags = variant.partition("=")
    if not flags and name not in PRESETS:
        raise SystemExit(f"default_runs.py: error: variant {variant!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor NAME=FLAGS, e.g. 'nf4=--quantize nf4'")
    return name, shlex.split(flags) if flags else ["--preset", name]


def table(out: Path, variants: dict[str, list[str]], seeds: list[int]) -> dict:
    rows = {}
    for name, flags in variants.items():
        done = [s for s in seeds if (out / f"{name}-s{s}" / "results.json").exists()]  # --table-only: the finished
        if not done:
            continue
        runs = [json.loads((out / f"{name}-s{s}" / "results.json").read_text()) for s in done]
        rows[name] = {
            "flags": shlex.join(flags),
            "seeds": done,
            **{f"test_{m}": mean_std([r["splits"]["test"][m] for r in runs]) for m in ("accuracy", "f1", "mcc")},
            "validation_mcc": mean_std([r["splits"]["validation"]["mcc"] for r in runs]),
            "test_mcc_per_seed": [r["splits"]["test"]["mcc"] for r in runs],
            "trainable_percent": runs[0]["trainable_percent"],
            "steps": runs[0]["steps"],
            "train_seconds": mean_std([r["train_seconds"] for r in runs]),
            "wall_seconds": mean_std([r["wall_seconds"] for r in runs]),
            "peak_rss_MiB": max((r["peak_rss_MiB"] for r in runs if "peak_rss_MiB" in r), default=float("nan")),
        }
    return {"command": shlex.join(sys.argv), "runs": rows}


def markdown(result: dict) -> str:
    pm = lambda s, digits=4: f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"  # noqa: E731
    lines = ["| run (qqp.py flags) | seeds | trainable | steps | test accuracy | test F1 | test MCC | val MCC | "
             "test MCC per seed | train s | wall s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} (`{r['flags']}`) | {', '.join(map(str, r['seeds']))} | {r['trainable_percent']:.2f}% | "
                     f"{r['steps']} | {pm(r['test_accuracy'])} | {pm(r['test_f1'])} | {pm(r['test_mcc'])} | {pm(r['validation_mcc'])} | "
                     f"{', '.join(f'{m:.4f}' for m in r['test_mcc_per_seed'])} | {pm(r['train_seconds'], 0)} | "
                     f"{pm(r['wall_seconds'], 0)} | {r['peak_rss_MiB']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(PRESETS), help="presets or NAME=FLAGS (see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--table-only", action="store_true",
                   help="only write the table of the finished runs (each row: the seeds it has)")
    args = p.parse_args(argv)
    variants = dict(variant_flags(v) for v in args.variants)
    out = Path(args.output_dir)
    if not args.table_only:
        for name, flags in variants.items():
            for seed in args.seeds:
                run_qqp(flags, seed, out / f"{name}-s{seed}")
    result = table(out, variants, args.seeds)
    (out / "table.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
