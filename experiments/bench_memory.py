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

``--account`` instead compiles one train step from the model's shapes alone (no weight is made
or read: a 1B model is analysed on a laptop) and prints XLA's account of its memory per device
(:func:`flaxlora.memory.memory_account`): arguments, outputs, temporaries, and what is live at the
peak by kind (frozen weights, train state, copies of weights, saved activations, backward
temporaries); ``--json`` writes it:

    python experiments/bench_memory.py --account --hidden 2048 --layers 22 --intermediate 5632 \
        --heads 32 --kv-heads 4 --batch-size 8 --seq-len 512 --dtype bfloat16     # a 1.07B Llama
    python experiments/bench_memory.py --account --model minilm-l6 --batch-size 32 --seq-len 128

The targets printed are those of the scale-out issue: one 8-device process under the model's
size + 2 GB, each of 2 four-device processes under half of it + 2 GB (with the mesh sharding
every large weight over all devices); with ``--extra --quantize nf4`` (QLoRA), a quarter of the
model's fp32 size + 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def smollm2_tokenizer(folder: Path | None = None):
    """SmolLM2's tokenizer (vocabulary 49152): from ``folder`` (one :func:`save_tokenizer` wrote,
    3.4 MB: for machines without the ``gguf`` package), else read from the bundled GGUF file."""
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from flaxlora.loading import GGUFFile
    from flaxlora.loading.registry import resolve

    return GGUFFile(resolve("smollm2-135m")).tokenizer()


def make_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
               tokenizer_folder: Path | None = None) -> int:
    """A random Llama checkpoint (fp32 safetensors, one file per layer) with SmolLM2's tokenizer
    (vocabulary 49152); returns its size in bytes. Written tensor by tensor: memory stays at one layer."""
    import numpy as np
    from safetensors.numpy import save_file

    tokenizer = smollm2_tokenizer(tokenizer_folder)
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
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= 0.02
        return values

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
    size = model_bytes(folder)  # Hugging Face's loader needs the metadata
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                     "weight_map": weight_map}))
    return size


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


def model_config(args: argparse.Namespace):
    """The architecture to analyse: ``--model``'s config, else a Llama of the size flags, with
    SmolLM2's vocabulary (``--vocab``, 49152) and ``--remat``, ``--scan-layers`` applied."""
    import dataclasses

    from flaxlora.loading import load_config
    from flaxlora.models import LlamaConfig, scanned_config

    if args.model is not None:
        config = load_config(str(args.model))
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, tie_word_embeddings=True)
    config = dataclasses.replace(config, remat="none" if args.remat == "auto" else args.remat)
    return scanned_config(config) if args.scan_layers else config


def abstract_train_step(config, *, preset: str, dtype: str, param_dtype: str, batch: int, seq_len: int,
                        quantize: str | None = None, mesh_spec: str | None = None):
    """``(lowered, argument shapes)`` of the run's jitted train step for ``config``, built from
    shapes alone as experiments/qqp.py builds it from weights: the preset's adapter, optimizer and
    train state, the frozen weights in their storage dtype (quantized with ``quantize``; matrices
    held in the compute dtype, :func:`~flaxlora.lora.factored.frozen_in_compute_dtype`) and
    shardings on the mesh."""
    import functools

    import jax
    import jax.numpy as jnp

    from flaxlora import pytree, training
    from flaxlora.lora.optim import lora_optimizer
    from flaxlora.models import init_params, sequence_classifier
    from flaxlora.qqp.config import DTYPES, PRESETS
    from flaxlora.qqp.run import lora_config
    from flaxlora.quant.arrays import is_quantized, quantize_weight
    from flaxlora.quant.tree import quantizable
    from flaxlora.training import sharding
    from flaxlora.training.step import state_shardings

    run = PRESETS[preset].replace(dtype=dtype, param_dtype=param_dtype, batch_size=batch,
                                  scan_layers=getattr(config, "scan_layers", False))
    lora = lora_config(run)
    mesh = sharding.make_mesh(mesh_spec)
    model = sequence_classifier(config, dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype])
    placed = pytree.flatten(sharding.param_shardings(model, mesh))
    shapes = pytree.flatten(jax.eval_shape(functools.partial(init_params, model), jax.random.key(0)))
    structs = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed[p]) for p, x in shapes.items()}
    if quantize:  # each quantized weight's codes and scales placed as its float kernel (as loading places them)
        skip = re.compile(run.lora.trainable) if run.lora.trainable else None
        for p, x in structs.items():
            if quantizable(p, x.shape, quantize) and not (skip and skip.search(p)):
                q = jax.eval_shape(functools.partial(quantize_weight, scheme=quantize), x)
                places = q.data_shardings(x.sharding)
                structs[p] = q.replace(data={k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=places[k])
                                             for k, a in q.data.items()})
    params = pytree.unflatten(structs)
    tx = lora_optimizer(run.learning_rate, loraplus_ratio=run.loraplus_ratio, weight_decay=run.weight_decay,
                        max_grad_norm=run.max_grad_norm)
    state, frozen = jax.eval_shape(lambda p: training.init_train_state(p, lora, tx, jax.random.key(0)), params)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                         state_shardings(state, tx, mesh, placed))
    try:
        from flaxlora.lora.factored import compute_dtype_paths
    except ImportError:  # an older source tree (PYTHONPATH=...), whose frozen weights stay as stored
        compute_dtype_paths = lambda *args: []  # noqa: E731
    held = set(compute_dtype_paths(frozen, DTYPES[dtype], lora, run.lora_path))
    frozen = pytree.unflatten({p: structs[p] if is_quantized(structs[p]) else jax.ShapeDtypeStruct(
        x.shape, DTYPES[dtype] if p in held else x.dtype, sharding=structs[p].sharding)
        for p, x in pytree.flatten(frozen).items()})
    step, _ = training.jit_train_step(training.logits_fn(model, lora, run.lora_path), tx, mesh, state, frozen)
    rows = sharding.batch_sharding(mesh)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)  # noqa: E731
    batch_shapes = {"input_ids": ints(batch, seq_len), "attention_mask": ints(batch, seq_len),
                    "token_type_ids": ints(batch, seq_len), "labels": ints(batch),
                    "weights": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=rows)}
    return step.lower(state, frozen, batch_shapes), (state, frozen)


def account(args: argparse.Namespace) -> dict:
    """XLA's account of the train step's memory for the flags' configuration (see the docstring)."""
    import jax

    from flaxlora.memory import memory_account

    config = model_config(args)
    start = time.perf_counter()
    lowered, (state, frozen) = abstract_train_step(
        config, preset=args.preset, dtype=args.dtype, param_dtype=args.param_dtype, batch=args.batch_size,
        seq_len=args.seq_len, quantize=args.quantize, mesh_spec=args.mesh)
    _, result = memory_account(lowered, ("state", "frozen", "batch"))
    print(result.table())
    weights = sum(x.size for x in jax.tree.leaves(frozen)) + sum(x.size for x in jax.tree.leaves(state.trainable))
    return {"config": {k: getattr(config, k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                        "intermediate_size", "vocab_size") if hasattr(config, k)},
            "parameters": weights, "preset": args.preset, "dtype": args.dtype, "param_dtype": args.param_dtype,
            "remat": config.remat, "scan_layers": getattr(config, "scan_layers", False), "quantize": args.quantize,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "backend": jax.default_backend(),
            "devices": jax.device_count(), "compile_s": round(time.perf_counter() - start, 1),
            "account": result.to_json()}


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
    p.add_argument("--mesh", help="the device mesh (default: fsdp=8 for --layouts, all devices on the data axis for "
                                   "--account)")
    p.add_argument("--preset", default="lora")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="auto", choices=("auto", "none", "block", "full"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more experiments/qqp.py flags (last)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--tokenizer", type=Path, help="--make-model: SmolLM2's tokenizer from this folder (--save-tokenizer "
                                                  "wrote it; for machines without the gguf package)")
    p.add_argument("--save-tokenizer", type=Path, help="write SmolLM2's tokenizer (3.4 MB) to this folder and exit")
    account_flags = p.add_argument_group("--account: XLA's account of one train step, from shapes alone")
    account_flags.add_argument("--account", action="store_true", help="instead: print (and --json) the compiled train "
                               "step's memory account for --model's config or a Llama of the size flags (--mesh, "
                               "--preset, --batch-size, --seq-len, --dtype, --param-dtype, --remat, --quantize)")
    account_flags.add_argument("--step-temporaries", dest="account", action="store_true", help=argparse.SUPPRESS)
    account_flags.add_argument("--vocab", type=int, default=49152, help="vocabulary of the size flags' Llama (SmolLM2's)")
    account_flags.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    account_flags.add_argument("--quantize", choices=("nf4", "nf4-dq", "int8"), help="frozen kernels quantized")
    account_flags.add_argument("--scan-layers", action="store_true")
    args = p.parse_args()
    if args.save_tokenizer:
        smollm2_tokenizer().save_pretrained(args.save_tokenizer)
        print(f"{args.save_tokenizer}: SmolLM2's tokenizer")
        return
    if args.make_model:
        size = make_model(args.make_model, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads,
                          args.tokenizer)
        print(f"{args.make_model}: {size / GIB:.2f} GiB of fp32 safetensors")
        return
    if args.account:
        if "--quantize" in args.extra:  # the old --step-temporaries spelling
            args.quantize = args.extra[args.extra.index("--quantize") + 1]
        report = account(args)
    else:
        if args.model is None:
            p.error("give --model FOLDER (make one with --make-model FOLDER) or --account")
        report = layouts(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def layouts(args: argparse.Namespace) -> dict:
    """Each layout's short run (see the docstring) and its per-process peak RSS."""
    args.mesh = args.mesh or "fsdp=8"
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
    return report


if __name__ == "__main__":
    main()
