"""What the default run's training would cost with other length buckets, from measured step times.

    python experiments/buckets.py --out experiments/results/buckets

Measures a preset's train step at batch --batch for each length of --lengths (``bench.py``, our
side in its own process, median of --steps steps after a warm-up), then replays the batches the
default run trains on (the bundled sample's train split, ``TrainIterator`` with the run's batch
size and seed, --steps-per-run of them) under each candidate bucket set: the share of padded
positions that hold real tokens, and the steady training seconds the measured step times add up
to (compiles not included: one per bucket, listed as measured). Writes OUT/buckets.json and
OUT/buckets.md; step times already in OUT/buckets.json are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench

CANDIDATES = ((32, 64, 96, 128), (24, 32, 48, 64, 128), (24, 32, 40, 48, 64, 128),
              (16, 24, 32, 48, 64, 96, 128), (24, 32, 40, 48, 64, 96, 128), (16, 24, 32, 40, 48, 64, 96, 128))


def step_time(preset: str, batch: int, length: int, steps: int) -> dict:
    r = bench.measure_ours(preset=preset, batch=batch, seq_len=length, steps=steps, warmup=2, rounds=1, eval_batches=0)
    return {"train_step_s": r["train_step_s"], "compile_s": r["compile_s"], "gflops_per_s": r["flops_per_s"] / 1e9}


def train_pairs():
    """The bundled sample's train split, encoded as the default run encodes it (max length 128)."""
    from flaxlora.loading import load_pretrained
    from flaxlora.qqp.config import RunConfig
    from flaxlora.qqp.data import load_qqp
    from flaxlora.qqp.run import encode_split

    run = RunConfig()
    return encode_split(load_qqp()["train"], load_pretrained(run.model), run)


def replay(encoded, batch: int, seed: int, steps: int, buckets: tuple[int, ...]) -> tuple[list[int], int]:
    """The padded length of each of the run's first ``steps`` batches under ``buckets``, and the
    real tokens (of weighted rows) they hold."""
    from flaxlora.data import TrainIterator

    iterator = TrainIterator(encoded, batch, buckets, seed=seed)
    lengths, real = [], 0
    for _ in range(steps):
        b = next(iterator)
        lengths.append(b["input_ids"].shape[1])
        real += int((b["attention_mask"].sum(1) * b["weights"]).sum())
    return lengths, real


def table(replays: list[dict]) -> list[str]:
    """The markdown table of the replays (buckets.json's "replays"), line by line."""
    return ["| buckets | real tokens / padded positions | steady training s | compile s (sum over buckets) |",
            "| --- | --- | --- | --- |",
            *(f"| {', '.join(map(str, r['buckets']))} | {r['real_share']:.2f} | {r['train_s']:.0f} | {r['compile_s']:.0f} |"
              for r in replays)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/buckets")
    p.add_argument("--preset", default="enhanced")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32, 40, 48, 64, 96, 128])
    p.add_argument("--steps", type=int, default=8, help="timed steps per length (after two warm-up steps)")
    p.add_argument("--steps-per-run", type=int, default=960, help="the run's optimizer steps (960: the 2-epoch default run "
                                                                     "experiments/README.md's analysis replays; the preset now trains 1,440)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    unmeasured = sorted({b for buckets in CANDIDATES for b in buckets} - set(args.lengths))
    if unmeasured:
        p.error(f"--lengths lacks the candidate bucket lengths {unmeasured}: add them (each bucket's step is measured)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "buckets.json"
    measured = {int(k): v for k, v in json.loads(saved.read_text())["step_times"].items()} if saved.exists() else {}
    for length in args.lengths:
        if length not in measured:
            measured[length] = step_time(args.preset, args.batch, length, args.steps)
            print(f"S{length}: {measured[length]['train_step_s']:.3f} s/step", flush=True)
            saved.write_text(json.dumps({"preset": args.preset, "batch": args.batch, "step_times": measured}, indent=2))
    rows, encoded = [], train_pairs()
    for buckets in CANDIDATES:
        padded, real = replay(encoded, args.batch, args.seed, args.steps_per_run, buckets)
        rows.append({"buckets": list(buckets), "train_s": sum(measured[s]["train_step_s"] for s in padded),
                     "real_share": real / (sum(padded) * args.batch),
                     "compile_s": sum(measured[b]["compile_s"] for b in buckets)})
    lines = [f"{args.preset}, batch {args.batch}, {args.steps_per_run} steps, seed {args.seed}", "", *table(rows)]
    (out / "buckets.md").write_text("\n".join(lines) + "\n")
    saved.write_text(json.dumps({"preset": args.preset, "batch": args.batch, "step_times": measured, "replays": rows},
                                indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
