"""What fits where: the memory model (:func:`flaxlora.estimate_memory`) for Llama 1B, 3B, 8B and 70B
on one 16 GB TPU v5e chip, one 80 GB H100 and an 8-chip v5e slice with FSDP.

    python experiments/memory_model.py --out experiments/results/memory-model

For each model, storage (fp32, bf16, NF4) and remat (none, full; the slice's run uses full),
with bf16 compute and the lora preset (q, v rank 8, the head trained): the peak per device for a
global batch of 8 and the largest global batch that fits in 90% of the device's memory, at
--seq-len tokens. The models are the Llama 3.x shapes of Meta's config.json files (sequence
classification: no LM head). Written as table.md and table.json, and readme.md: the bf16 rows README shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from flaxlora.memory import DEVICES, estimate_memory, largest_batch
from flaxlora.models import LlamaConfig
from flaxlora.qqp.config import PRESETS

GIB = 2**30
VOCAB = 128256
LLAMAS = {  # hidden, intermediate, layers, heads, kv heads (Llama 3.2 1B / 3B, Llama 3.1 8B / 70B)
    "Llama 1B": (2048, 8192, 16, 32, 8),
    "Llama 3B": (3072, 8192, 28, 24, 8),
    "Llama 8B": (4096, 14336, 32, 32, 8),
    "Llama 70B": (8192, 28672, 80, 64, 8),
}
STORAGE = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "nf4": ("float32", "nf4")}
SETUPS = {  # name: (device, devices)
    "TPU v5e x1": ("TPU v5e", 1),
    "H100 80GB x1": ("H100", 1),
    "TPU v5e x8 (FSDP)": ("TPU v5e", 8),
}


def llama(name: str) -> LlamaConfig:
    hidden, intermediate, layers, heads, kv_heads = LLAMAS[name]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads)


def table(seq_len: int, batch: int, usable: float) -> list[dict]:
    devices = {d.name: d for d in DEVICES}
    lora, rows = PRESETS["lora"].lora, []
    for model in LLAMAS:
        config = llama(model)
        for storage, (param_dtype, quantize) in STORAGE.items():
            for remat in ("none", "full"):
                row = {"model": model, "storage": storage, "remat": remat, "setups": {}}
                for setup, (device, n) in SETUPS.items():
                    if n > 1 and remat == "none":  # FSDP runs rematerialise ("auto": full)
                        continue
                    options = dict(seq_len=seq_len, lora=lora, compute_dtype="bfloat16", param_dtype=param_dtype,
                                   remat=remat, quantize=quantize, devices=n)
                    estimate = estimate_memory(config, batch=batch, **options)
                    memory = devices[device].memory_bytes
                    row["setups"][setup] = {
                        "peak_GiB": round(estimate.peak / GIB, 2),
                        "weights_GiB": round(estimate.weights / GIB, 2),
                        "loading_GiB": round(estimate.loading / GIB, 2),
                        "fits": estimate.required <= usable * memory,
                        "largest_batch": largest_batch(config, memory, usable=usable, **options),
                    }
                rows.append(row)
    return rows


def markdown(rows: list[dict], seq_len: int, batch: int, usable: float, command: str,
             storages: tuple[str, ...] = tuple(STORAGE)) -> str:
    """The table of ``rows`` (those of ``storages``) with what it shows and the command that made it."""
    lines = [f"# What fits where: LoRA (q, v, rank 8; the head trained) on Llama, bf16 compute, {seq_len} tokens",
             "",
             f"Predicted by `flaxlora.estimate_memory` (no run): each cell is the largest global batch of {seq_len}-token "
             f"examples whose peak fits in {usable:.0%} of the device's memory, then the peak per device at a global "
             f"batch of {batch} (GiB; `-`: does not fit). FSDP (the slice) shards the frozen matrices and the batch over "
             "the 8 chips and rematerialises every layer, as a run on it does (`--remat auto`; \"(full)\": see the "
             "`full` row). Checked against XLA's accounts of compiled steps on CPU (within 15%), not yet against a GPU's "
             "or TPU's measured peak. Storage: the frozen "
             "base as loaded (`--param-dtype`, `--quantize nf4`); with bf16 compute a run holds fp32 matrices in "
             "bf16 once (`frozen_in_compute_dtype`), so fp32 and bf16 storage need the same memory in training, "
             "but fp32 storage is loaded in fp32 first (a cell fits that too: a batch of 0 where it does not).",
             "",
             f"Command: `{command}`",
             "",
             "| model | storage | remat | " + " | ".join(SETUPS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in SETUPS) + " |"]
    for row in (r for r in rows if r["storage"] in storages):
        cells = []
        for setup in SETUPS:
            cell = row["setups"].get(setup)
            if cell is None:
                cells.append("(full)")
            else:
                peak = f"{cell['peak_GiB']:.1f}" if cell["fits"] else "-"
                cells.append(f"{cell['largest_batch']} ({peak})")
        lines.append(f"| {row['model']} | {row['storage']} | {row['remat']} | " + " | ".join(cells) + " |")
    device_lines = [f"- {d.name}: {d.memory_bytes / GIB:.0f} GiB ({d.source})" for d in DEVICES
                    if d.name in {s[0] for s in SETUPS.values()}]
    return "\n".join(lines + ["", "Devices:", *device_lines, ""])


def check(bench_json: Path) -> list[dict]:
    """The model against what experiments/bench.py measured (its --json, with --memory-account):
    each of our sides' device peak (the allocator's, against ``required``) and XLA's live peak
    (its memory account, against ``peak``), as ratios estimate / measured."""
    from flaxlora.loading import load_config

    result = json.loads(bench_json.read_text())
    c = result["config"]
    config = load_config(c["model"])
    sides = [("main", result)] + [(v["flags"], v["ours"]) for v in result.get("variants", [])]
    rows = []
    for name, side in sides:
        estimate = estimate_memory(dataclasses.replace(config, remat=side["remat"]), batch=c["batch"],
                                   seq_len=c["seq_len"], lora=PRESETS[c["preset"]].lora, compute_dtype=c["dtype"],
                                   param_dtype=side["param_dtype"], remat=side["remat"], quantize=side["quantize"])
        account = side.get("memory_account") or {}
        measured = {"device_peak": side["device_peak_mb"] and side["device_peak_mb"] * 2**20,
                    "xla_live_peak": account.get("peak")}
        row = {"side": name, "device": side["device"], "estimate_required": estimate.required,
               "estimate_peak": estimate.peak, **measured,
               "ratio_device": measured["device_peak"] and estimate.required / measured["device_peak"],
               "ratio_xla": measured["xla_live_peak"] and estimate.peak / measured["xla_live_peak"]}
        row["within_15_percent"] = all(abs(r - 1) <= 0.15 for r in (row["ratio_device"], row["ratio_xla"]) if r)
        rows.append(row)
        print(f"{name}: estimate {estimate.required / GIB:.2f} GiB (step peak {estimate.peak / GIB:.2f}); measured "
              + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in measured.items() if v)
              + f"; within 15%: {row['within_15_percent']}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for table.md and table.json (with --check: "
                                                           "the JSON file the comparison is written to)")
    p.add_argument("--check", type=Path, help="instead: compare the model with an experiments/bench.py --json (made "
                                              "with --memory-account)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="the global batch whose peak is shown")
    p.add_argument("--usable", type=float, default=0.9, help="fraction of a device's memory a run may fill")
    args = p.parse_args(argv)
    if args.check:
        rows = check(args.check)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bench": str(args.check), "rows": rows}, indent=1))
        return rows
    rows = table(args.seq_len, args.batch, args.usable)
    command = "python experiments/memory_model.py --out " + str(args.out) + (
        f" --seq-len {args.seq_len}" if args.seq_len != 512 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"seq_len": args.seq_len, "batch": args.batch, "usable": args.usable,
                                                     "rows": rows}, indent=1))
    (args.out / "table.md").write_text(markdown(rows, args.seq_len, args.batch, args.usable, command))
    (args.out / "readme.md").write_text(markdown(rows, args.seq_len, args.batch, args.usable, command, ("bf16",)))
    print((args.out / "table.md").read_text())
    return rows


if __name__ == "__main__":
    main()
