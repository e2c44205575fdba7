"""The training loop's own cost per step, on a tiny random model whose device work is negligible.

    python experiments/loop_overhead.py --steps 400 --json experiments/results/loop-overhead/cpu.json
    python experiments/loop_overhead.py ... --vs-root /path/to/another/flaxlora   # the same, both trees

Writes a tiny random BERT (2 layers, hidden 32, all-MiniLM-L6-v2's tokenizer) to a temporary
folder. For each source tree (this one; with --vs-root, that one too, alternating over --rounds)
it runs ``experiments/qqp.py`` on it in its own process for --steps steps (the bundled QQP
sample, one bucket of --length tokens, --batch pairs a step, logging every 50 steps, no
evaluation or save before the end) and reads the loop's milliseconds per step from
``metrics.jsonl``: the median over its log windows, the first left out (1000 x batch /
examples_per_s: the batches of an epoch's first 15,333 // batch steps are all full).
It also times the compiled train step alone, called back to back on one batch of the same
shape in this process: ``overhead_ms = loop_ms - step_ms`` is what the loop adds per step
(assembling and placing batches, dispatching, logging).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 50
TRAIN_PAIRS = 15_333  # the bundled sample's train split


def make_tiny_bert(folder: Path, tokenizer: str = "minilm-l6") -> Path:
    """A random 2-layer BERT classifier (hidden 32) as a Hugging Face folder with the tokenizer of
    ``tokenizer`` (a short model name or a folder: MiniLM's by default)."""
    import jax
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, BertConfig

    from flaxlora.loading import to_hf
    from flaxlora.loading.registry import resolve
    from flaxlora.models import init_params, sequence_classifier
    from flaxlora.models.auto import config_from_hf

    hf = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=512, num_labels=2)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    params = init_params(sequence_classifier(config_from_hf(hf.to_dict())), jax.random.key(0))
    save_file({k: v for k, v in to_hf(params).items()}, folder / "model.safetensors")
    source = Path(tokenizer) if Path(tokenizer).is_dir() else resolve(tokenizer)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def loop_ms(root: Path, model: Path, steps: int, batch: int, length: int, out: Path) -> float:
    """Median ms per step of the training loop of ``root``'s experiments/qqp.py over its log windows."""
    command = [sys.executable, str(root / "experiments" / "qqp.py"), "--model", str(model), "--preset", "lora",
               "--members", "1", "--max-steps", str(steps), "--batch-size", str(batch), "--max-length", str(length),
               "--buckets", str(length), "--log-every", str(LOG_EVERY), "--eval-every", "0", "--save-every", "0",
               "--eval-examples", "64", "--output-dir", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(command, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "split" not in r and r["step"] % LOG_EVERY == 0][1:]
    return statistics.median(1000 * batch / r["examples_per_s"] for r in windows)


def step_ms(model: Path, steps: int, batch_size: int, length: int) -> float:
    """Median ms of the compiled train step alone, called back to back on one (batch_size, length) batch."""
    import jax
    import numpy as np

    from flaxlora import training
    from flaxlora.data.batching import BATCH_DTYPES, TOKEN_KEYS
    from flaxlora.loading import load_pretrained
    from flaxlora.lora.optim import lora_optimizer
    from flaxlora.qqp.config import PRESETS

    run = PRESETS["lora"]
    pretrained = load_pretrained(model)
    mesh = training.make_mesh(None)
    tx = lora_optimizer(run.learning_rate)
    state, frozen = training.init_train_state(pretrained.params, run.lora, tx, jax.random.key(0), mesh)
    step, _ = training.jit_train_step(training.logits_fn(pretrained.model, run.lora), tx, mesh, state, frozen)
    batch = {k: np.ones((batch_size, length) if k in TOKEN_KEYS else (batch_size,), dtype)
             for k, dtype in BATCH_DTYPES.items()}
    batch = training.sharding.global_batch(batch, mesh)
    state, _ = step(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(steps // 5):
            state, _ = step(state, frozen, batch)
        jax.block_until_ready(state)
        times.append(1000 * (time.perf_counter() - started) / (steps // 5))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="loop_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="train steps per run (within the first epoch)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--length", type=int, default=32, help="tokens per pair (one bucket; longer pairs are truncated)")
    p.add_argument("--rounds", type=int, default=2, help="runs per source tree, alternating between the trees")
    p.add_argument("--tokenizer", default="minilm-l6", help="the tiny model's tokenizer: a short model name or a folder")
    p.add_argument("--vs-root", help="also measure the loop of the flaxlora source tree at this path")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if not 3 * LOG_EVERY <= args.steps <= TRAIN_PAIRS // args.batch:
        p.error(f"--steps must be in [{3 * LOG_EVERY}, {TRAIN_PAIRS // args.batch}]: two windows after the first, all "
                "within one epoch of full batches")
    roots = {"ours": ROOT} | ({"vs": Path(args.vs_root).resolve()} if args.vs_root else {})
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_bert(Path(tmp) / "tiny-bert", args.tokenizer)
        loops = {name: [] for name in roots}
        for round_ in range(args.rounds):
            for name, root in roots.items():
                loops[name].append(loop_ms(root, model, args.steps, args.batch, args.length, Path(tmp) / f"{name}-{round_}"))
        bare = step_ms(model, args.steps, args.batch, args.length)
    import jax

    result = {"device": jax.devices()[0].device_kind, "steps": args.steps, "batch": args.batch, "length": args.length,
              "step_ms": bare}
    for name, values in loops.items():
        result[name] = {"loop_ms": statistics.median(values), "loop_ms_runs": values,
                        "overhead_ms": statistics.median(values) - bare}
    if args.vs_root:
        result["vs_root"] = args.vs_root
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
