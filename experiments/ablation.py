"""Ablation of LoRA enhancements on QQP: every arm on the same backbone, data, split and step
budget, several seeds each, plus non-neural and prompting baselines.

    python experiments/ablation.py --model minilm-l6 --seeds 0 1 2 --max-steps 300 --output-dir runs/ablation-minilm

Each (arm, seed) runs in its own process (so its peak memory is its own) and writes
OUT/<arm>/seed<S>/results.json; finished runs are skipped, so an interrupted ablation resumes.
The table (mean +- std over seeds of held-out test accuracy, F1 and MCC, validation MCC,
trainable parameters, train time and peak RSS) is written as OUT/table.md, OUT/table.json (with
the exact command) and OUT/mcc.png. "Enhanced" candidates are compared on the validation split;
the test split is only reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flaxlora.lora.config import LoraConfig
from flaxlora.qqp.config import ALL_LINEAR_POOLER_TARGETS as ALL_LINEAR_POOLER
from flaxlora.qqp.config import ALL_LINEAR_TARGETS as ALL_LINEAR
from flaxlora.qqp.config import BITFIT, HEAD, RunConfig
from flaxlora.qqp.config import QV_TARGETS as QV
from qqp_runs import mean_std

# BitFit-style extras of the "extras" arm: every bias and norm, the pooler and the head.
EXTRAS = r"^(classifier|score|bert/pooler)/|/bias$|LayerNorm/|layernorm/|^model/norm/"

Arm = Callable[[RunConfig], RunConfig]


def lora(**changes) -> Arm:
    """An arm changing the plain-LoRA config (and, with ``run_``-prefixed keys, the run)."""
    run_changes = {k[4:]: v for k, v in changes.items() if k.startswith("run_")}
    lora_changes = {k: v for k, v in changes.items() if not k.startswith("run_")}
    return lambda run: run.replace(lora=run.lora.replace(**lora_changes), **run_changes)


# The enhanced preset (flaxlora.qqp.config.ENHANCED_LORA) as an arm.
COMBO_A = lora(targets=ALL_LINEAR_POOLER, scaling="rslora", trainable=BITFIT)

ARMS: dict[str, tuple[str, Arm]] = {
    "lora": ("plain LoRA (Hu et al.): q,v; r=8, alpha=16; head trained", lora()),
    "rslora": ("+ rsLoRA scaling alpha/sqrt(r)", lora(scaling="rslora")),
    "dora": ("+ DoRA (magnitude x direction)", lora(use_dora=True)),
    "loraplus": ("+ LoRA+ (lr of B = 16 x lr of A)", lora(run_loraplus_ratio=16.0)),
    "pissa": ("+ PiSSA init (principal singular vectors)", lora(init="pissa")),
    "olora": ("+ OLoRA init (QR)", lora(init="olora")),
    "all_linear": ("+ all linear layers (q,k,v,o,ffn), r=8", lora(targets=ALL_LINEAR)),
    "extras": ("+ biases, LayerNorms and pooler trained", lora(trainable=EXTRAS)),
    "rank_alloc": ("+ all linear, importance-allocated ranks (same total rank as q,v r=8)",
                   lambda run: lora(targets=ALL_LINEAR)(run).replace(rank_budget=qv_budget(run))),
    "label_smooth": ("+ label smoothing 0.1", lora(run_label_smoothing=0.1)),
    "lora_lr4x": ("plain LoRA at 4x the learning rate (a step-size control for the arms above)",
                  lambda run: run.replace(learning_rate=4 * run.learning_rate)),
    # Combinations of the arms that helped alone (chosen on validation MCC). The pooler is adapted
    # by LoRA rather than trained whole, to stay under 2% of the parameters.
    "combo_a": ("all linear + pooler + rsLoRA + BitFit (biases, LayerNorms, head)", COMBO_A),
    "combo_a_nf4": ("combo_a on a 4-bit NF4 frozen base (QLoRA)", lambda run: COMBO_A(run).replace(quantize="nf4")),
    "combo_b": ("combo_a + PiSSA", lambda run: lora(init="pissa")(COMBO_A(run))),
    "combo_c": ("combo_a + LoRA+ ratio 4", lambda run: lora(run_loraplus_ratio=4.0)(COMBO_A(run))),
    "head": ("head only (pooler + classifier)",
             lambda run: run.replace(lora=LoraConfig(targets=None, trainable=HEAD), learning_rate=2e-3)),
    "full": ("full fine-tuning", lambda run: run.replace(lora=LoraConfig(targets=None, trainable=".*"), learning_rate=1e-4)),
}


def qv_budget(run: RunConfig) -> int:
    """Plain LoRA's total rank: r times the number of q,v targets of ``run.model``."""
    from flaxlora.loading import load_pretrained
    from flaxlora.lora.targets import resolve_targets

    params = load_pretrained(run.model).params
    return run.lora.rank * len(resolve_targets(params, run.lora.replace(targets=QV)))


def run_one(name: str, seed: int, base: RunConfig, out: Path) -> None:
    """One arm and seed, in this process (so the peak RSS in its results.json is its own)."""
    from flaxlora.qqp.run import finetune

    results = finetune(ARMS[name][1](base).replace(seed=seed), out, progress=False)
    results["arm"] = name
    (out / "results.json").write_text(json.dumps(results, indent=2))


def baselines(base: RunConfig, prompt_pairs: int) -> dict[str, dict]:
    """Majority class and TF-IDF + logistic regression; for a decoder, also zero- and 4-shot
    prompting on a fair sample of ``prompt_pairs`` pairs of each split (``QQPSplit.sample``), read at the natural threshold
    (Yes > No) and at the margin threshold that maximises validation MCC ("calibrated")."""
    from flaxlora.loading import load_pretrained
    from flaxlora.qqp import baselines as b
    from flaxlora.qqp import prompting
    from flaxlora.qqp.data import load_qqp
    from flaxlora.qqp.run import labelled_splits

    labelled = labelled_splits(load_qqp(base.data_dir, from_hub=base.from_hub), base.eval_examples)
    train = labelled["train"]
    splits = {k: labelled[k] for k in ("validation", "test")}
    rows = {
        "majority": {k: b.majority_class(train, v) for k, v in splits.items()},
        "tfidf_logreg": b.tfidf_logreg(train, splits),
    }
    pretrained = load_pretrained(base.model)
    if pretrained.kind != "decoder":
        return rows
    for shots in (0, 4):
        demos = prompting.pick_demonstrations(train.question1, train.question2, train.labels, shots)
        margins, labels = {}, {}
        for name, split in splits.items():
            subset = split.sample(prompt_pairs)
            prompts = [prompting.chat_prompt(q1, q2, demos) for q1, q2 in zip(subset.question1, subset.question2)]
            margins[name] = prompting.yes_no_margin(pretrained, prompts)
            labels[name] = subset.labels
        candidates = np.unique(margins["validation"])
        best = max(candidates, key=lambda t: b.scores(labels["validation"], margins["validation"] >= t)["mcc"])
        for suffix, threshold in (("", 0.0), ("_calibrated", best)):
            rows[f"prompt_{shots}shot{suffix}"] = {
                name: {**b.scores(labels[name], (margins[name] >= threshold).astype(int)), "n": len(labels[name]),
                       "sampled": True}
                for name in splits
            }
    return rows


def table(out: Path, arms: list[str], seeds: list[int], extra_rows: dict[str, dict]) -> dict:
    rows = {}
    for name in arms:
        runs = [json.loads((out / name / f"seed{s}" / "results.json").read_text()) for s in seeds]
        rows[name] = {
            "description": ARMS[name][0],
            "seeds": seeds,
            **{f"test_{m}": mean_std([r["splits"]["test"][m] for r in runs]) for m in ("accuracy", "f1", "mcc")},
            "validation_mcc": mean_std([r["splits"]["validation"]["mcc"] for r in runs]),
            "trainable_params": runs[0]["trainable_params"],
            "trainable_percent": runs[0]["trainable_percent"],
            "train_seconds": mean_std([r["train_seconds"] for r in runs]),
            "peak_rss_MiB": max(r["peak_rss_MiB"] for r in runs),
            "steps": runs[0]["steps"],
        }
    return {"arms": rows, "baselines": extra_rows}


def markdown(result: dict) -> str:
    pm = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    lines = [
        "| arm | test accuracy | test F1 | test MCC | val MCC | trainable params (%) | train s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["arms"].items():
        lines.append(
            f"| {name}: {r['description']} | {pm(r['test_accuracy'])} | {pm(r['test_f1'])} | {pm(r['test_mcc'])} | "
            f"{pm(r['validation_mcc'])} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | "
            f"{r['train_seconds']['mean']:.0f} | {r['peak_rss_MiB']:.0f} |"
        )
    for name, r in result["baselines"].items():
        t = r["test"]
        # Tables made before QQPSplit.sample (no "sampled") used the first n pairs by id: a biased subset.
        subset = "" if "n" not in t else f", sample of {t['n']} pairs" if t.get("sampled") else f", first {t['n']} pairs"
        lines.append(f"| {name} (baseline{subset}) | {t['accuracy']:.4f} | {t['f1']:.4f} | {t['mcc']:.4f} | "
                     f"{r['validation']['mcc']:.4f} | 0 | | |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"]) + list(result["baselines"])
    means = [result["arms"][n]["test_mcc"]["mean"] if n in result["arms"] else result["baselines"][n]["test"]["mcc"] for n in names]
    stds = [result["arms"][n]["test_mcc"]["std"] if n in result["arms"] else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=["C0"] * len(result["arms"]) + ["C7"] * len(result["baselines"]))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("held-out test MCC (mean ± std over seeds)")
    lo = min(means) - 0.05
    ax.set_ylim(max(lo, 0), max(means) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--data-dir", help="QQP files (default: the bundled sample)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps per run, the same for every arm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--buckets", type=lambda t: tuple(int(x) for x in t.split(",")), help="static sequence lengths, e.g. 32,64")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="learning rate of the LoRA arms")
    p.add_argument("--eval-examples", type=int, help="evaluate on a fair sample of N pairs of validation and test (by a hash of the pair id; default all)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--prompt-pairs", type=int, default=300, help="pairs per split for the prompting baselines")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    base = RunConfig(model=args.model, data_dir=args.data_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                     max_length=args.max_length, buckets=args.buckets, learning_rate=args.learning_rate,
                     save_every=0, log_every=25, eval_batch_size=128, eval_examples=args.eval_examples)
    out = Path(args.output_dir)
    if args.one:
        name, seed = args.one
        run_one(name, int(seed), base, out / name / f"seed{seed}")
        return
    started = time.perf_counter()
    for name in args.arms:
        for seed in args.seeds:
            run_dir = out / name / f"seed{seed}"
            if (run_dir / "results.json").exists():
                continue
            if run_dir.exists():  # an interrupted run: start it again from scratch
                shutil.rmtree(run_dir)
            print(f"[{time.perf_counter() - started:7.0f} s] {name} seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name, str(seed)], check=True,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
    result = table(out, args.arms, args.seeds, baselines(base, args.prompt_pairs))
    result["command"] = "python experiments/ablation.py " + " ".join(sys.argv[1:])
    result["model"] = args.model
    (out / "table.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(markdown(result))
    plot(result, out / "mcc.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
