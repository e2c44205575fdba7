"""Building blocks shared by the encoder and decoder backbones.

Every parameter is created with `nn.with_logical_partitioning`, so `model.init` returns boxed
`nn.LogicallyPartitioned` leaves; see `flaxlora.models.partitioning` for unboxing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models.scan import LORA_COLLECTIONS, SCANNED

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
# "block" keeps the outputs of its matmuls with a weight (dots without batch dimensions) and
# recomputes the rest (norms, activations, attention); "full" keeps only the layer's input and
# recomputes the whole layer. Either way an FSDP all-gather of a weight is redone in the backward
# pass instead of the gathered weight being kept alive from the forward.
REMAT_POLICIES: Mapping[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_layer(layer: type[nn.Module], remat: str, deterministic_argnum: int) -> type[nn.Module]:
    """``layer`` under ``nn.remat`` with the policy :data:`REMAT_POLICIES` names (``"none"``: as is).

    deterministic_argnum: the position of the static ``deterministic`` flag in ``__call__``
    (``self`` is 0). Parameter names are unchanged.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    if remat == "none":
        return layer
    return nn.remat(layer, policy=REMAT_POLICIES[remat], static_argnums=(deterministic_argnum,))


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` in a Hugging Face config."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


@jax.custom_vjp
def f32_accumulated_dot(x: Array, w: Array) -> Array:
    """``x (..., in) @ w (in, out)`` multiplied in their (low-precision) dtype and accumulated and
    returned in float32; the backward pass multiplies in that dtype too, and forms the weight
    gradient only when ``w`` is differentiated (never for a frozen weight)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _f32_accumulated_dot_fwd(x, w):
    y = f32_accumulated_dot(x.value, w.value)
    return y, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _f32_accumulated_dot_bwd(residuals, g):
    x, w = residuals
    dx = dw = None
    if w is not None:
        dx = jax.lax.dot_general(g.astype(w.dtype), w, (((g.ndim - 1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(w.dtype)
    if x is not None:
        rows = x.reshape(-1, x.shape[-1])
        dw = jax.lax.dot_general(rows, g.reshape(-1, g.shape[-1]).astype(x.dtype), (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(x.dtype)
    return dx, dw


f32_accumulated_dot.defvjp(_f32_accumulated_dot_fwd, _f32_accumulated_dot_bwd, symbolic_zeros=True)


def _dense_dot_general(x, w, dimension_numbers, precision=None):
    """``nn.Dense``'s ``dot_general`` in a low-precision dtype: :func:`f32_accumulated_dot`."""
    return f32_accumulated_dot(x, w)


class Block(nn.Module):
    """A model part configured by `config`, computing in `dtype` and storing `param_dtype`.

    The factory methods create the standard Flax layers (so interceptors on e.g. `nn.Dense`
    see every projection) with Hugging Face initialisers and logical axis names. With a `dtype`
    narrower than float32 (bfloat16), dense layers multiply in it and accumulate and return
    float32 (:func:`f32_accumulated_dot`): the matmuls run at bf16 speed, everything else in fp32.
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
    ) -> nn.Dense:
        """`nn.Dense` with kernel (in, out) named `axes`, N(0, stddev or initializer_range) init."""
        stddev = self.config.initializer_range if stddev is None else stddev
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self._init(nn.initializers.normal(stddev), axes),
            bias_init=self._init(nn.initializers.zeros_init(), axes[1:]),
            dot_general=_dense_dot_general if jnp.finfo(self.dtype).bits < 32 else None,
            **({"name": name} if name else {}),
        )

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
    (:data:`~flaxlora.models.scan.LORA_COLLECTIONS`).
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


def attention_weights(q: Array, k: Array, mask: Array, bias: Array | None = None) -> Array:
    """Softmax attention probabilities, with grouped-query support.

    Args:
      q: (batch, q_len, heads, head_dim) queries, already scaled.
      k: (batch, kv_len, kv_heads, head_dim) keys; heads must be a multiple of kv_heads.
      mask: (batch, q_len or 1, kv_len) bool, True where attending is allowed.
      bias: (batch or 1, heads, q_len, kv_len) added to the scores (T5's position bias), or None.

    Returns:
      (batch, kv_heads, heads // kv_heads, q_len, kv_len) probabilities in q's dtype. A row
      with no allowed key (a left-padding query) gets uniform weights instead of NaN.
    """
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores += bias.reshape(bias.shape[0], kv_heads, h // kv_heads, *bias.shape[2:]).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


def fused_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """``attention_output(attention_weights(q * scale, k, mask), v)`` in one
    ``jax.nn.dot_product_attention`` call (cuDNN flash attention on GPUs where it applies, XLA
    elsewhere), for attention without dropout on its probabilities.

    q (batch, q_len, heads, head_dim), k and v (batch, kv_len, kv_heads, head_dim), mask (batch,
    q_len or 1, kv_len) bool -> (batch, q_len, heads * head_dim).
    """
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    return out.reshape(*out.shape[:2], -1)


def attention_output(probs: Array, v: Array) -> Array:
    """Weighted values: probs (batch, kv_heads, groups, q_len, kv_len) and v (batch, kv_len,
    kv_heads, head_dim) -> (batch, q_len, kv_heads * groups * head_dim), heads in HF order."""
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(*out.shape[:2], -1)


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
