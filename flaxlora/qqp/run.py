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
    batch_lengths,
    default_buckets,
    eval_batches,
    prefetch,
)
from flaxlora.data.tokenize import encode_pairs, pair_format_for
from flaxlora.loading import Pretrained, base_provenance, is_gguf, load_config, load_pretrained
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
from flaxlora.qqp.ensemble import ensemble_results, member_folders
from flaxlora.qqp.reporting import RunLog, mean_throughput, peak_rss_mib, plot_curves
from flaxlora.training import sharding
from flaxlora.training.checkpoint import Checkpointer
from flaxlora.training.compile import CompileCounter, compile_all
from flaxlora.training.evaluation import eval_totals, evaluate, make_eval_step
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


def encode_split(split, pretrained, run: RunConfig, swap: bool = False):
    """``split``'s pairs encoded for ``pretrained``; ``swap``: each pair's questions in the other order."""
    first, second = (split.question2, split.question1) if swap else (split.question1, split.question2)
    return encode_pairs(
        pretrained.tokenizer, first, second, run.max_length, labels=split.labels,
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
    scanned = jax.eval_shape(lambda: init_params(sequence_classifier(config), jax.random.key(0)))
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


def preflight(run: RunConfig, out: epath.Path, resume: bool) -> tuple[RunConfig, jax.sharding.Mesh, Any, dict[str, Any], int | None]:
    """Every check that can fail before a weight is loaded or a file written: mesh and batch sizes,
    max length, the output folder (each member's, for an ensemble) and resume compatibility (same
    base model too), the data.

    Returns ``(run, mesh, data, base, saved_step)``: ``run`` keeps the saved LoRA ranks of a
    resumed rank-allocated run; ``base`` is the provenance of the base model (source, revision,
    sha256); ``saved_step`` the step to resume from (None: a fresh run).
    """
    mesh = check_hardware(run)
    check_model(run)
    found = _saved_members(run, out, resume)
    saved, saved_step = (found[0][2], found[0][1]) if found else (None, None)
    if saved is not None and run.rank_budget:  # keep the ranks allocated when the run started
        run = run.replace(lora=RunConfig.from_dict(saved["run"]).lora)
    for i, _, meta in found:
        check_resumable(meta["run"], run.member(i))
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
    return run, mesh, data, base, saved_step


def _saved_members(run: RunConfig, out: epath.Path, resume: bool) -> list[tuple[int, int, dict[str, Any]]]:
    """``[(member, step, metadata)]`` of each member's newest checkpoint ([] for a fresh run).
    FileExistsError for saved checkpoints without ``resume``; ValueError for members saved at
    different steps."""
    found = []
    for i, folder in enumerate(member_folders(out, run.members)):
        if not (folder / "checkpoints").is_dir():
            continue
        with Checkpointer(folder / "checkpoints", read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                continue
            if not resume:
                raise FileExistsError(f"{folder / 'checkpoints'} already holds checkpoints: pass --resume or use a new "
                                      "--output-dir")
            meta = ckpt.read_meta()  # the newest step whose metadata reads
        found.append((i, step, meta))
    if not found:
        return []
    steps = {i: step for i, step, _ in found}
    if len(found) != run.members or len(set(steps.values())) > 1:
        raise ValueError(f"the members of {out} are saved at different steps ({', '.join(f'member {i}: {steps.get(i)}' for i in range(run.members))}), "
                         "as an earlier flaxlora trained them one after another; finish it with that version or use a "
                         "new --output-dir")
    return found


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


# The transfer guard of the steady training loop: "allow"; FLAXLORA_STEADY_LOOP_GUARD=disallow_explicit
# makes any read of a device value outside its sync points (logs, evaluations, saves) fail, as the
# accelerator check (experiments/accelerator_check.py) and the tests run it.
STEADY_LOOP_TRANSFERS = os.environ.get("FLAXLORA_STEADY_LOOP_GUARD", "allow")
# Batches assembled and placed on the devices ahead of the step that takes them.
PREFETCH_DEPTH = 2


def finetune(run: RunConfig, output_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate; returns (and writes to results.json) the final metrics.

    ``run.members`` K > 1 trains an ensemble: K adapters in one jitted step on the one frozen base
    (:mod:`flaxlora.qqp.ensemble`), member i written as a run of its own in ``OUT/members/i``.
    Every program the run needs (the train and evaluation steps per batch length) is compiled
    before the first step, concurrently, and read from the persistent compilation cache where
    :func:`~flaxlora.training.compile.use_compilation_cache` set one. In the steady loop the host
    never waits for the device: it reads metrics only when it logs (one step late, while the
    device runs the next step), evaluates or saves.
    """
    started = time.perf_counter()
    with CompileCounter() as compiles:
        return _finetune(run, as_path(output_dir), resume, progress, started, compiles)


def _finetune(run: RunConfig, out: epath.Path, resume: bool, progress: bool, started: float,
              compiles: CompileCounter) -> dict[str, Any]:
    run, mesh, data, base, resume_step = preflight(run, out, resume)
    if jax.process_count() > 1:  # every process has looked at the output folder before process 0 writes to it
        multihost_utils.sync_global_devices("flaxlora.qqp.run: preflight done")
    folders = member_folders(out, run.members)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    ckpts = [Checkpointer(folder / "checkpoints", max_to_keep=run.keep_checkpoints) for folder in folders]
    log.info("%s\n%s", data.source, data.report.summary())
    seeds = [run.member(i).seed for i in range(run.members)]
    pretrained = load_pretrained(run.model, num_labels=2, label_words=run.label_words, dtype=DTYPES[run.dtype],
                                 param_dtype=DTYPES[run.param_dtype], seed=seeds[0], revision=base["revision"],
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
    states, frozen = training.init_member_states(pretrained.params, lora, tx, seeds, mesh,
                                                 extras=member_extras(pretrained, lora, seeds))
    pretrained = dataclasses.replace(pretrained, params=None)  # the frozen tree shares its arrays
    frozen = frozen_in_compute_dtype(frozen, DTYPES[run.dtype], lora, run.lora_path, free=True)  # bf16 compute: cast once
    apply = training.logits_fn(pretrained.model, lora, run.lora_path)
    options = training.StepOptions(accum_steps=run.accum_steps, label_smoothing=run.label_smoothing, rdrop=run.rdrop,
                                   max_skipped_steps=run.max_skipped_steps, learning_rate=schedule)
    swapped = encode_split(splits["train"], pretrained, run, swap=True) if run.swap_pairs else None
    iterator = TrainIterator(encoded["train"], run.batch_size, buckets, seed=seeds[0], swapped=swapped)
    if resume_step is not None:  # restored straight into the run's shardings, from the newest readable step
        states, meta = _restore_members(ckpts, states)
        resume_step = int(states[0].step)
        iterator.restore(meta["data"])
    summary = summarize(frozen, states[0].trainable["lora"], lora, states[0].trainable["extras"])
    log.info("\n%s", summary)

    # Every program, compiled before the first step. Evaluation runs the train step's own forward on
    # (frozen, trainable): no merged copy of the model.
    step_fn = training.jit_members_step(apply, tx, mesh, states, frozen, options)
    evaluation = MemberEvaluation(apply, mesh, frozen, states)
    train_lengths = batch_lengths(encoded["train"], run.batch_size, buckets)
    eval_lengths = sorted({n for name, e in encoded.items() if name != "train"
                           for n in batch_lengths(e, run.eval_batch_size, buckets)})
    lowered = {("train", n): step_fn.lower(states, frozen, sharding.batch_spec(mesh, run.batch_size, n))
               for n in train_lengths}
    lowered |= {("eval", n): evaluation.lower(states, sharding.batch_spec(mesh, run.eval_batch_size, n))
                for n in eval_lengths}
    earlier, compiling = compiles.seconds, time.perf_counter()
    programs = compile_all(lowered)
    compile_seconds = earlier + time.perf_counter() - compiling  # the up-front programs overlap: their wall time
    log.info("compiled %d programs in %.1f s (%d from the cache)", compiles.programs, compile_seconds, compiles.from_cache)
    train_step = {n: programs["train", n] for n in train_lengths}
    evaluation.programs = {n: programs["eval", n] for n in eval_lengths}

    writer = jax.process_index() == 0  # one host writes the logs, results and plot
    logs = [RunLog(folder, resume_step, enabled=writer) for folder in folders]

    def run_eval(split: str, record_as: str) -> list[dict[str, Any]]:
        """The metrics of ``split`` per member (then their ensemble's, K > 1), logged as ``record_as``."""
        result = evaluation(states, eval_batches(encoded[split], run.eval_batch_size, buckets))
        for run_log, member in zip(logs, result):
            run_log.write({"step": int(states[0].step), "split": record_as, **member})
        return result

    data_states = {}  # step -> the data position after its batch, for the steps that may still be saved

    def save(block: bool = True) -> None:  # periodic saves write in the background
        step = int(states[0].step)
        for i, (ckpt, state) in enumerate(zip(ckpts, states)):
            ckpt.save(state, {"run": run.member(i).to_dict(), "data": data_states[step], "model_kind": pretrained.kind,
                              "base": base}, block=block, check_finite=False)  # the step never keeps a non-finite update

    def prepare(batch):  # in a background thread, steps ahead: host work and placement off the step loop
        return (sharding.global_batch(batch, mesh), int(batch["attention_mask"].sum()), int(batch["weights"].sum()),
                iterator.state)

    def report(closed: _Window, open_window: _Window) -> int | None:
        """Writes ``closed``'s log records (a sync point); the window still open starts counting
        time now. Returns the step the run halted at, if it did."""
        nonlocal train_seconds
        records, halted_at, seconds = closed.read(states, steps_per_epoch, run.max_skipped_steps)
        open_window.started = time.perf_counter()
        train_seconds += seconds
        for run_log, record in zip(logs, records):
            run_log.write(record)
        bar.set_postfix(loss=f"{records[0]['loss'] or math.nan:.4f}", tok_s=f"{records[0]['tokens_per_s']:.0f}")
        for done in [s for s in data_states if s < closed.steps[0] - 1]:
            del data_states[done]
        return halted_at

    start = int(states[0].step)
    data_states[start] = iterator.state
    batches = prefetch(iterator, prepare, depth=PREFETCH_DEPTH)
    bar = _progress(progress, start, total_steps)
    train_seconds, window, pending, halted_at = 0.0, _Window(), None, None
    with jax.transfer_guard_device_to_host(STEADY_LOOP_TRANSFERS):
        for step in range(start + 1, total_steps + 1):
            batch, tokens, examples, data_states[step] = next(batches)
            states, metrics = train_step[batch["input_ids"].shape[1]](states, frozen, batch)
            window.add(step, metrics, tokens, examples)
            bar.update(1)
            log_now = step % run.log_every == 0 or step == total_steps
            evaluate_now = bool(run.eval_every) and step % run.eval_every == 0 and step != total_steps
            save_now = bool(run.save_every) and step % run.save_every == 0
            if pending is None and not (log_now or evaluate_now or save_now):
                continue  # the steady loop: nothing read from the device
            with jax.transfer_guard_device_to_host("allow"):  # a sync point
                if pending is not None:  # closed a step ago: read while the device runs this step
                    halted_at, pending = report(pending, window), None
                if halted_at is None and log_now:
                    pending, window = window, _Window()
                    if evaluate_now or save_now or step == total_steps:  # waiting anyway: read it now
                        halted_at, pending = report(pending, window), None
                if halted_at is not None:
                    if window.steps and window.steps[0] <= halted_at:  # it halted at the step just dispatched
                        report(window, _Window())
                    break
                paused = time.perf_counter()  # evaluation and checkpoint time is not training time
                if evaluate_now:
                    run_eval("validation", "eval")
                if save_now:
                    save(block=False)
                window.started += time.perf_counter() - paused
    bar.close()
    with jax.transfer_guard_device_to_host("allow"):
        if ckpts[0].latest_step() != int(states[0].step):
            save()
        if halted_at is not None:  # the state where the skips reached the limit is saved: stop with one line
            for closable in (*logs, *ckpts):
                closable.close()
            raise FloatingPointError(
                f"training diverged: the {run.max_skipped_steps} updates up to step {halted_at} had a non-finite loss or "
                f"gradient and were skipped (--max-skipped-steps {run.max_skipped_steps}); the last finite state is "
                f"saved at step {halted_at} in {folders[0] / 'checkpoints'}; lower --learning-rate and start a new run")
        per_split = {"validation": run_eval("validation", "eval")}
        if "test" in encoded:
            per_split["test"] = run_eval("test", "test")

    held_out = "test" if "test" in per_split else "validation"
    shared = {
        "held_out_split": held_out,
        "model": run.model,
        "base_model": base,
        "data": data.source,
        "data_report": {"rows_read": data.report.rows_read, "malformed": dict(data.report.malformed),
                        "duplicates_dropped": data.report.duplicates_dropped, "notes": list(data.report.notes)},
        "examples": {name: len(e) for name, e in encoded.items()},
        "positive_rate": {name: splits[name].positive_rate for name in encoded},
        "steps": total_steps,
        "total_params": summary.total,
        "train_tokens_per_s": mean_throughput(logs[0].records),
        "train_seconds": train_seconds,
        "programs": compiles.programs,
        "compiles": compiles.compiled,
        "compiles_from_cache": compiles.from_cache,
        "compile_seconds": compile_seconds,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    members = []
    for i, run_log in enumerate(logs):
        member = {name: rows[i] for name, rows in per_split.items()}
        members.append({
            **{k: member[held_out][k] for k in ("accuracy", "f1", "mcc", "loss")},
            "splits": member,
            **shared,
            "skipped_steps": sum(r.get("skipped", 0) for r in run_log.records if "split" not in r),
            "trainable_params": summary.trainable,
            "trainable_percent": 100 * summary.trainable_fraction,
            "wall_seconds": time.perf_counter() - started,
            "peak_rss_MiB": peak_rss_mib(),
            "seed": seeds[i],
            "run": run.member(i).to_dict(),
        })
    results = members[0]
    if run.members > 1:
        results = ensemble_results(run, members, {name: rows[-1] for name, rows in per_split.items()})
    if writer:
        for folder, member, run_log in zip(folders, members, logs):
            (folder / "results.json").write_text(json.dumps(member, indent=2))
            plot_curves(run_log.records, folder / "curves.png")
        if run.members > 1:
            (out / "results.json").write_text(json.dumps(results, indent=2))
    for closable in (*logs, *ckpts):
        closable.close()
    return results


def member_extras(pretrained: Pretrained, lora: LoraConfig, seeds: list[int]) -> list[dict[str, jax.Array]] | None:
    """Per member of an ensemble (K > 1), the trained params the checkpoint lacks (its classifier)
    as the member's own seed initialises them: member i starts as the single run seeded ``seeds[i]``."""
    if len(seeds) == 1 or not pretrained.missing:
        return None
    trained = set(trainable_paths(pretrained.params, lora))
    return [{p: v for p, v in pretrained.init_missing(seed).items() if p in trained} for seed in seeds]


def _restore_members(ckpts: list[Checkpointer], states: tuple) -> tuple[tuple, dict[str, Any]]:
    """Each member's newest readable state, restored into ``states``' shardings, and member 0's
    metadata; ValueError unless all are at the same step."""
    restored = [ckpt.restore(state) for ckpt, state in zip(ckpts, states)]
    steps = [int(state.step) for state, _ in restored]
    if len(set(steps)) > 1:
        raise ValueError(f"the members' newest readable checkpoints are at different steps {steps}: delete the newer "
                         "steps in checkpoints/ of the members ahead (or move them aside) and resume again")
    return tuple(state for state, _ in restored), restored[0][1]


class MemberEvaluation:
    """The evaluation of K members' adapters on one frozen base: per batch length one compiled
    program (``programs``, set once compiled) taking ``(frozen, trainables)``; K > 1 counts each
    member and their ensemble (:func:`flaxlora.training.evaluation.ensemble_logits`)."""

    def __init__(self, apply, mesh: jax.sharding.Mesh, frozen, states: tuple):
        self.members, self.mesh, self.frozen = len(states), mesh, frozen

        def logits(params, batch):
            frozen, trainables = params
            if len(trainables) == 1:
                return apply(frozen, trainables[0], batch)
            return jax.vmap(lambda t: apply(frozen, t, batch))(jax.tree.map(lambda *x: jnp.stack(x), *trainables))

        self._params = lambda states: (frozen, tuple(s.trainable for s in states))  # noqa: E731
        shardings = jax.tree.map(lambda x: x.sharding, self._params(states))
        self.step = make_eval_step(logits, mesh, shardings, members=self.members > 1)
        self.programs = None

    def lower(self, states: tuple, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
        return self.step.lower(self._params(states), batch, eval_totals(self._k))

    @property
    def _k(self) -> int | None:
        return self.members if self.members > 1 else None

    def __call__(self, states: tuple, batches) -> list[dict[str, Any]]:
        """[member 0's metrics, ...] (and the ensemble's last, K > 1) over ``batches``."""
        result = evaluate(None, self._params(states), batches, self.mesh, step=self.programs or self.step, members=self._k)
        return result if self._k else [result]


class _Window:
    """The steps since the last log: their metrics stay on the device until :meth:`read`."""

    def __init__(self):
        self.started, self.steps, self.metrics, self.tokens, self.examples = time.perf_counter(), [], [], 0, 0

    def add(self, step: int, metrics: dict[str, jax.Array], tokens: int, examples: int) -> None:
        self.steps.append(step)
        self.metrics.append(metrics)
        self.tokens += tokens
        self.examples += examples

    def read(self, states: tuple, steps_per_epoch: int, max_skipped: int) -> tuple[list[dict[str, Any]], int | None, float]:
        """(one log record per member, the step the run halted at or None, seconds since ``started``).
        A sync point: waits for the newest step. A run that halted at step h has stepped no further
        (:class:`~flaxlora.training.StepOptions`): the records cover the window's steps up to h."""
        metrics, skipped_in_a_row, step_now = jax.device_get(
            (self.metrics, [s.skipped_in_a_row for s in states], states[0].step))
        seconds = time.perf_counter() - self.started
        halted_at = int(step_now) if max(int(np.max(s)) for s in skipped_in_a_row) >= max_skipped else None
        kept = [i for i, step in enumerate(self.steps) if halted_at is None or step <= halted_at]
        last = self.steps[kept[-1]]
        per_step = {k: np.stack([np.atleast_1d(metrics[i][k]) for i in kept]) for k in metrics[0]}
        records = []
        for m in range(len(states)):
            applied = [float(loss) for loss, skipped in zip(per_step["loss"][:, m], per_step["skipped"][:, m]) if not skipped]
            records.append({
                "step": last,
                "loss": float(np.mean(applied)) if applied else None,
                "skipped": len(kept) - len(applied),
                "grad_norm": _finite_or_none(per_step["grad_norm"][-1, m]),
                "lr": float(per_step["lr"][-1, m]),
                "seconds": seconds,
                "tokens_per_s": self.tokens / seconds,
                "examples_per_s": self.examples / seconds,
                "epoch": last / steps_per_epoch,
            })
        return records, halted_at, seconds


def _finite_or_none(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled or jax.process_index() != 0, unit="step",
                dynamic_ncols=True)
