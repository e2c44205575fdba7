"""One check of flaxlora on an accelerator: the default run end to end, cold and warm, and the
benchmarks against PEFT, in one command that needs nothing from the network (about 8 minutes on
one H200).

    python experiments/accelerator_check.py --model /models/all-MiniLM-L6-v2 --out OUT
    python experiments/accelerator_check.py --tiny --out OUT          # a dry run on a CPU at tiny sizes
    python experiments/accelerator_check.py ... --steps default-cold,bench-minilm   # some steps only

Steps, in this order, each in its own process under a time limit, its output in OUT/<step>.log:

    default-cold   experiments/qqp.py --model MODEL (the default preset) with an empty compilation
                   cache: wall, compile seconds and programs, train steps/s, validation and test MCC
    default-warm   the same run again, the cache warm, and the steady loop under
                   jax.transfer_guard_device_to_host("disallow_explicit") (FLAXLORA_STEADY_LOOP_GUARD):
                   it fails if the loop reads a device value outside its log, evaluation and save steps
    bench-minilm   experiments/bench.py: MODEL, batch 32 x 128 tokens, fp32, --preset lora and
                   enhanced, ours against PEFT on the same device (peak memory, MFU)
    memory         experiments/memory_check.sh: a random 1.07B Llama, LoRA q,v r=8, B8 S512 bf16,
                   ours (fp32 and bf16 storage, --remat full, NF4, --scan-layers) against PEFT,
                   with XLA's memory account and the memory model's error
    serve-mixed    experiments/bench_mixed.py: 8 adapters x 16 rows mixed in one call against
                   each adapter's own calls
    default-members the default run as a two-adapter ensemble trained in one step (--members 2)
    loop-overhead  experiments/loop_overhead.py: the loop's cost per step on a tiny random BERT

OUT/summary.json gathers each step's figures (written after every step, so a step that runs
out of time leaves the others') and OUT/summary.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("default-cold", "default-warm", "bench-minilm", "memory", "serve-mixed", "default-members", "loop-overhead")
# Seconds each step may take at full size (tiny, on a CPU: 600).
LIMITS = {"default-cold": 200, "default-warm": 100, "bench-minilm": 120, "memory": 240, "serve-mixed": 150,
          "default-members": 150, "loop-overhead": 100}


def commands(step: str, model: str, out: Path, tiny: bool) -> tuple[list[str], dict[str, str]]:
    """(command, extra environment) of ``step``."""
    python = sys.executable
    runs = out / "runs"
    if step.startswith("default"):
        short = ["--max-steps", "6", "--eval-examples", "32", "--eval-every", "0"] if tiny else []
        env = {"FLAXLORA_STEADY_LOOP_GUARD": "disallow_explicit"} if step == "default-warm" else {}
        members = ["--members", "2"] if step == "default-members" else []
        return ([python, "experiments/qqp.py", "--model", model, "--output-dir", str(runs / step), "--quiet",
                 "--compilation-cache", str(out / "jax-cache"), *short, *members], env)
    if step == "bench-minilm":
        size = ["--batch", "4", "--seq-len", "16", "--steps", "1", "--rounds", "1", "--warmup", "1"] if tiny else \
               ["--batch", "32", "--seq-len", "128", "--steps", "10", "--rounds", "2"]
        return ([python, "experiments/bench.py", "--model", model, "--preset", "lora", "--dtype", "float32", *size,
                 "--eval-batches", "1", "--peer", "peft", "--peer-device", "cpu" if tiny else "cuda",
                 "--variant=--preset enhanced", "--json", str(out / "bench-minilm.json")],
                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if step == "memory":
        return (["bash", "experiments/memory_check.sh", str(out / "memory"), *(["--tiny"] if tiny else [])],
                {"PYTHON": python})
    if step == "serve-mixed":
        return ([python, "experiments/bench_mixed.py", "--model", model, "--runs-dir", str(runs / "serve"),
                 "--out", str(out / "serve-mixed.json"), *(["--tiny"] if tiny else ["--repeats", "20"])],
                {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if step == "loop-overhead":
        return ([python, "experiments/loop_overhead.py", "--tokenizer", model, "--rounds", "1",
                 "--steps", "150" if tiny else "300", "--json", str(out / "loop-overhead.json")], {})
    raise ValueError(step)


def figures(step: str, out: Path) -> dict:
    """The step's figures, read from what it wrote."""
    if step.startswith("default"):
        r = json.loads((out / "runs" / step / "results.json").read_text())
        keys = ("wall_seconds", "train_seconds", "compile_seconds", "programs", "compiles", "compiles_from_cache",
                "steps", "train_tokens_per_s", "devices")
        return {**{k: r[k] for k in keys}, "steps_per_s": r["steps"] / r["train_seconds"],
                "test_mcc": r["splits"].get("test", {}).get("mcc"), "validation_mcc": r["splits"]["validation"]["mcc"]}
    if step == "bench-minilm":
        return json.loads((out / "bench-minilm.json").read_text())
    if step == "memory":
        return {"bench": json.loads((out / "memory" / "bench.json").read_text()),
                "memory_model": json.loads((out / "memory" / "memory_model_check.json").read_text())}
    return json.loads((out / f"{step}.json").read_text())


def markdown(summary: dict) -> str:
    lines = [f"# Accelerator check: {summary.get('device', '?')}", "", f"Command: `{summary['command']}`", "",
             "| step | status | seconds | figures |", "| --- | --- | --- | --- |"]
    for step, s in summary["steps"].items():
        brief = ""
        if step.startswith("default") and "figures" in s:
            f = s["figures"]
            brief = (f"wall {f['wall_seconds']:.1f} s, compile {f['compile_seconds']:.1f} s ({f['programs']} programs, "
                     f"{f['compiles_from_cache']} from the cache), {f['steps_per_s']:.1f} steps/s, "
                     f"test MCC {float('nan') if f['test_mcc'] is None else f['test_mcc']:.4f}")
        lines.append(f"| {step} | {s['status']} | {s['seconds']:.0f} | {brief} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="accelerator_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local folder of all-MiniLM-L6-v2 (fp32 safetensors); --tiny: a random tiny BERT")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, PEFT on the CPU: a dry run of every command")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--out", required=True, help="folder for the logs, JSON files and summary")
    args = p.parse_args(argv)
    steps = args.steps.split(",")
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if not args.tiny and not args.model:
        p.error("--model FOLDER (all-MiniLM-L6-v2) is needed, except with --tiny")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(ROOT / "experiments"))
        from loop_overhead import make_tiny_bert

        model = str(make_tiny_bert(out / "tiny-bert"))
    summary = {"command": " ".join(["python experiments/accelerator_check.py", *(argv or sys.argv[1:])]), "steps": {}}
    for step in steps:
        command, env = commands(step, model, out, args.tiny)
        limit = 600 if args.tiny else LIMITS[step]
        started = time.perf_counter()
        with (out / f"{step}.log").open("w") as log:
            try:
                code = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
                status = "ok" if code == 0 else f"failed ({code})"
            except subprocess.TimeoutExpired:
                status = f"timed out ({limit} s)"
        entry = {"status": status, "seconds": time.perf_counter() - started, "command": command}
        if status == "ok":
            entry["figures"] = figures(step, out)
            if step == "default-cold":
                summary["device"] = entry["figures"]["devices"]
        summary["steps"][step] = entry
        print(f"{step}: {status} in {entry['seconds']:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (out / "summary.md").write_text(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
