"""A model of a LoRA train step's peak memory per device, and the largest batch that fits.

    estimate = estimate_memory(config, batch=8, seq_len=512, compute_dtype="bfloat16")
    estimate.peak                       # bytes per device
    largest_batch(config, 80 * 2**30, seq_len=512, compute_dtype="bfloat16")

The weights and the train state are counted exactly from the model's shapes (the frozen matrices
as a run holds them: in the compute dtype, or quantized; with FSDP over ``devices`` their share).
What the layers keep for the backward pass follows this implementation (see
:mod:`flaxlora.models.layers`): per layer of a Llama, the float32 residual stream at both norms,
the attention's q, k and v (its probabilities are recomputed), the MLP's gate and up, and each
adapter's input; with ``remat="full"`` only the layer's input; with ``"block"`` its input and its
dense outputs but the last (only added to the residual stream). The peak comes in the backward
pass of the last layer: every layer's kept activations, one layer's full set and the larger of its
attention backward (three float32 rows x heads x length^2 arrays for the rows attention scores at
a time) and its MLP backward. XLA's own account of a compiled step
(:func:`flaxlora.memory.memory_account`) is what this is tested against.

Supported: Llama and BERT-family models (T5: not modelled).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.targets import resolve_targets, trainable_paths
from flaxlora.models import BertConfig, LlamaConfig, init_params, sequence_classifier
from flaxlora.models.layers import attention_chunk_rows
from flaxlora.quant.arrays import quantize_weight
from flaxlora.quant.tree import quantizable

REMATS = ("none", "block", "full")
# Each adapted module's role in a layer, by the end of its path: what its input is.
ROLES = {
    r"(q_proj|k_proj|v_proj|query|key|value)/kernel$": "attention_in",
    r"(o_proj|attention/output/dense)/kernel$": "attention_out",
    r"(gate_proj|up_proj|intermediate/dense)/kernel$": "mlp_in",
    r"(down_proj|layer/\d+/output/dense)/kernel$": "mlp_out",
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device at the peak of a train step, by part.

    weights: the frozen base as held (its share with FSDP); state: the trained parameters, their
    AdamW moments and gradients; activations: what the layers keep for the backward pass; workspace:
    the last layer's backward pass (its full set of activations, its transients, and with FSDP two
    gathered layers of weights); loading: before training, the base as loaded and, while it is
    cast to the compute dtype layer by layer, one layer's cast.
    """

    weights: int
    state: int
    activations: int
    workspace: int
    loading: int

    @property
    def peak(self) -> int:
        """The train step's peak."""
        return self.weights + self.state + self.activations + self.workspace

    @property
    def required(self) -> int:
        """What the device must hold: the larger of the step's peak and loading."""
        return max(self.peak, self.loading)


def _bytes(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class _Parameters:
    frozen: int  # bytes per device of the frozen base as held
    loaded: int  # bytes per device of the frozen base as loaded (before the cast to the compute dtype)
    cast: bool  # whether a run casts matrices to the compute dtype once
    layer: int  # bytes of one layer's frozen matrices as held, whole (what FSDP gathers)
    trained: int  # trained parameters (adapters and fully trained extras)
    rank: int  # the adapters' (largest) rank
    adapted: int  # adapted modules in one layer
    roles: frozenset[str]  # the roles (ROLES) of the adapted modules of one layer


@functools.lru_cache(maxsize=64)
def _parameters(config: Any, lora: LoraConfig, compute_dtype: str, param_dtype: str, quantize: str | None,
                devices: int) -> _Parameters:
    """Counted from the model's shapes (nothing is allocated)."""
    from flaxlora.lora.adapters import init_lora

    model = sequence_classifier(config, param_dtype=jnp.dtype(param_dtype))
    params = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    shapes = pytree.flatten(params)
    trained = set(trainable_paths(params, lora))
    held = min(_bytes(param_dtype), _bytes(compute_dtype))
    frozen = layer = loaded = 0
    for path, x in shapes.items():
        if path in trained:
            continue
        if quantize and quantizable(path, x.shape, quantize):
            q = jax.eval_shape(functools.partial(quantize_weight, scheme=quantize), x)
            size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(q))
        elif len(x.shape) >= 2:
            size = math.prod(x.shape) * held
            loaded += math.prod(x.shape) * _bytes(param_dtype) // devices - size // devices
        else:
            frozen += math.prod(x.shape) * x.dtype.itemsize  # vectors (norms, biases) are replicated
            continue
        frozen += size // devices
        layer += size if re.search(r"/layers?/0/", path) else 0
    adapters = jax.eval_shape(lambda p: init_lora(p, lora, jax.random.key(0)), params)
    roles = set()
    targets = resolve_targets(params, lora)
    in_layer = [path for path in targets if re.search(r"/layers?/0/", path)]
    for path in in_layer:
        role = next((r for pattern, r in ROLES.items() if re.search(pattern, path)), None)
        if role is None:
            raise ValueError(f"the memory model knows no layer module like the adapter target {path!r}")
        roles.add(role)
    return _Parameters(frozen, frozen + loaded, held < _bytes(param_dtype), layer, sum(a.size for a in jax.tree.leaves(adapters))
                       + sum(math.prod(shapes[p].shape) for p in trained),
                       max((t.rank for t in targets.values()), default=0), len(in_layer), frozenset(roles))


def _dimensions(config: Any) -> tuple[str, int, int, int, int, int, int]:
    """(architecture, layers, hidden, intermediate, heads, kv heads, head dim)."""
    if isinstance(config, LlamaConfig):
        return ("llama", config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    if isinstance(config, BertConfig):
        heads = config.num_attention_heads
        return ("bert", config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, heads,
                config.head_dim)
    raise ValueError(f"the memory model covers Llama and BERT-family models, not {type(config).__name__}")


def _layer_activations(config: Any, p: _Parameters, tokens: int, compute: int, remat: str) -> int:
    """Bytes one layer keeps for the backward pass under ``remat`` (``tokens`` per device,
    ``compute`` bytes per value)."""
    arch, _, h, f, heads, kv_heads, d = _dimensions(config)
    t, c = tokens, compute
    residual = 4 if arch == "llama" else c  # Llama's residual stream is float32
    lora = p.adapted * t * p.rank * c  # each adapter's x @ a
    if remat == "full":
        return t * h * residual
    if remat == "block":  # the input and every dense output but the last (only added to the residual)
        dense = (heads + 2 * kv_heads) * d + h + 2 * f if arch == "llama" else 4 * h + f
        return t * h * residual + t * dense * c + lora
    inputs = {"attention_in": h, "attention_out": heads * d, "mlp_in": h, "mlp_out": f}
    adapted_inputs = sum(t * inputs[role] * c for role in p.roles)
    if arch == "llama":  # both norms' float32 input, q k v, the MLP's gate and up
        kept = 2 * t * h * 4 + t * (heads + 2 * kv_heads) * d * c + 2 * t * f * c
    else:  # the layer's input, both LayerNorms' input, q k v, the activation's input
        kept = 3 * t * h * c + 3 * t * h * c + t * f * c
        adapted_inputs -= t * h * c if "attention_in" in p.roles else 0  # the layer's input, kept anyway
    return kept + adapted_inputs + lora


def estimate_memory(config: Any, *, batch: int, seq_len: int, lora: LoraConfig, compute_dtype: str = "bfloat16",
                    param_dtype: str = "float32", remat: str = "none", quantize: str | None = None,
                    devices: int = 1) -> MemoryEstimate:
    """The peak bytes per device of the train step of ``config`` (a Llama or BERT config of
    :mod:`flaxlora.models`) with adapter ``lora`` on ``batch`` examples of ``seq_len`` tokens.

    compute_dtype, param_dtype: as ``--dtype`` and ``--param-dtype``; remat: "none" | "block" |
    "full" (with ``devices > 1`` a run's "auto" is "full"); quantize: the frozen kernels' scheme
    ("nf4", "nf4-dq", "int8"); devices: an FSDP mesh (fsdp=devices) sharding the frozen matrices
    and the batch.
    """
    if remat not in REMATS:
        raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
    if batch % devices:
        raise ValueError(f"batch {batch} must be a multiple of the {devices} devices it is split over")
    arch, layers, h, f, heads, _, _ = _dimensions(config)
    p = _parameters(config, lora, compute_dtype, param_dtype, quantize, devices)
    rows = batch // devices
    tokens, compute = rows * seq_len, _bytes(compute_dtype)
    kept = _layer_activations(config, p, tokens, compute, remat)
    whole = _layer_activations(config, p, tokens, compute, "none")
    # scores, probabilities and their gradient, float32, for the rows attention scores at a time
    attention = 3 * attention_chunk_rows(rows, heads, seq_len, seq_len) * heads * seq_len**2 * 4
    mlp = 2 * tokens * f * compute + tokens * f * 4
    workspace = whole + max(attention, mlp) + 2 * tokens * h * 4 + (2 * p.layer if devices > 1 else 0)
    return MemoryEstimate(weights=p.frozen, state=p.trained * 16, activations=(layers - 1) * kept,
                          workspace=workspace, loading=p.loaded + (p.layer // devices if p.cast else 0))


def largest_batch(config: Any, device_memory: int, *, seq_len: int, lora: LoraConfig, usable: float = 0.9,
                  devices: int = 1, max_batch: int = 1 << 16, **options: Any) -> int:
    """The largest batch (a multiple of ``devices``) whose :func:`estimate_memory` (its ``required``) is within
    ``usable`` of ``device_memory`` bytes per device (the rest: the allocator's fragmentation and
    runtime workspaces; JAX on a GPU takes 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
    otherwise), or 0 when not even ``devices`` examples fit."""
    budget = usable * device_memory

    def fits(batch: int) -> bool:
        return estimate_memory(config, batch=batch, seq_len=seq_len, lora=lora, devices=devices, **options).required <= budget

    if not fits(devices):
        return 0
    low, high = 1, max_batch // devices  # in units of devices
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * devices) else (low, mid - 1)
    return low * devices
