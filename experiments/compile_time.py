"""Compile time and memory of the jitted train step, with the layers unrolled or scanned.

    python experiments/compile_time.py --model smollm2-135m --preset enhanced --batch 16 --seq-len 64
    python experiments/compile_time.py ... --scan-layers

Prints one JSON line: seconds to trace and lower the step (``lower_s``), for XLA to compile it
(``compile_s``), the first step's run time (``first_step_s``), the peak RSS before compiling and at
the end (MiB), and the size of the optimized HLO (instructions). Run each layout in its own
process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import bench  # experiments/: the same run configuration and batches as bench.py


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(prog="compile_time.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", choices=bench.PRESETS, default="enhanced")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--scan-layers", action="store_true")
    args = p.parse_args()
    bench_args = bench.parser().parse_args(["--model", args.model, "--preset", args.preset, "--batch", str(args.batch),
                                            "--seq-len", str(args.seq_len), *(["--scan-layers"] if args.scan_layers else [])])

    import jax

    from flaxlora import training
    from flaxlora.loading import load_pretrained
    from flaxlora.lora.optim import lora_optimizer
    from flaxlora.qqp.run import DTYPES, lora_config
    from flaxlora.training import sharding

    run = bench.run_config(bench_args)
    with tempfile.TemporaryDirectory() as tmp:
        bench.write_batches(args.model, args.seq_len, args.batch, args.batch, Path(tmp) / "batches.npz")
        batches, _, _ = bench.load_batches(str(Path(tmp) / "batches.npz"), args.batch, args.batch)
    mesh = sharding.make_mesh(None)
    pretrained = load_pretrained(args.model, dtype=DTYPES[run.dtype], mesh=mesh, scan_layers=run.scan_layers)
    lora = lora_config(run)
    tx = lora_optimizer(run.learning_rate, loraplus_ratio=run.loraplus_ratio, weight_decay=run.weight_decay,
                        max_grad_norm=run.max_grad_norm)
    state, frozen = training.init_train_state(pretrained.params, lora, tx, jax.random.key(0), mesh)
    step, _ = training.jit_train_step(training.logits_fn(pretrained.model, lora, run.lora_path), tx, mesh, state, frozen)
    batch = sharding.global_batch(batches[0], mesh)
    before = peak_rss_mib()
    start = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    done = time.perf_counter()
    hlo = compiled.as_text()
    print(json.dumps({
        "model": args.model, "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
        "scan_layers": run.scan_layers, "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
        "first_step_s": done - compiled_at, "rss_before_compile_mib": before, "peak_rss_mib": peak_rss_mib(),
        "hlo_instructions": sum(1 for line in hlo.splitlines() if " = " in line),
    }))


if __name__ == "__main__":
    main()
