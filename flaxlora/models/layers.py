"""Building blocks shared by the encoder and decoder backbones.

Every parameter is created with `nn.with_logical_partitioning`, so `model.init` returns boxed
`nn.LogicallyPartitioned` leaves; see `flaxlora.models.partitioning` for unboxing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import lift
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

from flaxlora.dataflow import (
    DENSE_OUTPUT,
    checkpoint_after_cotangent,
    computed_after,
    f32_accumulated_dot,
)
from flaxlora.dropout import dropout
from flaxlora.lora.factored import LORA_COLLECTIONS
from flaxlora.models.scan import SCANNED

Array = jax.Array
Dtype = Any

ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


# Activation checkpointing of each transformer layer: what its forward keeps for the backward pass.
# "block" keeps the outputs of its matmuls with a weight (the dense layers', named DENSE_OUTPUT,
# and the adapters' dots without batch dimensions) and recomputes the rest (norms, activations,
# attention); "full" keeps only the layer's input and recomputes the whole layer. Either way an
# FSDP all-gather of a weight is redone in the backward pass instead of the gathered weight being
# kept alive from the forward.
REMAT_POLICIES: Mapping[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_layer(layer: type[nn.Module], remat: str, deterministic_argnum: int) -> type[nn.Module]:
    """``layer`` rematerialised with the policy :data:`REMAT_POLICIES` names (``"none"``: as is):
    Flax's ``nn.remat`` with :func:`~flaxlora.dataflow.checkpoint_after_cotangent` for
    ``jax.checkpoint``, so that each layer is recomputed only when its backward pass comes.

    deterministic_argnum: the position of the static ``deterministic`` flag in ``__call__``
    (``self`` is 0). Parameter names are unchanged.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    if remat == "none":
        return layer
    return nn.transforms.lift_transform(_lifted_checkpoint, layer, policy=REMAT_POLICIES[remat],
                                        static_argnum=deterministic_argnum - 1)


def _lifted_checkpoint(fn: Callable, policy: Callable, static_argnum: int) -> Callable:
    """``flax.core.lift.checkpoint`` with :func:`~flaxlora.dataflow.checkpoint_after_cotangent` for
    ``jax.checkpoint``: ``fn(scope, *args)`` with ``args[static_argnum]`` static; the variables are
    the weights, never copied to tie them. Positional arguments only."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
        if kwargs:
            raise TypeError(f"a rematerialised layer takes positional arguments only, got {sorted(kwargs)}")
        static = args[static_argnum]

        def rematted(variable_groups, rng_groups, *dynamic):
            scope = scope_fn(variable_groups, rng_groups)
            y = fn(scope, *dynamic[:static_argnum], static, *dynamic[static_argnum:])
            return y, repack_fn(scope)

        dynamic = args[:static_argnum] + args[static_argnum + 1:]
        return checkpoint_after_cotangent(rematted, policy)(variable_groups, rng_groups, *dynamic)

    return lift.pack(inner, (True,), (True,), (True,), name="remat", enable_kwargs=True)


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` in a Hugging Face config."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def _dense_dot_general(x, w, dimension_numbers, precision=None):
    """``nn.Dense``'s ``dot_general`` in a low-precision dtype: :func:`f32_accumulated_dot`,
    returned in that dtype (as PyTorch's autocast does: what the next layer reads and the backward
    pass keeps is half the size), named :data:`DENSE_OUTPUT`."""
    return checkpoint_name(f32_accumulated_dot(x, w).astype(x.dtype), DENSE_OUTPUT)


def _float32_dot_general(x, w, dimension_numbers, precision=None):
    """``nn.Dense``'s ``dot_general`` in float32, named :data:`DENSE_OUTPUT`."""
    return checkpoint_name(jax.lax.dot_general(x, w, dimension_numbers, precision=precision), DENSE_OUTPUT)


def _logits_dot_general(x, w, dimension_numbers, precision=None):
    """A classification or LM head's ``dot_general``: :func:`f32_accumulated_dot`, in float32."""
    return f32_accumulated_dot(x, w)


def _promote_all_but_kernel(inputs, kernel, bias, *, dtype=None):
    """``nn.Dense``'s ``promote_dtype`` leaving the kernel as stored: :func:`f32_accumulated_dot`
    casts it (so that the backward pass can keep the stored weight instead of a cast copy)."""
    inputs, bias = promote_dtype(inputs, bias, dtype=dtype)
    return inputs, kernel, bias


class Block(nn.Module):
    """A model part configured by `config`, computing in `dtype` and storing `param_dtype`.

    The factory methods create the standard Flax layers (so interceptors on e.g. `nn.Dense`
    see every projection) with Hugging Face initialisers and logical axis names. With a `dtype`
    narrower than float32 (bfloat16), dense layers multiply in it, accumulate in float32 and
    return `dtype` (:func:`f32_accumulated_dot`; heads return float32), as PyTorch's autocast does;
    norms and softmax compute in float32, and Llama's residual stream is float32.
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _init(self, init: nn.initializers.Initializer, axes: tuple[str, ...]):
        return nn.with_logical_partitioning(init, axes)

    def dense(
        self,
        features: int,
        axes: tuple[str, str],
        *,
        use_bias: bool = True,
        stddev: float | None = None,
        name: str | None = None,
        logits: bool = False,
    ) -> nn.Dense:
        """`nn.Dense` with kernel (in, out) named `axes`, N(0, stddev or initializer_range) init;
        `logits`: a head, whose output is float32 whatever the compute dtype."""
        stddev = self.config.initializer_range if stddev is None else stddev
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self._init(nn.initializers.normal(stddev), axes),
            bias_init=self._init(nn.initializers.zeros_init(), axes[1:]),
            **(self._low_precision(logits) if jnp.finfo(self.dtype).bits < 32 else {"dot_general": _float32_dot_general}),
            **({"name": name} if name else {}),
        )

    @staticmethod
    def _low_precision(logits: bool) -> dict[str, Any]:
        """``nn.Dense`` options of a layer computing in a dtype narrower than float32."""
        return {"dot_general": _logits_dot_general if logits else _dense_dot_general,
                "promote_dtype": _promote_all_but_kernel}

    def embed(
        self,
        num: int,
        axes: tuple[str, str],
        *,
        features: int | None = None,
        stddev: float | None = None,
        name: str | None = None,
    ) -> nn.Embed:
        """`nn.Embed` of `num` rows of width `features` (default hidden_size), table named `axes`,
        N(0, stddev or initializer_range) init."""
        stddev = self.config.initializer_range if stddev is None else stddev
        return nn.Embed(
            num,
            self.config.hidden_size if features is None else features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=self._init(nn.initializers.normal(stddev), axes),
            **({"name": name} if name else {}),
        )

    def layer_norm(self, epsilon: float, *, name: str | None = None) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=self._init(nn.initializers.ones_init(), ("norm",)),
            bias_init=self._init(nn.initializers.zeros_init(), ("norm",)),
            **({"name": name} if name else {}),
        )

    def rms_norm(self, epsilon: float, *, name: str | None = None) -> nn.RMSNorm:
        return nn.RMSNorm(
            epsilon=epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=self._init(nn.initializers.ones_init(), ("norm",)),
            **({"name": name} if name else {}),
        )


class Stack(Block):
    """`config.num_hidden_layers` copies of `layer`, applied in turn, named '0', '1', ...

    Mirrors Hugging Face's `nn.ModuleList` naming (`encoder.layer.3`, `model.layers.3`). With
    `config.scan_layers`, one layer runs under `nn.scan` instead (compiled once, not once per
    layer): its params are stacked under `scanned` with a leading `layers` axis
    (:mod:`flaxlora.models.scan`), and so are the collections the factored LoRA path passes
    (:data:`~flaxlora.lora.factored.LORA_COLLECTIONS`).
    """

    layer: type[Block] = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *args: Any) -> Array:
        """``x`` through every layer; ``args`` end with the ``deterministic`` flag."""
        layer = remat_layer(self.layer, self.config.remat, deterministic_argnum=len(args) + 1)
        n = self.config.num_hidden_layers
        if not getattr(self.config, "scan_layers", False):
            for i in range(n):
                x = layer(self.config, self.dtype, self.param_dtype, name=str(i))(x, *args)
            return x
        scan = nn.scan(lambda module, carry, _: (module(carry, *args), None),
                       variable_axes=dict.fromkeys(("params", *LORA_COLLECTIONS), 0),
                       split_rngs={"params": True, "dropout": True}, length=n,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scan(layer(self.config, self.dtype, self.param_dtype, name=SCANNED), x, None)
        return x


def attention_weights(q: Array, k: Array, mask: Array, bias: Array | None = None, scale: float = 1.0) -> Array:
    """Softmax attention probabilities, with grouped-query support.

    Args:
      q: (batch, q_len, heads, head_dim) queries.
      k: (batch, kv_len, kv_heads, head_dim) keys; heads must be a multiple of kv_heads.
      mask: (batch, q_len or 1, kv_len) bool, True where attending is allowed.
      bias: (batch or 1, heads, q_len, kv_len) added to the scores (T5's position bias), or None.
      scale: the scores (float32) are multiplied by it first.

    Returns:
      (batch, kv_heads, heads // kv_heads, q_len, kv_len) probabilities in q's dtype. A row
      with no allowed key (a left-padding query) gets uniform weights instead of NaN.
    """
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores *= scale
    if bias is not None:
        scores += bias.reshape(bias.shape[0], kv_heads, h // kv_heads, *bias.shape[2:]).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


def attention_output(probs: Array, v: Array) -> Array:
    """Weighted values: probs (batch, kv_heads, groups, q_len, kv_len) and v (batch, kv_len,
    kv_heads, head_dim) -> (batch, q_len, kv_heads * groups * head_dim), heads in HF order."""
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(*out.shape[:2], -1)


# The float32 scores of one chunk of batch rows (rows x heads x q_len x kv_len x 4 bytes) that
# attention computes at a time, forward and backward, when nothing ties the rows together.
ATTENTION_CHUNK_BYTES = 32 * 2**20


def attention_chunk_rows(batch: int, heads: int, q_len: int, kv_len: int) -> int:
    """Rows of a batch that :func:`attention` scores at a time: the largest divisor of ``batch``
    whose float32 scores fit :data:`ATTENTION_CHUNK_BYTES` (at least 1)."""
    per_row = heads * q_len * kv_len * 4
    return max(r for r in range(1, batch + 1) if batch % r == 0 and (r == 1 or r * per_row <= ATTENTION_CHUNK_BYTES))


def _in_row_chunks(fn: Callable, rows: int, *xs: Array) -> Any:
    """``fn(*xs)`` computed ``rows`` batch rows (the leading axis of every x) at a time, one chunk
    after another (``lax.map``), the outputs' chunks joined again."""
    batch = xs[0].shape[0]
    if rows == batch:
        return fn(*xs)
    out = jax.lax.map(lambda chunk: fn(*chunk), [x.reshape(batch // rows, rows, *x.shape[1:]) for x in xs])
    return jax.tree.map(lambda y: y.reshape(batch, *y.shape[2:]), out)


def _attention_core(q, k, v, mask, bias, key, scale, rate):
    probs = attention_weights(q, k, mask, bias, scale)
    if key is not None:
        probs = dropout(probs, rate, key)
    return attention_output(probs, v)


def _row_chunked(fn: Callable, q, k, v, mask, bias, key, *rest) -> Any:
    """``fn(q, k, v, mask, bias, key, *rest)``, every array batch-first: for the whole batch where a
    dropout key or a bias (with its gradient) spans the rows, else :func:`attention_chunk_rows`
    rows at a time (the mask broadcast to the batch)."""
    batch = q.shape[0]
    spanned = key is not None or bias is not None
    rows = batch if spanned else attention_chunk_rows(batch, q.shape[2], q.shape[1], k.shape[1])
    if rows == batch:
        return fn(q, k, v, mask, bias, key, *rest)
    mask = jnp.broadcast_to(mask, (batch, *mask.shape[1:]))
    return _in_row_chunks(lambda q, k, v, mask, *rest: fn(q, k, v, mask, None, None, *rest), rows, q, k, v, mask, *rest)


def _attention_rows(q, k, v, mask, bias, key, scale, rate):
    return _row_chunked(functools.partial(_attention_core, scale=scale, rate=rate), q, k, v, mask, bias, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _recomputed_attention(q, k, v, mask, bias, key, scale, rate):
    return _attention_rows(q, k, v, mask, bias, key, scale, rate)


def _recomputed_attention_fwd(q, k, v, mask, bias, key, scale, rate):
    return _attention_rows(q, k, v, mask, bias, key, scale, rate), (q, k, v, mask, bias, key)


def _recomputed_attention_bwd(scale, rate, residuals, g):
    q, k, v, mask, bias, key = residuals
    q = computed_after(q, g)  # recomputed once g exists: never hoisted into, or kept from, the forward pass
    no_gradient = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731

    def pullback(q, k, v, mask, bias, key, g):
        core = lambda q, k, v, bias: _attention_core(q, k, v, mask, bias, key, scale, rate)  # noqa: E731
        return jax.vjp(core, q, k, v, bias)[1](g)

    dq, dk, dv, dbias = _row_chunked(pullback, q, k, v, mask, bias, key, g)
    return dq, dk, dv, no_gradient(mask), dbias, no_gradient(key)


_recomputed_attention.defvjp(_recomputed_attention_fwd, _recomputed_attention_bwd)


def attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float = 1.0, bias: Array | None = None,
              dropout_rate: float = 0.0, dropout_key: Array | None = None) -> Array:
    """``attention_output(dropout(attention_weights(q, k, mask, bias, scale)), v)``:
    q (batch, q_len, heads, head_dim), k and v (batch, kv_len, kv_heads, head_dim), mask (batch,
    q_len or 1, kv_len) bool -> (batch, q_len, heads * head_dim); dropout on the probabilities
    when ``dropout_key`` is given.

    The backward pass recomputes the probabilities (and the dropout mask, from its key) from q
    and k instead of keeping them from the forward pass: batch x heads x q_len x kv_len values
    per layer, in float32 and again in the compute dtype, the largest activations of a transformer
    at long lengths (Korthikanti et al. 2022's selective recomputation; PyTorch's fused attention
    keeps none either). The price is the score matmul and softmax once more, a few percent of a
    layer's FLOPs. (A custom VJP rather than ``jax.checkpoint``: XLA would schedule every layer's
    recomputation as early as it could, all at once.) Without dropout or a bias, the rows of the
    batch are scored :func:`attention_chunk_rows` at a time, forward and backward, so that at long
    lengths one chunk's scores are live, not the whole batch's (the same values: rows are
    independent).
    """
    return _recomputed_attention(q, k, v, mask, bias, dropout_key, float(scale), float(dropout_rate))


def split_heads(x: Array, head_dim: int) -> Array:
    """(batch, len, heads * head_dim) -> (batch, len, heads, head_dim)."""
    return x.reshape(*x.shape[:2], -1, head_dim)


class SequenceClassifier(Block):
    """A backbone (the submodule named by `backbone`) with a classification head."""

    backbone: ClassVar[str]

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Backbone output (batch, len, hidden)."""
        return getattr(self, self.backbone)(input_ids, attention_mask, token_type_ids, deterministic)
