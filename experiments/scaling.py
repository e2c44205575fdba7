"""Scaling curves: step time and peak memory of lora, enhanced and full fine-tuning against sequence
length, batch size, LoRA rank and target set, on MiniLM and SmolLM2. One command:

    python experiments/scaling.py --out experiments/results/scaling

Each point is one ``experiments/bench.py`` measurement (our side only, its own process, so the
peak RSS is the point's own): median train step after a warm-up, on real QQP pairs padded to the
length. Writes OUT/scaling.json, OUT/scaling.md (the table in experiments/README.md) and OUT/scaling.png.
``--quick`` measures a smaller grid. Points already in OUT/scaling.json are kept, not measured
again, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench

PRESETS = ("lora", "enhanced", "full")
# (model, base batch, base length, lengths, batches, ranks)
GRIDS = {
    "minilm-l6": (16, 64, (32, 64, 128, 256), (8, 32), (4, 64)),
    "smollm2-135m": (8, 64, (32, 64, 128), (4, 16), (4, 64)),
}
QUICK = {"minilm-l6": (16, 64, (32, 64, 128), (8,), (64,)), "smollm2-135m": (8, 32, (32, 64), (), (64,))}
# Deep models are measured with --scan-layers (one compiled layer: experiments/README.md "Compile and start-up"); unrolled, the
# SmolLM2 step's compile takes minutes and its peak RSS would be the compiler's, not the step's.
SCANNED = {"smollm2-135m"}
KEY = ("model", "preset", "axis", "batch", "seq_len", "rank", "targets", "scan_layers")


def points(grids: dict) -> list[dict]:
    """The sweep: each axis varied around the base point (batch, length, rank 8, the preset's targets)."""
    out = []
    for model, (batch, length, lengths, batches, ranks) in grids.items():
        base = dict(model=model, batch=batch, seq_len=length, rank=None, targets="preset", scan_layers=model in SCANNED)
        for preset in PRESETS:
            out += [dict(base, preset=preset, seq_len=s, axis="seq_len") for s in lengths]
            out += [dict(base, preset=preset, batch=b, axis="batch") for b in batches if b != batch]
            if preset != "full":
                out += [dict(base, preset=preset, rank=r, axis="rank") for r in ranks]
        out.append(dict(base, preset="lora", targets="all", axis="targets"))  # vs lora's q,v at the base point
    return out


def measure(point: dict, steps: int) -> dict:
    r = bench.measure_ours(**{k: point[k] for k in ("model", "preset", "batch", "seq_len", "targets", "rank", "scan_layers")},
                           steps=steps, warmup=1, rounds=1, eval_batches=0)
    return {**point, "train_step_s": r["train_step_s"], "peak_rss_mb": r["peak_rss_mb"],
            "tokens_per_s": point["batch"] * point["seq_len"] / r["train_step_s"],
            "trainable_params": r["trainable_params"], "gflops_per_s": r["flops_per_s"] / 1e9,
            "compiles_after_warmup": r["compiles_after_warmup"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | preset | axis | batch | length | rank | targets | step s | tokens/s | GFLOP/s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rank = "-" if r["preset"] == "full" else (r["rank"] or 8)
        targets = "-" if r["preset"] == "full" else {"preset": "preset's", "qv": "q,v", "all": "all linear"}[r["targets"]]
        layers = "scanned" if r.get("scan_layers") else "unrolled"
        lines.append(f"| {r['model']} | {layers} | {r['preset']} | {r['axis']} | {r['batch']} | {r['seq_len']} | {rank} | "
                     f"{targets} | {r['train_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    axes_names = ("seq_len", "batch", "rank")
    fig, grid = plt.subplots(2 * len(models), len(axes_names), figsize=(13, 4.2 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        for a, axis in enumerate(axes_names):
            for preset in PRESETS:
                mine = [r for r in rows if r["model"] == model and r["preset"] == preset]
                pts = [r for r in mine if r["axis"] == axis]
                if pts and axis != "seq_len":  # and the base point, from the length axis
                    pts += [r for r in mine if r["axis"] == "seq_len" and r["seq_len"] == pts[0]["seq_len"]]
                pts = sorted((r[axis] or 8, r) for r in pts)
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                grid[2 * m, a].plot(xs, [r["train_step_s"] for _, r in pts], "o-", label=preset)
                grid[2 * m + 1, a].plot(xs, [r["peak_rss_mb"] for _, r in pts], "o-", label=preset)
            for row, ylabel in ((2 * m, "step s"), (2 * m + 1, "peak RSS MiB")):
                ax = grid[row, a]
                ax.set_xscale("log", base=2)
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{model}: {ylabel} vs {axis}", fontsize=9)
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/scaling")
    p.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up step)")
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "scaling.json"
    done = {tuple(r[k] for k in KEY): r for r in json.loads(saved.read_text())["points"]} if saved.exists() else {}
    rows = []
    for point in points(QUICK if args.quick else GRIDS):
        key = tuple(point[k] for k in KEY)
        rows.append(done.get(key) or measure(point, args.steps))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        saved.write_text(json.dumps({"cores": bench.cores(), "steps": args.steps, "points": rows}, indent=2))
    (out / "scaling.md").write_text(markdown(rows))
    plot(rows, out / "scaling.png")


if __name__ == "__main__":
    main()
