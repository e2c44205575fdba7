"""Speed and memory of one LoRA train step: the figure to compare with PEFT's on the same work.

Times the jitted step (forward + backward + AdamW) of LoRA r=8 on query/value plus the
classifier head, at a fixed batch size and each sequence length, after a warm-up, and reports
seconds per step, padded tokens/s and the process's peak RSS. Run each configuration in a fresh
process so the peak is its own:

    python experiments/bench_step.py --model minilm-l6 --batch-size 32 --seq-len 128
    python experiments/bench_step.py --seq-len 32 64 128 --lora-path factored --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(model_name: str, batch_size: int, seq_len: int, lora_path: str, dtype: str, steps: int) -> dict:
    import jax
    import numpy as np

    import flaxlora
    from flaxlora import training
    from flaxlora.qqp.config import DTYPES, PLAIN_LORA
    from flaxlora.qqp.reporting import peak_rss_mib
    from flaxlora.training import sharding

    pretrained = flaxlora.load_pretrained(model_name, dtype=DTYPES[dtype])
    tx = flaxlora.lora_optimizer(1e-4)
    state, frozen = training.init_train_state(pretrained.params, PLAIN_LORA, tx, jax.random.key(0))
    mesh = sharding.make_mesh(None)
    step, shardings = training.jit_train_step(training.logits_fn(pretrained.model, PLAIN_LORA, lora_path), tx, mesh,
                                           state, jax.tree.map(lambda _: sharding.replicated(mesh), frozen))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1000, 20000, (batch_size, seq_len)).astype(np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
        "labels": rng.integers(0, 2, batch_size).astype(np.int32),
        "weights": np.ones(batch_size, np.float32),
    }
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {
        "model": model_name, "batch": batch_size, "seq": seq_len, "lora_path": lora_path, "dtype": dtype,
        "compile_s": round(compile_s, 2), "step_s_median": round(median, 4),
        "step_s_min": round(min(times), 4), "tokens_per_s": round(batch_size * seq_len / median),
        "peak_rss_MiB": round(peak_rss_mib()), "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--lora-path", choices=("merged", "factored"), default="merged")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up step")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one configuration in-process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch_size, args.seq_len[0], args.lora_path, args.dtype, args.steps)))
        return
    for seq in args.seq_len:
        cmd = [sys.executable, __file__, "--one", "--model", args.model, "--batch-size", str(args.batch_size),
               "--seq-len", str(seq), "--lora-path", args.lora_path, "--dtype", args.dtype, "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
