"""Per-process peak memory of a short training run on a device mesh, at 1 and at N processes.

Each layout (processes x devices per process) runs ``experiments/qqp.py`` for a few steps on a
Llama-architecture model as that many local processes (JAX's multi-process runtime over
127.0.0.1, CPU devices from ``--xla_force_host_platform_device_count``); each process's peak
resident memory (``ru_maxrss`` from ``wait4``, loading, stepping and evaluating included) is
compared with the model's size on disk:

    python experiments/bench_memory.py --make-model runs/llama-2.6g   # random fp32 safetensors, 2.6 GB
    python experiments/bench_memory.py --model runs/llama-2.6g --layouts 1x8 2x4 --mesh fsdp=8 \
        --json experiments/results/memory.json
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_memory.py \
        --model runs/llama-2.6g --step-temporaries --remat none     # XLA's temporaries of one step

The targets printed are those of the scale-out issue: one 8-device process under the model's
size + 2 GB, each of 2 four-device processes under half of it + 2 GB (with the mesh sharding
every large weight over all devices); with ``--extra --quantize nf4`` (QLoRA), a quarter of the
model's fp32 size + 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def make_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """A random Llama checkpoint (fp32 safetensors, one file per layer) with SmolLM2's tokenizer
    (vocabulary 49152); returns its size in bytes. Written tensor by tensor: memory stays at one layer."""
    import numpy as np
    from safetensors.numpy import save_file

    from flaxlora.loading import GGUFFile
    from flaxlora.loading.registry import resolve

    tokenizer = GGUFFile(resolve("smollm2-135m")).tokenizer()
    vocab, head_dim = len(tokenizer), hidden // heads
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(folder)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    parts = {"model-embed.safetensors": {"model.embed_tokens.weight": normal(vocab, hidden),
                                         "model.norm.weight": np.ones(hidden, np.float32)}}
    for i in range(layers):
        p = f"model.layers.{i}."
        parts[f"model-layer-{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(intermediate, hidden),
            p + "mlp.up_proj.weight": normal(intermediate, hidden),
            p + "mlp.down_proj.weight": normal(hidden, intermediate),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    weight_map = {}
    for file in list(parts):
        tensors = parts.pop(file)  # one file's tensors alive at a time
        save_file(tensors, folder / file)
        weight_map |= dict.fromkeys(tensors, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model_bytes(folder)


def model_bytes(model: Path) -> int:
    """Bytes of the model's weight files (a folder's safetensors, or a .gguf file)."""
    return model.stat().st_size if model.is_file() else sum(f.stat().st_size for f in model.glob("*.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(model: Path, processes: int, devices: int, args: argparse.Namespace, out: Path) -> dict:
    """Run the short job as ``processes`` local processes of ``devices`` CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    port = free_port()
    command = [sys.executable, str(ROOT / "experiments" / "qqp.py"), "--model", str(model), "--output-dir", str(out),
               "--preset", args.preset, "--mesh", args.mesh, "--max-steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.seq_len), "--buckets", str(args.seq_len),
               "--eval-examples", str(args.batch_size), "--eval-batch-size", str(args.batch_size),
               "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--param-dtype", args.param_dtype,
               "--remat", args.remat, "--quiet", *args.extra]
    cluster = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),  # noqa: E731
                         "--process-id", str(i)] if processes > 1 else []
    logs = [open(out.with_suffix(f".{i}.log"), "w") for i in range(processes)]  # noqa: SIM115
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, *cluster(i)], env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(processes)]
    peaks, codes = {}, {}
    while len(codes) < processes:
        pid, status, usage = os.wait4(-1, 0)
        index = next(i for i, p in enumerate(procs) if p.pid == pid)
        codes[index], peaks[index] = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20  # KiB -> GiB
    for log in logs:
        log.close()
    failed = [i for i, code in codes.items() if code]
    if failed:
        tail = out.with_suffix(f".{failed[0]}.log").read_text()[-2000:]
        raise SystemExit(f"process {failed[0]} of the {processes}x{devices} run failed:\n{tail}")
    results = json.loads((out / "results.json").read_text())
    return {"layout": f"{processes}x{devices}", "processes": processes, "devices_per_process": devices,
            "peak_rss_GiB": [round(peaks[i], 2) for i in range(processes)], "wall_s": round(time.perf_counter() - start),
            "train_tokens_per_s": results["train_tokens_per_s"], "final_loss": results["splits"]["validation"]["loss"]}


def step_temporaries(model: Path, mesh_spec: str, remat: str, quantize: str | None, batch: int, seq_len: int) -> dict:
    """XLA's own account of one compiled train step on this process's devices (``memory_analysis``):
    the temporaries per device beyond arguments and outputs (run with the XLA_FLAGS device count)."""
    import jax
    import numpy as np

    from flaxlora import training
    from flaxlora.loading import load_pretrained
    from flaxlora.lora.optim import lora_optimizer
    from flaxlora.qqp.config import PRESETS
    from flaxlora.qqp.run import remat_for
    from flaxlora.training import sharding

    mesh = sharding.make_mesh(mesh_spec)
    run = PRESETS["lora"].replace(remat=remat)
    remat = remat_for(run, mesh)  # "auto" resolved as a run resolves it
    pretrained = load_pretrained(model, mesh=mesh, remat=remat, quantize=quantize, quantize_skip=run.lora.trainable)
    tx = lora_optimizer(1e-4)
    state, frozen = training.init_train_state(pretrained.params, run.lora, tx, jax.random.key(0), mesh)
    step, _ = training.jit_train_step(training.logits_fn(pretrained.model, run.lora), tx, mesh, state, frozen)
    rows = {"input_ids": np.ones((batch, seq_len), np.int32), "attention_mask": np.ones((batch, seq_len), np.int32),
            "token_type_ids": np.zeros((batch, seq_len), np.int32), "labels": np.zeros(batch, np.int32),
            "weights": np.ones(batch, np.float32)}
    analysis = step.lower(state, frozen, sharding.global_batch(rows, mesh)).compile().memory_analysis()
    return {"mesh": mesh_spec, "remat": remat, "quantize": quantize, "devices": jax.device_count(),
            "temp_GiB_per_device": round(analysis.temp_size_in_bytes / GIB, 3),
            "arguments_GiB_per_device": round(analysis.argument_size_in_bytes / GIB, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-model", type=Path, help="write a random Llama model here and exit")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--model", type=Path, help="a Hugging Face folder (fp32 safetensors) or .gguf file to train on")
    p.add_argument("--layouts", nargs="+", default=["1x8", "2x4"], help="PROCESSESxDEVICES, e.g. 1x8 2x4")
    p.add_argument("--mesh", default="fsdp=8")
    p.add_argument("--preset", default="lora")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="auto", choices=("auto", "none", "block", "full"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more experiments/qqp.py flags (last)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--step-temporaries", action="store_true",
                   help="instead: compile one train step in this process (--mesh, --remat, --extra --quantize S) and "
                        "print XLA's temporaries per device")
    args = p.parse_args()
    if args.make_model:
        size = make_model(args.make_model, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
        print(f"{args.make_model}: {size / GIB:.2f} GiB of fp32 safetensors")
        return
    if args.model is None:
        p.error("give --model FOLDER (make one with --make-model FOLDER)")
    if args.step_temporaries:
        quantize = args.extra[args.extra.index("--quantize") + 1] if "--quantize" in args.extra else None
        print(json.dumps(step_temporaries(args.model, args.mesh, args.remat, quantize, args.batch_size, args.seq_len)))
        return
    size = model_bytes(args.model) / GIB
    report = {"model": str(args.model), "model_GiB": round(size, 2), "mesh": args.mesh, "preset": args.preset,
              "param_dtype": args.param_dtype, "remat": args.remat, "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        for layout in args.layouts:
            processes, devices = map(int, layout.split("x"))
            run = run_layout(args.model, processes, devices, args, Path(tmp) / layout)
            # The model's share per process + 2 GB; with a 4-bit base (QLoRA issue) a quarter of it + 2 GB.
            share = size / 4 if "--quantize" in args.extra else size / processes
            run["target_GiB"] = round(share + 2e9 / GIB, 2)
            run["within_target"] = max(run["peak_rss_GiB"]) < run["target_GiB"]
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
