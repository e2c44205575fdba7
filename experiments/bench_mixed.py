"""Throughput of mixed-adapter batches: N adapters x R rows scored in one call of
``flaxlora.restore_many(...).logits`` against each adapter's rows scored in a call of its own, in
one process on one machine; and the two ways of running a mixed batch, per-row gather (kept in
:mod:`flaxlora.lora.mixed`) against grouped (rows sorted into an adapters x capacity grid).

    python experiments/bench_mixed.py --out experiments/results/serve/mixed-cpu.json
    python experiments/bench_mixed.py --model /models/all-MiniLM-L6-v2 --out /tmp/mixed-gpu.json   # a GPU
    python experiments/bench_mixed.py --tiny --out /tmp/mixed-tiny.json                           # dry run, ~1 min CPU

The adapters are untrained, with random non-zero factors (experiments/random_adapters.py): the
speed of a forward does not depend on what an adapter learned. The pairs are real QQP questions
(the bundled sample) whose tokens fit one bucket, so that no call pads rows to another length.
Every mixed result is checked against ``flaxlora.restore(run)`` of its adapter (within 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling helpers

import flaxlora  # noqa: E402
from flaxlora.data.tokenize import encode_pairs  # noqa: E402
from flaxlora.loading import load_pretrained  # noqa: E402
from flaxlora.lora import mixed  # noqa: E402
from flaxlora.qqp.data import load_qqp  # noqa: E402
from flaxlora.qqp.many import MultiPredictor  # noqa: E402
from random_adapters import random_runs, variant_names  # noqa: E402

TOLERANCE = 1e-5


def pairs_of_one_bucket(tokenizer, n: int, lo: int, hi: int, pair_format: str, max_length: int) -> tuple[list, list]:
    """``n`` bundled QQP pairs whose token count is in (lo, hi]."""
    data = load_qqp(None)["train"]
    q1s, q2s = list(data.question1[: 20 * n]), list(data.question2[: 20 * n])
    lengths = encode_pairs(tokenizer, q1s, q2s, max_length, pair_format=pair_format, use_cache=False).lengths
    keep = np.flatnonzero((lengths > lo) & (lengths <= hi))[:n]
    if len(keep) < n:
        raise SystemExit(f"only {len(keep)} bundled pairs have {lo} < tokens <= {hi}; ask for fewer")
    return [q1s[i] for i in keep], [q2s[i] for i in keep]


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """``{name: (fastest seconds, last result)}`` of each function over ``repeats`` rounds after a
    warm-up call. A round calls every function once, in an order rotated each round, so that a
    change in the machine's load falls on all of them alike; the fastest of the rounds is the
    estimate least disturbed by other processes (they only ever add time)."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), results[name]) for name in fns}


def grouped_forward(many):
    """The other candidate: rows sorted by adapter into a (groups, capacity) grid, the forward
    vmapped over groups, each group's rows a plain batch under its adapter's tree."""

    def forward(params, stacked, group_ids, input_ids, attention_mask, token_type_ids):
        forms = jax.tree.map(lambda x: jnp.take(x, group_ids, axis=0), stacked)
        apply = lambda form, *batch: mixed.apply_served(many.model, params, form, *batch, deterministic=True)  # noqa: E731
        return jax.vmap(apply)(forms, input_ids, attention_mask, token_type_ids)

    return jax.jit(forward)


def padded_rows(encoded, rows: np.ndarray, length: int) -> tuple:
    batch = encoded.pad(rows, length)
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def forward_only(many, restored: dict, encoded, ids: np.ndarray, length: int, repeats: int,
                 separate: bool = True) -> dict:
    """Forward-only seconds (inputs tokenised and padded beforehand) of one mixed batch: per-row
    gather against the grouped grid (capacity: the largest group) and, with ``separate``, against
    each adapter's rows in a forward of their own (the same factored forward, and restore's merged one)."""
    rows = padded_rows(encoded, np.arange(len(ids)), length)
    gather = lambda: np.asarray(many._forward(many.params, many.stacked, ids, *rows))  # noqa: E731
    groups = np.unique(ids)
    capacity = max(int(np.sum(ids == g)) for g in groups)
    order = [np.resize(np.flatnonzero(ids == g), capacity) for g in groups]
    grid = [np.stack([x[o] for o in order]) for x in rows]
    grouped_fn = grouped_forward(many)
    grouped = lambda: np.asarray(grouped_fn(many.params, many.stacked, groups.astype(np.int32), *grid))  # noqa: E731
    fns = {"gather": gather, "grouped": grouped}
    if separate:
        parts = {g: (np.flatnonzero(ids == g), padded_rows(encoded, np.flatnonzero(ids == g), length)) for g in groups}
        names = list(restored)
        fns["separate_same"] = lambda: [np.asarray(many._forward(many.params, many.stacked, ids[r], *x))
                                        for r, x in parts.values()]
        fns["separate_merged"] = lambda: [np.asarray(restored[names[g]]._forward(restored[names[g]].params, *x))
                                          for g, (_, x) in parts.items()]
    timings = timed(fns, repeats)
    (t_gather, out_gather), (t_grouped, out_grouped) = timings["gather"], timings["grouped"]
    back = np.zeros_like(out_gather)
    for g, o in enumerate(order):
        back[o] = out_grouped[g]
    result = {"rows": len(ids), "grouped_rows_computed": len(groups) * capacity, "repeats": repeats,
              "gather_s": t_gather, "grouped_s": t_grouped, "grouped_over_gather": t_grouped / t_gather,
              "max_abs_diff_gather_vs_grouped": float(np.abs(out_gather - back).max())}
    if separate:
        result["separate_same_forward_s"] = timings["separate_same"][0]
        result["separate_merged_forward_s"] = timings["separate_merged"][0]
        result["speedup_vs_separate_same_forward"] = result["separate_same_forward_s"] / t_gather
        result["speedup_vs_separate_merged_forward"] = result["separate_merged_forward_s"] / t_gather
    return result


def markdown(result: dict) -> str:
    """The result as the table the .md beside the JSON holds."""
    e2e, balanced, skewed = result["end_to_end"], result["forward_only_balanced"], result["forward_only_skewed"]
    n, r = result["adapters"], result["rows_per_adapter"]
    padded = next(v for k, v in e2e.items() if k.startswith("separate_restore_batch_"))
    sections = {
        "end to end (tokenising included)": [
            (f"mixed: {n} adapters x {r} rows in one call of restore_many(...).logits", e2e["mixed_s"]),
            (f"the same mixed rows, {r} per forward", e2e[f"mixed_in_batches_of_{r}_s"]),
            (f"each adapter's rows in its own call of restore(run, batch_size={r}) (merged weights)",
             e2e["separate_restore_s"]),
            ("each adapter's rows in its own call of restore(run) (default batch size 64: rows padded)", padded),
            ("each adapter's rows in its own call of restore_many(...).logits", e2e["separate_same_predictor_s"]),
        ],
        "forward only (inputs tokenised and padded beforehand)": [
            (f"mixed, per-row gather (kept): {balanced['rows']} rows", balanced["gather_s"]),
            (f"mixed, grouped: adapters x largest group ({balanced['grouped_rows_computed']} rows)", balanced["grouped_s"]),
            (f"each adapter's {r} rows in a forward of their own (the same factored forward)",
             balanced["separate_same_forward_s"]),
            (f"each adapter's {r} rows in a forward of their own (restore's merged weights)",
             balanced["separate_merged_forward_s"]),
        ],
        f"forward only, skewed batch (one adapter {skewed['rows'] - n + 1} rows, {n - 1} one row each)": [
            ("mixed, per-row gather (kept)", skewed["gather_s"]),
            (f"mixed, grouped ({skewed['grouped_rows_computed']} rows computed)", skewed["grouped_s"]),
        ],
    }
    lines = [f"`{result['command']}`", "",
             f"{result['model']}, {n} adapters ({', '.join(result['adapter_kinds'])}; {result['adapters_are']}), "
             f"{result['pairs']}; {result['backend']} ({result['device']}, {result['cpu_count']} CPUs), jax "
             f"{result['jax']}; fastest of {result['repeats']} rounds; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_1_5_15_min_at_end'])}. Mixed logits vs each "
             f"adapter's own restore: max abs diff {result['max_abs_diff_vs_restore']:.1e} (two adapters differ by "
             f"{result['max_abs_diff_between_two_adapters']:.2f}).", "",
             "| what | seconds | ÷ the section's first row (> 1: the mixed batch is faster) |", "| --- | ---: | ---: |"]
    for section, rows in sections.items():
        lines.append(f"| **{section}** | | |")
        lines += [f"| {label} | {seconds:.3f} | {seconds / rows[0][1]:.2f} |" for label, seconds in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6", help="short name or local Hugging Face folder of a BERT-family model")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rows", type=int, default=16, help="pairs per adapter")
    p.add_argument("--bucket", type=int, default=32, help="the pairs' bucket: lo < tokens <= bucket, lo the bucket below")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (the fastest is reported)")
    p.add_argument("--max-length", type=int, default=128, help="the adapters' runs' max_length (default 128)")
    p.add_argument("--runs-dir", help="where the random adapters are written (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="dry run: 3 adapters x 4 rows, bucket 32, 1 repeat")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.adapters, args.rows, args.bucket, args.repeats = 3, 4, 32, 1
    started = time.perf_counter()
    folder = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-mixed-"))
    pretrained = load_pretrained(args.model, num_labels=2)
    runs = random_runs(pretrained, args.model, args.adapters, folder, args.max_length)
    total = args.adapters * args.rows
    many = flaxlora.restore_many(runs, batch_sizes=tuple(sorted({args.rows, total})))  # no padded rows
    buckets = many.buckets
    if args.bucket not in buckets:
        raise SystemExit(f"--bucket {args.bucket} is not one of the runs' buckets {buckets}")
    lo = ([0, *buckets])[buckets.index(args.bucket)]
    q1s, q2s = pairs_of_one_bucket(many.tokenizer, total, lo, args.bucket, many.pair_format, many.max_length)
    names = [name for name in runs for _ in range(args.rows)]
    order = np.random.default_rng(0).permutation(total)  # the adapters interleaved, as requests arrive
    q1s, q2s, names = [q1s[i] for i in order], [q2s[i] for i in order], [names[i] for i in order]
    mine = {name: [i for i, n in enumerate(names) if n == name] for name in runs}
    setup_s = time.perf_counter() - started

    restored = {name: flaxlora.restore(run, batch_size=args.rows) for name, run in runs.items()}
    padded = {name: flaxlora.restore(run) for name, run in runs.items()}  # restore's default batch size

    def separate(predictors):
        return {name: predictors[name].logits([q1s[i] for i in rows], [q2s[i] for i in rows])
                for name, rows in mine.items()}

    small = MultiPredictor(many.model, many.params, many.stacked, many.members, many.tokenizer, many.pair_format,
                           many.max_length, many.buckets, batch_sizes=(args.rows,))  # mixed rows, R per forward
    timings = timed({
        "mixed": lambda: many.logits(q1s, q2s, adapter=names),
        "mixed_small_batches": lambda: small.logits(q1s, q2s, adapter=names),
        "separate_restore": lambda: separate(restored),
        "separate_restore_default": lambda: separate(padded),
        "separate_same_predictor": lambda: [many.logits([q1s[i] for i in rows], [q2s[i] for i in rows], adapter=name)
                                            for name, rows in mine.items()],
    }, args.repeats)
    (t_mixed, mixed_logits), (t_restored, singles) = timings["mixed"], timings["separate_restore"]
    t_padded, t_many_separate = timings["separate_restore_default"][0], timings["separate_same_predictor"][0]
    diffs = {name: float(np.abs(mixed_logits[rows] - singles[name]).max()) for name, rows in mine.items()}
    first, second = list(runs)[:2]
    spread = float(np.abs(singles[first] - many.logits([q1s[i] for i in mine[first]], [q2s[i] for i in mine[first]],
                                                       adapter=second)).max())
    encoded = many.encode(q1s, q2s)
    ids = np.asarray([list(runs).index(n) for n in names], np.int32)
    skewed = np.zeros(total, np.int32)  # one adapter with most rows, each other with one
    skewed[: args.adapters - 1] = np.arange(1, args.adapters)
    result = {
        "command": "python experiments/bench_mixed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "adapters": args.adapters, "adapter_kinds": variant_names(args.adapters), "rows_per_adapter": args.rows,
        "pairs": "bundled QQP sample (flaxlora/qqp/qqp_sample), train split, "
                 f"{lo} < tokens <= {args.bucket}, first {total} such pairs, adapters interleaved",
        "adapters_are": "untrained: random non-zero b and extras (experiments/random_adapters.py)",
        "repeats": args.repeats,
        "end_to_end": {  # tokenisation included, as a caller of .logits sees it
            "mixed_s": t_mixed,
            "separate_restore_s": t_restored,
            f"separate_restore_batch_{padded[first].batch_size}_s": t_padded,
            "separate_same_predictor_s": t_many_separate,
            f"mixed_in_batches_of_{args.rows}_s": timings["mixed_small_batches"][0],
            "mixed_pairs_per_s": total / t_mixed,
            "speedup_vs_separate_restore": t_restored / t_mixed,
            f"speedup_vs_separate_restore_batch_{padded[first].batch_size}": t_padded / t_mixed,
            "speedup_vs_separate_same_predictor": t_many_separate / t_mixed,
        },
        "max_abs_diff_vs_restore": max(diffs.values()), "tolerance": TOLERANCE,
        "max_abs_diff_between_two_adapters": spread,
        "forward_only_balanced": forward_only(many, restored, encoded, ids, args.bucket, args.repeats),
        # the grouped grid of a skewed batch computes adapters x its largest group: one round is enough
        "forward_only_skewed": forward_only(many, restored, encoded, skewed, args.bucket, 1, separate=False),
        "setup_s": setup_s, "wall_s": time.perf_counter() - started,
        "load_average_1_5_15_min_at_end": os.getloadavg(),  # other processes on this machine meanwhile
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("adapter_kinds",)}, indent=1))
    if result["max_abs_diff_vs_restore"] > TOLERANCE:
        raise SystemExit(f"mixed logits differ from restore by {result['max_abs_diff_vs_restore']:.2e} > {TOLERANCE}")
    return result


if __name__ == "__main__":
    main()
