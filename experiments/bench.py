"""Speed and memory of a preset's train step and evaluation, ours and (optionally) PEFT's, side by side.

    python experiments/bench.py --model minilm-l6 --preset lora --batch 32 --seq-len 128 \
        --dtype float32 --steps 10 --json OUT.json --peer peft

Each side runs in its own subprocess (so its peak RSS is its own) on the same real QQP pairs of
the bundled sample (train split, tokenised as in training, truncated and padded to --seq-len).
OUT.json holds our figures at the top level:

    train_step_s           median seconds of one optimizer step (forward, backward, AdamW) after
                           --warmup steps (the first compiles)
    eval_pairs_per_s       pairs/s of the evaluation forward, batch --eval-batch at --seq-len, as the
                           run evaluates (the train step's forward on frozen weights + adapter, unmerged)
    peak_rss_mb            the side's peak resident memory (ru_maxrss), MiB
    step_rss_mb            the side's peak resident memory over its train steps (Linux's VmHWM,
                           restarted after loading and compiling) less what the process held before
                           it loaded the model: weights, state and the step's own memory, MiB; on a
                           CPU the figure to set beside XLA's account (the evaluation's forward
                           counts too when --eval-batches > 0)
    compiles_after_warmup  XLA backend compilations during the timed steps and evaluations
    flops_per_s            useful matmul FLOPs of one step / train_step_s (see ``train_flops``)
    peak_fraction          flops_per_s / the device's peak (``peak_flops``): MFU
    device_peak_mb         the accelerator's peak memory in use by the side, MiB (JAX's
                           ``memory_stats()["peak_bytes_in_use"]``, ``torch.cuda.max_memory_allocated()``;
                           None on a CPU)
    memory_account         with --memory-account: XLA's account of our compiled train step
                           (:func:`flaxlora.memory.memory_account`: what is live at its peak, by kind)

``train_flops`` counts the dot_general FLOPs in the jaxpr of the gradient of the loss w.r.t. the
trainable parameters on the factored path, where a frozen weight gets only its input gradient,
never a weight gradient: the work LoRA needs, whatever the implementation does. Both sides are
credited with the same count. ``peak_flops`` on an accelerator: its dense matmul peak for --dtype
(:data:`flaxlora.memory.devices.DEVICES`: H100/H200, A100, TPU v4/v5e/v5p/v6e; a TPU's bf16 peak for
float32); on CPU: cores in this process's affinity x the clock of /proc/cpuinfo x 32 fp32 FLOPs per
cycle (two 256-bit FMA pipes, which AVX2 cores and AMD Zen 4's double-pumped AVX-512 both have;
Intel cores with two 512-bit FMA units reach 64): override with --peak-gflops.

With --peer peft, "peer" holds PEFT + PyTorch's figures on the same configuration and "ratios"
ours over theirs (throughput: theirs_time / ours_time, memory: ours / theirs). PEFT mirrors our
settings: --dtype bfloat16 is autocast to bf16, --param-dtype its weights' dtype, --remat block or
full its gradient checkpointing (Hugging Face's, per layer); --peer-device cuda puts it on the GPU
(on CPU: torch.set_num_threads = the same cores, OMP_WAIT_POLICY=PASSIVE unless set: spinning
OpenMP threads lose badly on a shared CPU). Each --variant FLAGS adds our configuration with FLAGS
changed and, with --peer, PEFT's mirror of it (none for --quantize: PEFT's 4-bit base needs
bitsandbytes; the main PEFT side where the flags change nothing PEFT does, e.g. --scan-layers),
under "variants". All sides are set up at once (compiles and loads overlap); the
timed steps are split into --rounds rounds that alternate between the sides, so that a change in
the machine's load falls on all. --one-at-a-time runs the sides one after the other instead (each
ended before the next loads), for a model of which only one side fits in memory at a time, as the
1.07B Llama on a 24 GB CPU machine:

    python experiments/bench.py --model runs/llama-1.1b --batch 8 --seq-len 512 --dtype bfloat16 \
        --steps 1 --warmup 1 --rounds 1 --eval-batches 0 --eval-batch 8 --peer peft --one-at-a-time \
        --memory-account --variant='--param-dtype bfloat16' --variant='--remat full' --json OUT.json

On a GPU (JAX and PyTorch sharing it: XLA_PYTHON_CLIENT_PREALLOCATE=false is set for our sides):

    python experiments/bench.py --model LLAMA --batch 8 --seq-len 512 --dtype bfloat16 --steps 10 \
        --eval-batches 0 --peer peft --peer-device cuda --memory-account \
        --variant='--param-dtype bfloat16' --variant='--remat full' --variant='--quantize nf4' --json OUT.json
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("lora", "enhanced", "full")
LEARNING_RATES = {"lora": 5e-4, "enhanced": 5e-4, "full": 5e-5}  # of flaxlora.qqp.config.PRESETS, for PEFT's AdamW
QUANTIZE_OPTIONS = ("nf4", "nf4-dq", "int8", "gguf")  # flaxlora.quant.tree.OPTIONS (this parent process imports no jax)
REMAT_POLICIES = ("none", "block", "full")  # flaxlora.models.layers.REMAT_POLICIES
TARGET_SETS = ("preset", "qv", "all")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or its peak since :func:`restart_peak_rss` (VmHWM), MiB."""
    return int(re.search(rf"^{field}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def restart_peak_rss() -> None:
    """Hand the freed heap back to the system (glibc's malloc_trim) and restart the kernel's peak
    count (VmHWM) at the current RSS, so that what follows is measured on its own (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def peak_flops(device_kind: str, dtype: str) -> tuple[float, str]:
    """(dense matmul peak FLOP/s, what it is) of the device a side ran on: the table's for an
    accelerator (:mod:`flaxlora.memory.devices`), else this CPU's (:func:`cpu_peak_flops`)."""
    from flaxlora.memory.devices import device_named

    device = device_named(device_kind)
    if device is None:
        return cpu_peak_flops(), "cpu formula"
    peak, for_dtype = device.peak(dtype)
    return peak, f"{device.name} {for_dtype}"


def cpu_peak_flops() -> float:
    """cores x clock x 32 fp32 FLOPs/cycle (see the module docstring)."""
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())]
    return cores() * max(mhz) * 1e6 * 32


# ---------------------------------------------------------------------------------------------- data


def write_batches(model: str, seq_len: int, batch: int, eval_batch: int, path: Path) -> None:
    """Real QQP train pairs, tokenised for ``model``, each side's batches padded to ``seq_len``."""
    import numpy as np

    from flaxlora.data.tokenize import encode_pairs, pair_format_for
    from flaxlora.loading import load_config, load_tokenizer
    from flaxlora.models import model_kind
    from flaxlora.qqp.data import load_qqp

    train = load_qqp()["train"].sample(max(4 * batch, eval_batch))
    encoded = encode_pairs(load_tokenizer(model), train.question1, train.question2, seq_len, labels=train.labels,
                           pair_format=pair_format_for(model_kind(load_config(model))))
    padded = encoded.pad(np.arange(len(encoded)), seq_len)
    np.savez(path, **padded, labels=encoded.labels.astype(np.int32), pad_id=np.int32(encoded.pad_id))


def load_batches(path: str, batch: int, eval_batch: int):
    """(4 train batches, 1 eval batch) of numpy arrays with labels and weights."""
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    data["weights"] = np.ones(len(data["labels"]), np.float32)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")
    train = [{k: data[k][i * batch:(i + 1) * batch] for k in keys} for i in range(4)]
    return train, {k: data[k][:eval_batch] for k in keys}, int(data["pad_id"])


# ---------------------------------------------------------------------------------------------- ours


def dot_flops(jaxpr) -> int:
    """FLOPs of the dot_generals of a jaxpr, nested jaxprs included (scan bodies x length)."""
    import math

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
        subs = []
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    subs.append(inner)
        if eqn.primitive.name == "cond":
            subs = subs[:1]
        total += eqn.params.get("length", 1) * sum(dot_flops(s) for s in subs)
    return total


def run_config(args):
    from flaxlora.qqp.config import ALL_LINEAR_TARGETS, PRESETS, QV_TARGETS

    run = PRESETS[args.preset].replace(dtype=args.dtype, param_dtype=args.param_dtype, batch_size=args.batch)
    if args.lora_path:
        run = run.replace(lora_path=args.lora_path)
    if args.scan_layers:
        run = run.replace(scan_layers=True)
    if args.remat:
        run = run.replace(remat=args.remat)
    lora = run.lora
    if lora.targets is not None:
        if args.targets != "preset":
            lora = lora.replace(targets={"qv": QV_TARGETS, "all": ALL_LINEAR_TARGETS}[args.targets])
        if args.rank:
            lora = lora.replace(rank=args.rank)
    return run.replace(lora=lora)


class Ours:
    """Our side: the run's jitted train step and evaluation (adapter merged once per evaluation)."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        from flaxlora import training
        from flaxlora.loading import load_pretrained
        from flaxlora.lora.optim import lora_optimizer
        from flaxlora.qqp.run import DTYPES, lora_config, remat_for
        from flaxlora.training import sharding
        from flaxlora.training.evaluation import make_eval_step
        from flaxlora.training.metrics import weighted_cross_entropy

        self.args, self.jax, self.compiles = args, jax, []
        self.base_rss = rss_mb()  # the libraries, before the model
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        run = self.run = run_config(args)
        train_batches, eval_batch, _ = load_batches(args.data, args.batch, args.eval_batch)
        mesh = sharding.make_mesh(None)
        pretrained = load_pretrained(args.model, dtype=DTYPES[run.dtype], param_dtype=DTYPES[run.param_dtype],
                                     mesh=mesh, quantize=args.quantize,
                                     quantize_skip=run.lora.trainable, scan_layers=run.scan_layers,
                                     remat=remat_for(run, mesh))
        model, params = pretrained.model, pretrained.params
        del pretrained
        lora = lora_config(run)  # with the layer axis of a scanned stack
        tx = lora_optimizer(run.learning_rate, loraplus_ratio=run.loraplus_ratio, weight_decay=run.weight_decay,
                            max_grad_norm=run.max_grad_norm)
        self.state, self.frozen = training.init_train_state(params, lora, tx, jax.random.key(0), mesh)
        del params
        try:  # held as a run holds them
            from flaxlora.lora.factored import frozen_in_compute_dtype

            self.frozen = frozen_in_compute_dtype(self.frozen, DTYPES[run.dtype], lora, run.lora_path, free=True)
        except ImportError:  # an older source tree (--vs-root): its weights stay as stored
            pass
        self.step_fn, _ = training.jit_train_step(
            training.logits_fn(model, lora, run.lora_path), tx, mesh, self.state, self.frozen)
        self.batches = [sharding.global_batch(b, mesh) for b in train_batches]

        def loss(trainable, batch):  # the honest work: gradients of the trainable tree only
            logits = training.logits_fn(model, lora, "factored")(self.frozen, trainable, batch, jax.random.key(0))
            return weighted_cross_entropy(logits, batch["labels"], batch["weights"])[0]

        self.train_flops = dot_flops(jax.make_jaxpr(jax.grad(loss))(self.state.trainable, self.batches[0]).jaxpr)
        start = time.perf_counter()
        self.account = None
        if args.memory_account:  # compiled with XLA's dumps: the same program, and its account
            from flaxlora.memory import memory_account

            self.step_fn, account = memory_account(self.step_fn.lower(self.state, self.frozen, self.batches[0]),
                                                   ("state", "frozen", "batch"))
            self.account = account.to_json()
            print(account.table(), file=sys.stderr)
        else:
            self.step_fn = self.step_fn.lower(self.state, self.frozen, self.batches[0]).compile()
        self.i = 0
        restart_peak_rss()
        self.train(1)
        self.compile_s = time.perf_counter() - start
        self.train(args.warmup - 1)
        apply = training.logits_fn(model, lora, run.lora_path)
        self.eval_logits = lambda params, batch: apply(*params, batch)
        self.eval_step = make_eval_step(self.eval_logits, mesh, jax.tree.map(lambda x: x.sharding,
                                                                            (self.frozen, self.state.trainable)))
        self.eval_in = sharding.global_batch(eval_batch, mesh)
        self.zeros = lambda: (jnp.zeros(4), jnp.zeros(()), jnp.zeros(()))
        self.eval_flops = None
        if args.eval_batches:
            self.eval(1)  # compiles the evaluation step
            self.eval_flops = dot_flops(jax.make_jaxpr(self.eval_logits)(
                (self.frozen, self.state.trainable), self.eval_in).jaxpr) / args.eval_batch
        self.warm_compiles = len(self.compiles)

    def _on_event(self, event: str, secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles.append(secs)

    def train(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.state, self.metrics = self.step_fn(self.state, self.frozen, self.batches[self.i % len(self.batches)])
            self.jax.block_until_ready(self.metrics)
            times.append(time.perf_counter() - start)
            self.i += 1
        return times

    def eval(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            params = (self.frozen, self.state.trainable)
            self.jax.block_until_ready(self.eval_step(params, self.eval_in, self.zeros()))
            times.append(time.perf_counter() - start)
        return times

    def final(self) -> dict:
        stats = self.jax.devices()[0].memory_stats()  # None on a CPU
        return {
            "peak_rss_mb": peak_rss_mb(),
            "device_peak_mb": stats["peak_bytes_in_use"] / 2**20 if stats else None,
            "step_rss_mb": rss_mb("VmHWM") - self.base_rss,
            "memory_account": self.account,
            "compiles_after_warmup": len(self.compiles) - self.warm_compiles,
            "train_flops": self.train_flops,
            "eval_flops_per_pair": self.eval_flops,
            "compile_s": self.compile_s,
            "lora_path": self.run.lora_path,
            "scan_layers": self.run.scan_layers,
            "quantize": self.args.quantize,
            "param_dtype": self.run.param_dtype,
            "remat": self.args.remat or "none",
            "trainable_params": sum(x.size for x in self.jax.tree.leaves(self.state.trainable)),
            "device": self.jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loss": float(self.metrics["loss"]),
        }


# ---------------------------------------------------------------------------------------------- PEFT


def peer_lora_config(preset: str, kind: str, rank: int | None, targets: str):
    """PEFT's LoraConfig for the preset (None for full fine-tuning) and the extra trained names."""
    import peft

    if preset == "full":
        return None, None
    encoder = kind == "encoder"
    qv = ["query", "value"] if encoder else ["q_proj", "v_proj"]
    every = r".*\.(query|key|value|dense)$" if encoder else r".*\.(q|k|v|o|gate|up|down)_proj$"
    head = ["classifier"] if encoder else ["score"]
    chosen = {"qv": qv, "all": every}.get(targets, qv if preset == "lora" else every)
    if targets == "all" and encoder:  # ALL_LINEAR_TARGETS: every encoder linear layer, no pooler
        chosen = r".*layer\.\d+\..*(query|key|value|dense)$"
    if preset == "lora":
        return peft.LoraConfig(task_type="SEQ_CLS", r=rank or 8, lora_alpha=16, target_modules=chosen,
                               modules_to_save=head), None
    # enhanced: rsLoRA, biases and norms trained (BitFit), the head trained
    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank or 8, lora_alpha=16, target_modules=chosen, use_rslora=True,
                             bias="all", modules_to_save=head)
    return config, re.compile(r"LayerNorm|layernorm|norm\.weight")


class Peft:
    """The peer: PEFT + PyTorch on the same model, preset and batches, mirroring our settings (see
    the module docstring) on --peer-device."""

    def __init__(self, args):
        import numpy as np
        import torch
        import transformers

        torch.set_num_threads(cores())
        torch.manual_seed(0)
        self.base_rss = rss_mb()  # the libraries, before the model
        self.torch, self.device, self.args = torch, torch.device(args.peer_device), args
        path = Path(args.model_path)  # resolved by the parent: importing flaxlora here would import jax
        kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path.parent if kwargs else path, num_labels=2, dtype=getattr(torch, args.param_dtype), **kwargs)
        if (args.remat or "none") != "none":  # Hugging Face's per-layer activation checkpointing
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # its kwargs, first: named differently across versions
        kind = "encoder" if model.config.model_type in ("bert", "roberta") else "decoder"
        train_batches, eval_batch, pad_id = load_batches(args.data, args.batch, args.eval_batch)
        if kind == "decoder":
            model.config.pad_token_id = pad_id
        config, norms = peer_lora_config(args.preset, kind, args.rank, args.targets)
        if config is not None:
            import peft

            model = peft.get_peft_model(model, config)
            for name, p in model.named_parameters():
                if norms is not None and norms.search(name):
                    p.requires_grad_(True)
        self.model = model.to(self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=LEARNING_RATES[args.preset], weight_decay=0.01)
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

        def tensors(batch):
            names = ("input_ids", "attention_mask") + (("token_type_ids",) if kind == "encoder" else ())
            return {k: torch.from_numpy(np.asarray(batch[k], np.int64)).to(self.device) for k in names}

        self.batches = [(tensors(b), torch.from_numpy(b["labels"].astype(np.int64)).to(self.device))
                        for b in train_batches]
        self.eval_in = tensors(eval_batch)
        self.i = 0
        restart_peak_rss()
        self.train(args.warmup)
        if args.eval_batches:
            self.eval(1)

    def train(self, n: int) -> list[float]:
        torch, times = self.torch, []
        self.model.train()
        for _ in range(n):
            start = time.perf_counter()
            inputs, labels = self.batches[self.i % len(self.batches)]
            with self.autocast():
                loss = torch.nn.functional.cross_entropy(self.model(**inputs).logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sync()
            self.loss = float(loss.detach())
            times.append(time.perf_counter() - start)
            self.i += 1
        return times

    def eval(self, n: int) -> list[float]:
        times = []
        self.model.eval()
        with self.torch.inference_mode(), self.autocast():
            for _ in range(n):
                start = time.perf_counter()
                self.model(**self.eval_in).logits.float().cpu().numpy()
                times.append(time.perf_counter() - start)
        return times

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def final(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "peak_rss_mb": peak_rss_mb(),
            "step_rss_mb": rss_mb("VmHWM") - self.base_rss,
            "device_peak_mb": self.torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "device": self.torch.cuda.get_device_name() if cuda else "cpu",
            "param_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "gradient_checkpointing": (self.args.remat or "none") != "none",
            "trainable_params": sum(p.numel() for p in self.trainable),
            "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(),
            "loss": self.loss,
        }


SIDES = {"ours": Ours, "peft": Peft}


def serve(args) -> None:
    """A side's process: set up (warm-up included), say "ready", then answer "train N", "eval N", "end"."""
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the answers only
    side = SIDES[args.side](args)
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        command, n = line.split()
        if command == "end":
            print(json.dumps(side.final()), file=out, flush=True)
            return
        print(json.dumps(getattr(side, command)(int(n))), file=out, flush=True)


# ---------------------------------------------------------------------------------------------- main


def side_args(args, side: str, data: Path) -> list[str]:
    argv = [sys.executable, __file__, "--side", side, "--data", str(data), "--model", args.model, "--preset",
            args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
            "--param-dtype", args.param_dtype, "--warmup", str(args.warmup), "--eval-batch", str(args.eval_batch),
            "--targets", args.targets, "--eval-batches", str(args.eval_batches), "--peer-device", args.peer_device]
    if args.rank:
        argv += ["--rank", str(args.rank)]
    if args.lora_path:
        argv += ["--lora-path", args.lora_path]
    if args.quantize:
        argv += ["--quantize", args.quantize]
    if args.scan_layers:
        argv += ["--scan-layers"]
    if args.remat:
        argv += ["--remat", args.remat]
    if args.memory_account and side == "ours":
        argv += ["--memory-account"]
    if side == "peft":
        from flaxlora.loading.registry import known_models, resolve

        argv += ["--model-path", str(resolve(args.model) if args.model in known_models() else args.model)]
    return argv


class Side:
    """A side's subprocess, driven line by line; started at once, :meth:`ready` waits for its set-up."""

    def __init__(self, args, name: str, data: Path, label: str | None = None, root: str | None = None):
        self.name, self.label = name, label or name
        # OpenMP threads that spin while waiting lose badly to other processes on a shared CPU; JAX
        # must not take most of a GPU that PyTorch and the other sides share.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
        if args.xla_flags is not None:
            env["XLA_FLAGS"] = args.xla_flags
        if root:  # import flaxlora from another source tree
            env["PYTHONPATH"] = os.path.abspath(root)
        self.proc = subprocess.Popen(side_args(args, name, data), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def ready(self) -> "Side":
        self._read()  # "ready"
        return self

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"bench.py: the {self.label} side failed (its error is above)")
        return line

    def ask(self, command: str, n: int = 0):
        self.proc.stdin.write(f"{command} {n}\n")
        self.proc.stdin.flush()
        answer = json.loads(self._read())
        if command == "end":
            self.proc.wait()
        return answer


def peer_mirrors(args) -> str | None:
    """Why PEFT cannot mirror our configuration ``args``, or None when it can."""
    if args.quantize:
        return f"--quantize {args.quantize}: PEFT's 4-bit base needs bitsandbytes (QLoRA), not measured here"
    return None


def peer_settings(args) -> tuple:
    """What PEFT's side depends on: a variant that changes none of it shares the main PEFT side
    (e.g. --scan-layers, --lora-path: ours alone)."""
    return (args.dtype, args.param_dtype, args.remat or "none", args.preset, args.rank, args.targets)


def measure(args) -> dict:
    """Our side (and the peer's, and each --variant's) on one configuration, timed in alternation;
    the dict OUT.json holds."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "batches.npz"
        write_batches(args.model, args.seq_len, args.batch, args.eval_batch, data)
        def side(flags, name: str, label: str, root: str | None = None) -> functools.partial:
            """The side ``label``, started when its group runs."""
            return functools.partial(Side, flags, name, data, label=label, root=root)

        specs = [side(args, "ours", "ours")] + ([side(args, "peft", "peft")] if args.peer else [])
        if args.vs or args.vs_root:
            specs.append(side(args.vs_args, "ours", "vs", args.vs_root))
        for i, variant in enumerate(args.variant_args):
            specs.append(side(variant, "ours", f"ours:{i}"))
            if args.peer and peer_mirrors(variant) is None and peer_settings(variant) != peer_settings(args):
                specs.append(side(variant, "peft", f"peft:{i}"))
        times, finals = {}, {}
        for group in ([[spec] for spec in specs] if args.one_at_a_time else [specs]):
            sides = [s.ready() for s in [start() for start in group]]  # a group is set up at once
            times.update({s.label: {"train": [], "eval": []} for s in sides})
            chunk = max(1, args.steps // args.rounds)
            for r in range(args.rounds):  # alternate, so that the machine's load falls on all sides alike
                n = chunk if r < args.rounds - 1 else args.steps - chunk * (args.rounds - 1)
                for s in sides:
                    times[s.label]["train"] += s.ask("train", n)
                for s in sides:
                    times[s.label]["eval"] += s.ask("eval", args.eval_batches) if args.eval_batches else []
            finals.update({s.label: s.ask("end") for s in sides})

    def figures(name: str) -> dict:
        flops = finals["ours"]["train_flops"]  # the useful work, the same for every side
        if args.peak_gflops:
            peak, peak_of = args.peak_gflops * 1e9, "--peak-gflops"
        else:
            peak, peak_of = peak_flops(finals[name]["device"], args.dtype)
        step_s = statistics.median(times[name]["train"])
        return {"train_step_s": step_s,
                "eval_pairs_per_s": args.eval_batch / statistics.median(times[name]["eval"]) if args.eval_batches else None,
                "flops_per_s": flops / step_s, "peak_fraction": flops / step_s / peak, "peak_flops": peak,
                "peak_flops_of": peak_of, **finals[name], "train_step_s_all": times[name]["train"],
                "eval_s_all": times[name]["eval"]}

    def ratios(ours: dict, theirs: dict) -> dict:  # ours over theirs: throughput theirs_time / ours_time, memory ours / theirs
        ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731  (None: not measured)
        return {"train_throughput": theirs["train_step_s"] / ours["train_step_s"],
                "eval_throughput": ratio(ours["eval_pairs_per_s"], theirs["eval_pairs_per_s"]),
                "peak_rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
                "step_rss": ours["step_rss_mb"] / theirs["step_rss_mb"],
                "device_peak": ratio(ours["device_peak_mb"], theirs["device_peak_mb"]),
                # XLA's account of our step (live at its peak) over PEFT's measured step memory
                "account_over_peer_step": (None if ours.get("memory_account") is None else
                                           ours["memory_account"]["peak"] / 2**20 / (theirs["device_peak_mb"] or theirs["step_rss_mb"]))}

    result = figures("ours")
    result.update(cores=cores(), config={
        k: getattr(args, k) for k in ("model", "preset", "batch", "seq_len", "dtype", "param_dtype", "steps", "warmup",
                                      "rounds", "eval_batch", "eval_batches", "targets", "rank", "peer_device")})
    if args.vs or args.vs_root:
        other = result["vs"] = {"flags": args.vs, "root": args.vs_root, **figures("vs")}
        result["vs_ratios"] = {  # ours / vs: step time, evaluation throughput, peak RSS
            "train_step": result["train_step_s"] / other["train_step_s"],
            "eval_throughput": None if other["eval_pairs_per_s"] is None else result["eval_pairs_per_s"] / other["eval_pairs_per_s"],
            "peak_rss": result["peak_rss_mb"] / other["peak_rss_mb"],
            "step_rss": result["step_rss_mb"] / other["step_rss_mb"],
        }
    if args.peer:
        result["peer"] = figures("peft")
        result["ratios"] = ratios(result, result["peer"])
    result["variants"] = []
    for i, (flags, variant) in enumerate(zip(args.variant, args.variant_args)):
        entry = {"flags": flags, "ours": figures(f"ours:{i}")}
        if args.peer:
            why = peer_mirrors(variant)
            shared = peer_settings(variant) == peer_settings(args)
            entry["peer"] = {"skipped": why} if why else {"shared": "peft"} if shared else figures(f"peft:{i}")
            if not why:
                entry["ratios"] = ratios(entry["ours"], result["peer"] if shared else entry["peer"])
        result["variants"].append(entry)
    return result


def measure_ours(**options) -> dict:
    """``measure`` of our side alone, with bench.py's options as keywords: ``seq_len=64`` for
    ``--seq-len 64``, True for a bare flag, None or False to leave an option out."""
    argv = []
    for name, value in options.items():
        if value is not None and value is not False:
            argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return measure(parse(argv))


def summary(r: dict) -> str:
    c = r["config"]
    num = lambda x, spec=".1f": "-" if x is None else format(x, spec)  # noqa: E731  (None: not measured)

    def side(name: str, f: dict) -> str:
        return (f"  {name}: step {f['train_step_s']:.3f} s, eval {num(f['eval_pairs_per_s'])} pairs/s, peak RSS "
                f"{f['peak_rss_mb']:.0f} MiB (steps {f['step_rss_mb']:.0f}), device peak {num(f['device_peak_mb'], '.0f')} MiB, "
                f"{f['flops_per_s'] / 1e9:.1f} GFLOP/s = {f['peak_fraction']:.1%} of {f['peak_flops_of']} peak")

    def against(q: dict) -> str:
        return (f"  ours / PEFT's: train throughput {q['train_throughput']:.2f}x, eval throughput "
                f"{num(q['eval_throughput'], '.2f')}x, peak RSS {q['peak_rss']:.2f}x (steps {q['step_rss']:.2f}x), "
                f"device peak {num(q['device_peak'], '.2f')}x, our XLA account / PEFT's steps "
                f"{num(q['account_over_peer_step'], '.2f')}x")

    lines = [f"{c['model']} {c['preset']} B{c['batch']} S{c['seq_len']} {c['dtype']} compute, {c['param_dtype']} "
             f"weights ({r['lora_path']} path, {r['cores']} cores)",
             side("ours", r) + f", compile {r['compile_s']:.1f} s, {r['compiles_after_warmup']} compiles after warm-up"]
    if "peer" in r:
        lines += [side("peft", r["peer"]), against(r["ratios"])]
    if "vs" in r:
        v, q = r["vs"], r["vs_ratios"]
        lines += [f"  vs ({v['flags'] or ''} {v['root'] or ''}): step {v['train_step_s']:.3f} s, eval {num(v['eval_pairs_per_s'])} pairs/s, "
                  f"peak RSS {v['peak_rss_mb']:.0f} MiB, {v['lora_path']} path, compile {v['compile_s']:.1f} s",
                  f"  ours / vs: step time {q['train_step']:.2f}x, eval throughput {num(q['eval_throughput'], '.2f')}x, "
                  f"peak RSS {q['peak_rss']:.2f}x"]
    for v in r["variants"]:
        lines += [f"variant {v['flags']}:", side("ours", v["ours"])]
        if "skipped" in v.get("peer", {}):
            lines.append(f"  peft: {v['peer']['skipped']}")
        elif "peer" in v:
            lines += ([] if "shared" in v["peer"] else [side("peft", v["peer"])]) + [against(v["ratios"])]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--preset", choices=PRESETS, default="lora")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the weights (ours: the frozen base, as --param-dtype of qqp.py; PEFT: the model's)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps first (the first compiles)")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=2, help="timed evaluation batches per round (0: no evaluation)")
    p.add_argument("--rounds", type=int, default=5, help="the timed steps are split into this many rounds, "
                                                         "alternating between the sides")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the preset's)")
    p.add_argument("--targets", choices=TARGET_SETS, default="preset",
                   help="adapted layers: the preset's, query/value, or every linear layer of the blocks")
    p.add_argument("--lora-path", choices=("merged", "factored"), help="our train path (default: the preset's)")
    p.add_argument("--scan-layers", action="store_true", help="our layers under nn.scan (compiled once, params stacked)")
    p.add_argument("--remat", choices=REMAT_POLICIES,
                   help="our activation checkpointing per layer (default: the run's, none on one device)")
    p.add_argument("--quantize", choices=QUANTIZE_OPTIONS,
                   help="QLoRA: our frozen kernels quantized (e.g. --vs='--quantize nf4' for the step-time ratio)")
    p.add_argument("--peer", choices=("peft",), help="also run PEFT + PyTorch on the same configuration")
    p.add_argument("--peer-device", choices=("cpu", "cuda"), default="cpu", help="where PEFT runs")
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help="also run our side with these flags changed (and PEFT's mirror of it, with --peer), e.g. "
                        "--variant='--remat full'; repeatable; results under variants")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run the sides one after the other, not side by side: for a model that fits once in memory")
    p.add_argument("--memory-account", action="store_true",
                   help="compile our train step with XLA's dumps and add its memory account (what is live at its peak)")
    p.add_argument("--vs", help="also run our side with these flags changed, in the same rounds, e.g. "
                                "--vs='--preset lora' or --vs='--lora-path merged' (not --model, --batch or --seq-len: "
                                "the same batches); ratios in vs_ratios")
    p.add_argument("--vs-root", help="run that second configuration with flaxlora imported from this source tree "
                                     "(e.g. an older commit: git archive COMMIT | tar -x -C DIR): what a change bought")
    p.add_argument("--xla-flags", help="XLA_FLAGS of our side (e.g. --vs=\"--xla-flags='--xla_cpu_use_xnnpack=false'\")")
    p.add_argument("--peak-gflops", type=float, help="the CPU's peak GFLOP/s (default: see the docstring)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--side", choices=("ours", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``vs_args`` and ``variant_args``: those of --vs and of each --variant."""
    args = parser().parse_args(argv)
    if min(args.batch, args.steps, args.warmup, args.rounds, args.eval_batch) < 1 or args.eval_batches < 0 or args.seq_len < 8:
        parser().error("--batch, --steps, --warmup, --rounds and --eval-batch must be >= 1, --eval-batches >= 0, "
                       "--seq-len >= 8")
    args.rounds = min(args.rounds, args.steps)
    given = argv if argv is not None else sys.argv[1:]
    args.vs_args = parser().parse_args([*given, *shlex.split(args.vs or "")])
    args.variant_args = [parser().parse_args([*given, *shlex.split(flags)]) for flags in args.variant]
    if args.peer and peer_mirrors(args):
        parser().error(peer_mirrors(args) + ": drop --peer, or measure it as a --variant")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.side:
        serve(args)
        return {}
    result = measure(args)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
