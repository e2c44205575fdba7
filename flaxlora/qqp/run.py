"""Fine-tune a pretrained classifier on QQP with LoRA: the loop behind ``experiments/qqp.py``.

``finetune(run_config, output_dir)`` loads data and model, trains with a jitted sharded step,
logs, checkpoints, evaluates and writes ``output_dir``:

    results.json     final metrics of the held-out split (accuracy, f1, mcc, loss) and per split
    metrics.jsonl    one JSON object per logged train step; evaluations carry "split"
    tb/              TensorBoard events
    curves.png       training loss and evaluation accuracy / MCC
    checkpoints/     orbax checkpoints, one folder per step (see flaxlora.training.checkpoint)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flaxlora import pytree, training
from flaxlora.data.batching import (
    TrainIterator,
    default_buckets,
    eval_batches,
    prefetch,
)
from flaxlora.data.tokenize import encode_pairs, pair_format_for
from flaxlora.loading import base_provenance, is_gguf, load_config, load_pretrained
from flaxlora.loading.provenance import check_same_base
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.factored import frozen_in_compute_dtype
from flaxlora.lora.optim import lora_optimizer
from flaxlora.lora.rank_allocation import allocate
from flaxlora.lora.summary import summarize
from flaxlora.lora.targets import resolve_targets, trainable_paths
from flaxlora.models import init_params, sequence_classifier
from flaxlora.models.scan import (
    SCANNED_STACK_AXES,
    layer_paths,
    scanned_config,
    unstack_layers,
)
from flaxlora.paths import as_path
from flaxlora.qqp.config import DTYPES, MAX_STEPS, RunConfig
from flaxlora.qqp.data import load_qqp
from flaxlora.qqp.reporting import RunLog, mean_throughput, peak_rss_mib, plot_curves
from flaxlora.training import sharding
from flaxlora.training.checkpoint import Checkpointer
from flaxlora.training.evaluation import evaluate, make_eval_step
from flaxlora.training.metrics import weighted_cross_entropy

log = logging.getLogger(__name__)
# Fields that may change when resuming (the budget and logging), all others must match.
# max_steps and epochs may change only where the number of steps (the schedule) stays (check_resume).
RESUMABLE_CHANGES = ("max_steps", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints", "cache_dir",
                     "max_skipped_steps", "eval_batch_size", "remat")


def labelled_splits(data, eval_examples: int | None = None) -> dict:
    """The labelled splits of ``data``, every split but train cut to a fair sample of
    ``eval_examples`` pairs (:meth:`~flaxlora.qqp.data.QQPSplit.sample`)."""
    splits = {name: data[name] for name in data.splits if data[name].has_labels}
    if eval_examples:
        splits = {name: s if name == "train" else s.sample(eval_examples) for name, s in splits.items()}
    return splits


def encode_split(split, pretrained, run: RunConfig):
    return encode_pairs(
        pretrained.tokenizer, split.question1, split.question2, run.max_length, labels=split.labels,
        pair_format=pair_format_for(pretrained.kind), cache_dir=run.cache_dir,
    )


def check_resumable(saved: dict[str, Any], run: RunConfig) -> None:
    """ValueError unless ``run`` may resume the run saved with config ``saved`` (a dict): only
    ``RESUMABLE_CHANGES`` may differ."""
    now, saved = run.to_dict(), RunConfig.from_dict(saved).to_dict()  # fields added since: their defaults
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {now[k]!r}" for k in changed)
        raise ValueError(f"--resume with a different run configuration ({detail}); use a new --output-dir")


def total_steps_of(run: RunConfig, train_pairs: int) -> int:
    """Optimizer steps of ``run``: ``max_steps``, else ``epochs`` passes over ``train_pairs``."""
    return run.max_steps or max(1, round(run.epochs * math.ceil(train_pairs / run.batch_size)))


def check_hardware(run: RunConfig) -> jax.sharding.Mesh:
    """The run's mesh; ValueError unless it fits the devices and both batch sizes split over its
    batch axes."""
    mesh = sharding.make_mesh(run.mesh, dcn=run.dcn_mesh)
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    for flag, size in (("--batch-size", run.batch_size), ("--eval-batch-size", run.eval_batch_size)):
        if size % shards:
            raise ValueError(f"{flag} {size} must be a multiple of the {shards} devices on the batch axes of "
                             f"the mesh {dict(mesh.shape)}")
    return mesh


def lora_config(run: RunConfig) -> LoraConfig:
    """The run's LoraConfig as its model holds the targets: with one leading layer axis in a
    scanned stack (``--scan-layers``). ``run.lora`` (saved, exported) names the unrolled layout."""
    return run.lora.replace(stack_axes=SCANNED_STACK_AXES) if run.scan_layers else run.lora


def check_scan_selection(run: RunConfig, config: Any) -> None:
    """ValueError unless ``run.lora``'s targets and trained params, matched on the unrolled model,
    are what they select on the scanned one (``config``) in every layer: a pattern naming a layer
    index cannot pick some layers of a stack. Computed on shapes alone."""
    scanned = jax.eval_shape(functools.partial(init_params, sequence_classifier(config)), jax.random.key(0))
    unrolled = jax.eval_shape(unstack_layers, scanned)
    shapes = pytree.flatten(scanned)

    def selected(params: Any, lora: LoraConfig) -> set[str]:
        found = set()
        for select in (resolve_targets, trainable_paths):
            try:
                found |= set(select(params, lora))
            except ValueError:  # a pattern that matches nothing (e.g. once the layers are stacked)
                pass
        return found

    per_layer = {"/".join(layer) for path in selected(scanned, lora_config(run))
                 for layer in layer_paths(tuple(path.split("/")), shapes[path].shape)}
    expected = selected(unrolled, run.lora)
    differ = sorted(per_layer ^ expected)
    if differ:
        raise ValueError(f"--scan-layers: the targets or trained-parameter patterns select {differ[0]} but not the "
                         "same parameter of every other layer; use patterns without layer indices or drop --scan-layers")


def remat_for(run: RunConfig, mesh: jax.sharding.Mesh) -> str:
    """The run's remat policy; ``"auto"``: ``"full"`` where weights are sharded over ``fsdp`` (each
    layer's gathered weights are then gathered again in the backward pass, not kept), else ``"none"``."""
    if run.remat != "auto":
        return run.remat
    return "full" if mesh.shape["fsdp"] > 1 else "none"


def check_model(run: RunConfig) -> None:
    """ValueError unless ``--max-length`` fits the model's positions (read from its config alone),
    ``--quantize gguf`` has a GGUF model and ``--scan-layers`` a model whose layers stack."""
    if run.quantize == "gguf" and not is_gguf(run.model):
        raise ValueError(f"--quantize gguf keeps a GGUF file's own blocks: {run.model} is not a GGUF model; "
                         "use --quantize nf4, nf4-dq or int8")
    config = load_config(run.model)
    if run.scan_layers:
        check_scan_selection(run, scanned_config(config))
    limit = getattr(config, "max_sequence_length", None)
    if limit is not None and run.max_length > limit:
        raise ValueError(f"--max-length {run.max_length} exceeds the {limit} positions of {run.model}; "
                         f"use --max-length {limit} or less")


def check_resume(saved: dict[str, Any], saved_step: int, run: RunConfig, train_pairs: int) -> None:
    """ValueError unless ``run`` keeps the learning-rate schedule of the run saved at ``saved_step``
    (``saved``: its config): ``--max-steps`` / ``--epochs`` may change only where the step count stays."""
    before, now = RunConfig.from_dict(saved), total_steps_of(run, train_pairs)
    flag = "--max-steps" if before.max_steps != run.max_steps else "--epochs"
    if now < saved_step:
        raise ValueError(f"{flag} gives {now} steps, fewer than the {saved_step} already trained; "
                         "resume with the saved budget or use a new --output-dir")
    if now != total_steps_of(before, train_pairs):
        value = before.max_steps if flag == "--max-steps" else before.epochs
        raise ValueError(f"{flag} changes the learning-rate schedule ({total_steps_of(before, train_pairs)} steps "
                         f"saved, {now} now): resume with {flag} {value} or use a new --output-dir")


def preflight(run: RunConfig, out: epath.Path, resume: bool) -> tuple[RunConfig, jax.sharding.Mesh, Any, dict[str, Any]]:
    """Every check that can fail before a weight is loaded or a file written: mesh and batch sizes,
    max length, the output folder and resume compatibility (same base model too), the data.

    Returns ``(run, mesh, data, base)``: ``run`` keeps the saved LoRA ranks of a resumed
    rank-allocated run; ``base`` is the provenance of the base model (source, revision, sha256).
    """
    mesh = check_hardware(run)
    check_model(run)
    saved, saved_step = None, None
    if (out / "checkpoints").is_dir():
        with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
            saved_step = ckpt.latest_step()
            if saved_step is not None and not resume:
                raise FileExistsError(f"{out / 'checkpoints'} already holds checkpoints: pass --resume or use a new "
                                      "--output-dir")
            if saved_step is not None:
                saved = ckpt.read_meta()  # the newest step whose metadata reads
    if saved is not None and run.rank_budget:  # keep the ranks allocated when the run started
        run = run.replace(lora=RunConfig.from_dict(saved["run"]).lora)
    if saved is not None:
        check_resumable(saved["run"], run)
    saved_base = (saved or {}).get("base")
    base = base_provenance(run.model, (saved_base or {}).get("revision"))
    check_same_base(saved_base, base)
    data = load_qqp(run.data_dir, from_hub=run.from_hub)
    for split in ("train", "validation"):
        if split not in data.splits or not len(data[split]) or not data[split].has_labels:
            raise ValueError(f"{data.source}: no labelled {split} pairs ({data.report.summary()})")
    if total_steps_of(run, len(data["train"])) > MAX_STEPS:
        raise ValueError(f"--epochs {run.epochs} gives more than {MAX_STEPS} steps")
    if saved is not None:
        check_resume(saved["run"], saved_step, run, len(data["train"]))
    return run, mesh, data, base


def allocate_ranks(run: RunConfig, pretrained, train_data, buckets) -> RunConfig:
    """``run`` with its LoRA ranks spread over the targets by gradient importance (see
    :mod:`flaxlora.lora.rank_allocation`), measured on the first ``allocation_batches`` batches of a
    separately seeded pass over the training data."""
    batches = TrainIterator(train_data, run.batch_size, buckets, seed=run.seed + 1)

    def loss_fn(params, batch):
        logits = pretrained.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                        batch["token_type_ids"])
        loss, weight = weighted_cross_entropy(logits, batch["labels"], batch["weights"])
        return loss / jnp.maximum(weight, 1.0)

    sample = (next(batches) for _ in range(run.allocation_batches))
    return run.replace(lora=allocate(run.lora, pretrained.params, loss_fn, sample, budget=run.rank_budget))


def finetune(run: RunConfig, output_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate; returns (and writes to results.json) the final metrics. A run with
    ``members > 1`` trains an ensemble (:func:`flaxlora.qqp.ensemble.finetune_ensemble`)."""
    if run.members > 1:
        from flaxlora.qqp.ensemble import finetune_ensemble  # it trains each member with this function

        return finetune_ensemble(run, output_dir, resume=resume, progress=progress)
    started = time.perf_counter()
    out = as_path(output_dir)
    run, mesh, data, base = preflight(run, out, resume)
    if jax.process_count() > 1:  # every process has looked at the output folder before process 0 writes to it
        multihost_utils.sync_global_devices("flaxlora.qqp.run: preflight done")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=run.keep_checkpoints)
    resume_step = ckpt.latest_step() if resume else None
    log.info("%s\n%s", data.source, data.report.summary())
    pretrained = load_pretrained(run.model, num_labels=2, label_words=run.label_words, dtype=DTYPES[run.dtype],
                                 param_dtype=DTYPES[run.param_dtype], seed=run.seed, revision=base["revision"],
                                 mesh=mesh, remat=remat_for(run, mesh), scan_layers=run.scan_layers,
                                 quantize=run.quantize, quantize_skip=run.lora.trainable)  # each process reads only its devices' slices
    buckets = run.buckets or default_buckets(run.max_length)
    splits = labelled_splits(data, run.eval_examples)
    encoded = {name: encode_split(s, pretrained, run) for name, s in splits.items()}

    if run.rank_budget and resume_step is None:
        run = allocate_ranks(run, pretrained, encoded["train"], buckets)
    steps_per_epoch = math.ceil(len(encoded["train"]) / run.batch_size)
    total_steps = total_steps_of(run, len(encoded["train"]))
    schedule = training.learning_rate_schedule(run.learning_rate, total_steps, round(run.warmup_ratio * total_steps), run.decay)
    tx = lora_optimizer(schedule, loraplus_ratio=run.loraplus_ratio, weight_decay=run.weight_decay,
                        max_grad_norm=run.max_grad_norm)
    lora = lora_config(run)
    state, frozen = training.init_train_state(pretrained.params, lora, tx, jax.random.key(run.seed), mesh)
    pretrained = dataclasses.replace(pretrained, params=None)  # the frozen tree shares its arrays
    frozen = frozen_in_compute_dtype(frozen, DTYPES[run.dtype], lora, run.lora_path, free=True)  # bf16 compute: cast once
    apply = training.logits_fn(pretrained.model, lora, run.lora_path)
    step_fn, _ = training.jit_train_step(
        apply, tx, mesh, state, frozen,
        training.StepOptions(accum_steps=run.accum_steps, label_smoothing=run.label_smoothing),
    )
    iterator = TrainIterator(encoded["train"], run.batch_size, buckets, seed=run.seed)
    if resume_step is not None:  # restored straight into the run's shardings, from the newest readable step
        state, meta = ckpt.restore(state)
        resume_step = int(state.step)
        iterator.restore(meta["data"])
    summary = summarize(frozen, state.trainable["lora"], lora, state.trainable["extras"])
    log.info("\n%s", summary)

    writer = jax.process_index() == 0  # one host writes the logs, results and plot
    run_log = RunLog(out, resume_step, enabled=writer)
    # Evaluation runs the train step's own forward on (frozen, trainable): no merged copy of the model.
    eval_shardings = jax.tree.map(lambda x: x.sharding, (frozen, state.trainable))
    eval_logits = lambda params, batch: apply(*params, batch)  # noqa: E731
    eval_step = make_eval_step(eval_logits, mesh, eval_shardings)

    def run_eval(split: str, record_as: str) -> dict[str, Any]:
        batches = eval_batches(encoded[split], run.eval_batch_size, buckets)
        result = evaluate(eval_logits, (frozen, state.trainable), batches, mesh, eval_shardings, eval_step)
        run_log.write({"step": int(state.step), "split": record_as, **result})
        return result

    data_state = iterator.state  # the position after the last batch trained on

    def save(block: bool = True) -> None:  # periodic saves write in the background
        ckpt.save(state, {"run": run.to_dict(), "data": data_state, "model_kind": pretrained.kind,
                          "base": base}, block=block)

    def prepare(batch):  # in a background thread, a step ahead: host work off the step loop
        return (sharding.global_batch(batch, mesh), int(batch["attention_mask"].sum()), int(batch["weights"].sum()),
                iterator.state)

    start = int(state.step)
    batches = prefetch(iterator, prepare)
    bar = _progress(progress, start, total_steps)
    window_tokens, window_examples, window_losses, window_start = 0, 0, [], time.perf_counter()
    train_seconds = 0.0
    skips = training.SkipGuard(run.max_skipped_steps)
    for step in range(start + 1, total_steps + 1):
        batch, tokens, examples, data_state = next(batches)
        window_tokens += tokens
        window_examples += examples
        state, metrics = step_fn(state, frozen, batch)
        window_losses.append((metrics["loss"], metrics["skipped"]))  # stays on device: no sync per step
        stop = skips.update(metrics["skipped"])
        if step % run.log_every == 0 or step == total_steps or stop:
            last = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            train_seconds += elapsed
            record = {"step": step, **_window_losses(jax.device_get(window_losses)),
                      "grad_norm": _finite_or_none(last["grad_norm"]), "lr": float(schedule(step - 1)),
                      "tokens_per_s": window_tokens / elapsed, "examples_per_s": window_examples / elapsed,
                      "epoch": step / steps_per_epoch}
            run_log.write(record)
            bar.set_postfix(loss=f"{record['loss'] or math.nan:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_tokens, window_examples, window_losses, window_start = 0, 0, [], time.perf_counter()
        if stop:  # the state holds the last finite update: save it, then stop with one line
            bar.close()
            if ckpt.latest_step() != step:
                save()
            run_log.close()
            ckpt.close()
            raise FloatingPointError(
                f"training diverged: the {skips.in_a_row} updates before step {step} had a non-finite loss or "
                f"gradient and were skipped (--max-skipped-steps {run.max_skipped_steps}); the last finite state "
                f"is saved at step {step} in {out / 'checkpoints'}; lower --learning-rate and start a new run")
        bar.update(1)
        paused = time.perf_counter()  # evaluation and checkpoint time is not training time
        if run.eval_every and step % run.eval_every == 0 and step != total_steps:
            run_eval("validation", "eval")
        if run.save_every and step % run.save_every == 0:
            save(block=False)
        window_start += time.perf_counter() - paused
    bar.close()
    if ckpt.latest_step() != int(state.step):
        save()

    per_split = {"validation": run_eval("validation", "eval")}
    if "test" in encoded:
        per_split["test"] = run_eval("test", "test")
    held_out = "test" if "test" in per_split else "validation"
    results = {
        **{k: per_split[held_out][k] for k in ("accuracy", "f1", "mcc", "loss")},
        "held_out_split": held_out,
        "splits": per_split,
        "model": run.model,
        "base_model": base,
        "data": data.source,
        "data_report": {"rows_read": data.report.rows_read, "malformed": dict(data.report.malformed),
                        "duplicates_dropped": data.report.duplicates_dropped, "notes": list(data.report.notes)},
        "examples": {name: len(e) for name, e in encoded.items()},
        "positive_rate": {name: splits[name].positive_rate for name in encoded},
        "steps": total_steps,
        "skipped_steps": sum(r.get("skipped", 0) for r in run_log.records if "split" not in r),
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": 100 * summary.trainable_fraction,
        "train_tokens_per_s": mean_throughput(run_log.records),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_MiB": peak_rss_mib(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "seed": run.seed,
        "run": run.to_dict(),
    }
    if writer:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        plot_curves(run_log.records, out / "curves.png")
    run_log.close()
    ckpt.close()
    return results


def _window_losses(losses_and_skips: list[tuple[Any, Any]]) -> dict[str, Any]:
    """``{"loss": mean loss of the updates applied (None if none), "skipped": updates skipped}``."""
    applied = [float(loss) for loss, skipped in losses_and_skips if not skipped]
    return {"loss": float(np.mean(applied)) if applied else None, "skipped": len(losses_and_skips) - len(applied)}


def _finite_or_none(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled or jax.process_index() != 0, unit="step",
                dynamic_ncols=True)


