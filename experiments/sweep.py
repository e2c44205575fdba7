"""Hyperparameter search per method family, chosen on validation, finalists rerun over seeds.

    python experiments/sweep.py --output-dir runs/sweep --trials 12 --finalists 2 --seeds 0 1 2
    python experiments/sweep.py --output-dir runs/sweep-quick --trials 4 --extra "--max-steps 150"

Each family (``enhanced``: LoRA knobs; ``full``: full fine-tuning's own knobs) gets the same number
of trials, drawn at random from its space (:data:`SPACES`; trial i of a family is the same draw on
every invocation, from --search-seed); a LoRA draw that would train more than
--max-trainable-percent of the parameters (default 2) is drawn again. A trial is one `experiments/qqp.py` command (seed 0, one adapter: `--members 1`) in its
own process, into OUT/<family>-<i>/; finished trials are skipped, so the sweep resumes. Trials are
ranked by **validation** MCC only; each family's best --finalists are rerun with the other
--seeds, and the family's winner is the finalist with the best mean validation MCC. Test figures
are reported, never used to choose. Writes OUT/sweep.json (every trial's flags and figures, the
finalists' means and standard deviations, the command), OUT/sweep.md and OUT/sweep.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from qqp_runs import mean_std, run_qqp



@dataclasses.dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.3g}")


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def draw(self, rng: np.random.Generator) -> Any:
        return self.values[rng.integers(len(self.values))]


# What matters for each family at this budget, as qqp.py flags (None or False: the flag is left
# out). "targets": the preset's (every linear layer) or only query and value, where larger ranks
# fit under the trainable cap; "rank-budget": importance-allocated total rank, as a multiple of
# the uniform total (rank x the number of targets).
SPACES: dict[str, dict[str, Any]] = {
    "enhanced": {
        "learning-rate": LogUniform(1e-4, 2e-3),
        "targets": Choice(("all", "qv")),
        "rank": Choice((8, 16, 32, 64)),  # with the preset's rsLoRA scaling alpha / sqrt(r)
        "alpha": Choice((8.0, 16.0, 32.0)),
        "epochs": Choice((2, 3, 4)),
        "loraplus-ratio": Choice((1.0, 4.0, 16.0)),
        "dora": Choice((False, True)),
        "lora-dropout": Choice((0.0, 0.05, 0.1)),
        "rank-budget": Choice((None, 0.25, 0.5, 1.0)),
        "warmup-ratio": Choice((0.0, 0.06, 0.1)),
    },
    "full": {
        "learning-rate": LogUniform(1e-5, 2e-4),
        "epochs": Choice((2, 3, 4)),
        "warmup-ratio": Choice((0.0, 0.06, 0.1)),
    },
}
ADAPTED = ("enhanced",)  # families whose trials must stay under --max-trainable-percent


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What the sweep needs to know of a model to price a LoRA trial before running it."""

    params: int  # of the classifier, adapters excluded
    extras: int  # trained in full by the enhanced preset (biases, norms, head)
    fans: dict[str, tuple[int, ...]]  # per target set: fan-in + fan-out of each target

    def trainable_percent(self, trial: dict[str, Any]) -> float:
        """The trial's trainable share: adapters of rank r on each target (or its rank budget
        spread at the mean fan) plus the extras, over all parameters."""
        fans = self.fans[trial["targets"]]
        total_rank = trial["rank"] * len(fans) * (trial["rank-budget"] or 1.0)
        adapters = total_rank * sum(fans) / len(fans)
        return 100 * (adapters + self.extras) / (self.params + adapters)


def backbone(model: str) -> Backbone:
    from flaxlora import pytree
    from flaxlora.loading import load_pretrained
    from flaxlora.lora.adapters import trainable_params
    from flaxlora.lora.targets import resolve_targets
    from flaxlora.qqp.config import PRESETS, QV_TARGETS

    params = load_pretrained(model, num_labels=2).params
    lora = PRESETS["enhanced"].lora
    sizes = lambda tree: sum(x.size for x in pytree.flatten(tree).values())  # noqa: E731
    fans = {name: tuple(sum(pytree.flatten(params)[p].shape) for p in resolve_targets(params, config))
            for name, config in (("all", lora), ("qv", lora.replace(targets=QV_TARGETS)))}
    return Backbone(sizes(params), sizes(trainable_params(params, lora)), fans)


def draw_trial(family: str, index: int, search_seed: int, allowed=lambda trial: True) -> dict[str, Any]:
    """Trial ``index`` of ``family``: one value per knob, the same on every invocation; drawn
    again (a fixed sequence of draws) until ``allowed``."""
    for attempt in range(10_000):
        rng = np.random.default_rng([search_seed, index, sorted(SPACES).index(family), attempt])
        trial = {knob: space.draw(rng) for knob, space in SPACES[family].items()}
        if allowed(trial):
            return trial
    raise ValueError(f"no {family} trial within the limits in 10,000 draws: raise --max-trainable-percent")


def trial_flags(family: str, trial: dict[str, Any], targets: dict[str, int] | None = None) -> list[str]:
    """qqp.py flags of a trial (``targets``: the number of kernels of each target set, for a rank budget)."""
    from flaxlora.qqp.config import QV_TARGETS

    flags = ["--preset", family, *(["--members", "1"] if family in ADAPTED else [])]  # a trial: one adapter
    for knob, value in trial.items():
        if value is None or value is False or (knob == "targets" and value == "all"):
            continue
        if knob == "targets":
            value = QV_TARGETS
        if knob == "rank-budget":
            value = round(value * trial["rank"] * targets[trial["targets"]])
        flags += [f"--{knob}"] if value is True else [f"--{knob}", f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def figures(results: dict[str, Any]) -> dict[str, float]:
    splits = results["splits"]
    return {"validation_mcc": splits["validation"]["mcc"], "test_mcc": splits["test"]["mcc"],
            "test_accuracy": splits["test"]["accuracy"], "test_f1": splits["test"]["f1"],
            "train_seconds": results["train_seconds"], "trainable_percent": results["trainable_percent"]}


def choose(trials: list[dict[str, Any]], finalists: int) -> list[dict[str, Any]]:
    """The ``finalists`` trials of best validation MCC (ties: the earlier trial)."""
    return sorted(trials, key=lambda t: (-t["figures"]["validation_mcc"], t["index"]))[:finalists]


def finalist_summary(trial: dict[str, Any], runs: list[dict[str, float]], seeds: list[int]) -> dict[str, Any]:
    return {"trial": trial["name"], "flags": trial["flags"], "seeds": seeds,
            **{k: mean_std([r[k] for r in runs]) for k in runs[0]}}


def markdown(result: dict[str, Any]) -> str:
    pm = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    lines = ["| family | finalist (qqp.py flags) | seeds | val MCC | test MCC | test accuracy | test F1 | trainable | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family, r in result["families"].items():
        for f in r["finalists"]:
            mark = " **(winner)**" if f["trial"] == r["winner"] else ""
            lines.append(f"| {family} | {f['trial']}{mark}: `{shlex.join(f['flags'])}` | {len(f['seeds'])} | "
                         f"{pm(f['validation_mcc'])} | {pm(f['test_mcc'])} | {pm(f['test_accuracy'])} | {pm(f['test_f1'])} | "
                         f"{f['trainable_percent']['mean']:.2f}% | {f['train_seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for k, (family, r) in enumerate(result["families"].items()):
        val = [t["figures"]["validation_mcc"] for t in r["trials"]]
        ax.scatter([k + 0.1 * (i - len(val) / 2) / max(len(val), 1) for i in range(len(val))], val, label=f"{family} trials")
        for f in r["finalists"]:
            ax.errorbar([k + 0.3], [f["validation_mcc"]["mean"]], yerr=[f["validation_mcc"]["std"]], fmt="k_", capsize=4)
    ax.set_xticks(range(len(result["families"])), list(result["families"]))
    ax.set_ylabel("validation MCC (trials; finalists: mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--families", nargs="+", choices=sorted(SPACES), default=sorted(SPACES))
    p.add_argument("--trials", type=int, default=12, help="trials per family (the same search budget for each)")
    p.add_argument("--finalists", type=int, default=2, help="best trials per family rerun with every seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first is the trials' seed")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random draws of the trials")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--max-trainable-percent", type=float, default=2.0,
                   help="LoRA trials train at most this share of the parameters (drawn again before running, "
                        "and not chosen if the run reports more)")
    p.add_argument("--extra", default="", help="qqp.py flags for every run (e.g. '--max-steps 150 --data-dir D')")
    args = p.parse_args(argv)
    if min(args.trials, args.finalists) < 1 or args.finalists > args.trials:
        p.error("--trials and --finalists must be >= 1, --finalists <= --trials")
    out, extra = Path(args.output_dir), ["--model", args.model, *shlex.split(args.extra)]
    model = backbone(args.model) if set(args.families) & set(ADAPTED) else None
    targets = {name: len(fans) for name, fans in model.fans.items()} if model else None
    result: dict[str, Any] = {"command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "families": {}}
    for family in args.families:
        trials = []
        for i in range(args.trials):
            allowed = (lambda t: model.trainable_percent(t) <= args.max_trainable_percent) if family in ADAPTED else (
                lambda t: True)
            drawn = draw_trial(family, i, args.search_seed, allowed)
            flags = trial_flags(family, drawn, targets)
            name = f"{family}-{i}"
            trials.append({"name": name, "index": i, "drawn": drawn, "flags": flags,
                           "figures": figures(run_qqp([*flags, *extra], args.seeds[0], out / name))})
        finalists = []
        eligible = [t for t in trials if family not in ADAPTED
                    or t["figures"]["trainable_percent"] <= args.max_trainable_percent]
        for trial in choose(eligible, args.finalists):
            runs = [trial["figures"]] + [figures(run_qqp([*trial["flags"], *extra], s, out / f"{trial['name']}-s{s}"))
                                         for s in args.seeds[1:]]
            finalists.append(finalist_summary(trial, runs, args.seeds))
        winner = max(finalists, key=lambda f: f["validation_mcc"]["mean"])["trial"]
        result["families"][family] = {"trials": trials, "finalists": finalists, "winner": winner}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sweep.md").write_text(markdown(result))
    plot(result, out / "sweep.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
