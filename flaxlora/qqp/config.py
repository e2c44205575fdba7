"""Run configurations as code: the defaults of ``experiments/qqp.py`` and its presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from flaxlora.data.batching import check_buckets
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.variants import RESIDUAL_INITS
from flaxlora.models.layers import REMAT_POLICIES
from flaxlora.qqp.data import LABEL_WORDS
from flaxlora.quant.tree import OPTIONS as QUANTIZE_OPTIONS
from flaxlora.training.step import check_decay, check_lora_path

MAX_STEPS = 2**31 - 1  # the step counter is int32
# RunConfig.dtype -> the compute dtype of the model.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Target regexes on '/'-joined parameter paths, for BERT/RoBERTa, Llama and T5 names alike, unrolled
# (layer/3/...) or scanned (layer/scanned/...: flaxlora.models.scan)
# (T5: PEFT's q, v; all linear: q, k, v, o of self- and cross-attention, wi or wi_0/wi_1, wo).
QV_TARGETS = r"(query|value|q_proj|v_proj)/kernel$|/(q|v)/kernel$"
ALL_LINEAR_TARGETS = (r"(query|key|value|attention/output/dense|intermediate/dense|layer/[^/]+/output/dense"
                      r"|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
                      r"|/(q|k|v|o|wi|wi_0|wi_1|wo)/kernel$")
# The same plus BERT's pooler (a dense layer between the encoder and the classifier).
ALL_LINEAR_POOLER_TARGETS = ALL_LINEAR_TARGETS.replace("(query|", "(query|pooler/dense|")
# The classifier of each family: BERT's and RoBERTa's classifier, Llama's score, T5's classification_head.
CLASSIFIER = r"^(classifier|score|classification_head)/"
# The classification head of each family: the classifier plus BERT's pooler.
HEAD = r"^(bert/pooler|roberta/pooler|classifier|score|classification_head)/"
# Every bias and norm plus the classifier (BitFit, Ben Zaken et al. 2022), without pooler kernels.
# T5 has no biases: its layer norms and head.
BITFIT = CLASSIFIER + r"|/bias$|LayerNorm/|layernorm/|layer_norm/|^model/norm/"

# Hu et al.'s LoRA: query and value projections, r = 8, alpha = 16, with the classifier trained.
PLAIN_LORA = LoraConfig(rank=8, alpha=16.0, targets=QV_TARGETS, trainable=CLASSIFIER)
# The enhanced LoRA of this project, chosen by validation MCC in experiments/ablation.py (README):
# rank 8 on every linear layer (and the pooler), rsLoRA scaling alpha / sqrt(r), with the biases,
# norms and classifier trained (BitFit).
ENHANCED_LORA = PLAIN_LORA.replace(targets=ALL_LINEAR_POOLER_TARGETS, scaling="rslora", trainable=BITFIT)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a fine-tuning run (saved with every checkpoint).

    Attributes are grouped as: model and data; adaptation (``lora``); optimisation; schedule and
    budget; logging, evaluation and checkpoints; hardware.
    """

    model: str = "minilm-l6"
    data_dir: str | None = None
    from_hub: bool = False
    max_length: int = 128
    buckets: tuple[int, ...] | None = None  # None: flaxlora.data.batching.default_buckets(max_length)
    text_to_text: bool = False  # T5: logits = the decoder's scores of the label words LABEL_WORDS, no head

    lora: LoraConfig = PLAIN_LORA
    rank_budget: int | None = None  # importance-based rank allocation: total rank spread over the targets
    allocation_batches: int = 8  # train batches whose mean gradient ranks the targets
    # Adapters trained together in one step on the one frozen base, member i seeded as the run member(i),
    # their class probabilities averaged (flaxlora.qqp.ensemble); 1: a single adapter.
    members: int = 1

    learning_rate: float = 5e-4
    loraplus_ratio: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    max_skipped_steps: int = 5  # stop after this many updates in a row skipped for a non-finite loss or gradient
    label_smoothing: float = 0.0
    swap_pairs: bool = False  # train each pair in a random order of its two questions each epoch (a symmetric label)
    rdrop: float = 0.0  # R-Drop: two dropout passes per example, + rdrop x their symmetric KL (StepOptions)
    warmup_ratio: float = 0.06
    decay: str = "linear"

    batch_size: int = 32
    accum_steps: int = 1
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs when set

    seed: int = 0
    log_every: int = 20
    eval_every: int = 200  # evaluate on validation every this many steps (0: at the end only)
    save_every: int = 200
    keep_checkpoints: int = 3
    eval_batch_size: int = 64
    eval_examples: int | None = None  # evaluate on a fair sample of N pairs of validation and test (None: all)

    mesh: str | None = None  # e.g. "data=4,fsdp=2"; None: all devices on data
    dcn_mesh: str | None = None  # axes across TPU slices (or processes), e.g. "data=2"; mesh is then per slice
    dtype: str = "float32"  # compute dtype; LoRA params and optimizer state stay float32
    param_dtype: str = "float32"  # storage dtype of the frozen weights (bfloat16 halves their memory)
    quantize: str | None = None  # QLoRA: frozen kernels in nf4 | nf4-dq | int8 | gguf (a GGUF file's own blocks)
    # Activation checkpointing per layer, "none" | "block" | "full" (REMAT_POLICIES), or "auto": "full"
    # where the mesh shards weights over fsdp (no layer's gathered weights kept for the backward pass).
    remat: str = "auto"
    # The layers of the backbone under nn.scan (BERT/RoBERTa, Llama): compiled once instead of once per
    # layer; params, adapters and checkpoints hold them stacked (flaxlora.models.scan).
    scan_layers: bool = False
    # "factored": x@W + s (x@a)@b, no weight-sized gradient or copy (fastest, see README "Speed");
    # "merged": W + s a@b formed every step (also for targets that are not Dense kernels)
    lora_path: str = "factored"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.accum_steps >= 1 and self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} must be a multiple of accum_steps {self.accum_steps}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (0 < self.learning_rate < math.inf, f"learning_rate must be > 0 and finite, got {self.learning_rate}"),
            (0 < self.loraplus_ratio < math.inf, f"loraplus_ratio must be > 0 and finite, got {self.loraplus_ratio}"),
            (0 <= self.weight_decay < math.inf, f"weight_decay must be >= 0 and finite, got {self.weight_decay}"),
            (self.max_grad_norm is None or 0 < self.max_grad_norm < math.inf,
             f"max_grad_norm must be > 0 and finite (or None), got {self.max_grad_norm}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.rdrop < math.inf, f"rdrop must be >= 0 and finite, got {self.rdrop}"),
            (0 < self.epochs < math.inf, f"epochs must be > 0 and finite, got {self.epochs}"),
            (self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS,
             f"max_steps must be in [1, {MAX_STEPS}], got {self.max_steps}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}"),
            (self.param_dtype in DTYPES, f"param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}"),
            (self.remat in ("auto", *REMAT_POLICIES), f"remat must be auto or one of {tuple(REMAT_POLICIES)}, "
                                                       f"got {self.remat!r}"),
            (self.log_every >= 1 and self.save_every >= 0 and self.eval_every >= 0,
             "log_every must be >= 1, save_every and eval_every >= 0"),
            (self.eval_examples is None or self.eval_examples >= 1, f"eval_examples must be >= 1, got {self.eval_examples}"),
            (self.rank_budget is None or self.rank_budget >= 1, f"rank_budget must be >= 1, got {self.rank_budget}"),
            (self.max_skipped_steps >= 1, f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.members >= 1 and self.members * (self.seed + 1) <= 2**32,
             f"members must be >= 1 with members * (seed + 1) <= 2**32 (the members' seeds), got {self.members} "
             f"with seed {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.buckets:
            check_buckets(self.buckets, self.max_length)
        check_decay(self.decay)
        check_lora_path(self.lora_path, self.lora)
        if self.quantize is not None:
            self._check_quantize()
        if self.members > 1:
            self._check_members()
        if self.scan_layers and (self.quantize or self.rank_budget):
            raise ValueError(f"--scan-layers stacks every layer's weights and adapters alike: --"
                             f"{'quantize' if self.quantize else 'rank-budget'} is not supported with it; drop one")

    def _check_quantize(self) -> None:
        if self.quantize not in QUANTIZE_OPTIONS:
            raise ValueError(f"quantize must be one of {QUANTIZE_OPTIONS}, got {self.quantize!r}")
        if self.lora.targets is None:
            raise ValueError("--quantize stores the frozen weights quantized: full fine-tuning freezes none")
        if self.lora.init in RESIDUAL_INITS:
            raise ValueError(f"--quantize with init {self.lora.init!r}: the residual W - s*a@b of a quantized W is "
                             "LoftQ's problem, not solved here; use init lora or gaussian")
        if self.lora_path != "factored":
            raise ValueError("--quantize runs on --lora-path factored (x @ deq(W) + s (x@a)@b, one weight at a time)")

    def _check_members(self) -> None:
        if self.lora.targets is None:
            raise ValueError(f"--members {self.members} ensembles adapters on one frozen base: full fine-tuning has "
                             "none; use --members 1 or adapters (--targets)")
        if self.lora.init in RESIDUAL_INITS or self.rank_budget:
            raise ValueError(f"--members {self.members}: the members of an ensemble share one base and one adapter "
                             f"layout, which {'--rank-budget' if self.rank_budget else 'init ' + repr(self.lora.init)} "
                             "gives each its own; use --members 1")

    def member(self, i: int) -> "RunConfig":
        """Member ``i`` of an ensemble run: the single-adapter run seeded ``members * seed + i`` (its
        adapter, classifier and dropout; the members share member 0's order of batches)."""
        if not 0 <= i < self.members:
            raise ValueError(f"member {i} of a run with {self.members} members")
        return self.replace(members=1, seed=self.members * self.seed + i)

    @property
    def label_words(self) -> tuple[str, ...] | None:
        """The label words a text-to-text run scores (None: a classification head)."""
        return LABEL_WORDS if self.text_to_text else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict()
        d["buckets"] = list(self.buckets) if self.buckets else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        d["lora"] = LoraConfig(**d["lora"])
        d["buckets"] = tuple(d["buckets"]) if d.get("buckets") else None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run config fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, RunConfig] = {
    # Plain LoRA as in Hu et al. (q, v; r=8, alpha=16), with the classification head trained.
    "lora": RunConfig(),
    # The enhanced LoRA (see ENHANCED_LORA) at rank 4: one adapter, 0.88% of MiniLM's parameters trained,
    # 3 epochs; chosen by validation MCC over lr 5e-4..2e-3, epochs 2..4, rank 4..10, DoRA and dropout
    # (README "The default run"). One model: it exports, and scores a pair in one forward pass; --members K
    # makes it an ensemble (experiments/README.md "One model or an ensemble").
    "enhanced": RunConfig(lora=ENHANCED_LORA.replace(rank=4), epochs=3.0),
    # Full fine-tuning: every parameter trained, no adapters; lr 5e-5 for 3 epochs, chosen by validation MCC
    # over lr 2.5e-5..1e-4 and epochs 2..3 (README "The default run").
    "full": RunConfig(lora=LoraConfig(targets=None, trainable=".*"), learning_rate=5e-5, epochs=3.0),
    # Only the classification head trained.
    "head": RunConfig(lora=LoraConfig(targets=None, trainable=HEAD), learning_rate=1e-3),
}
