"""Quantized frozen weights as pytrees: NF4 (QLoRA), int8, and GGUF blocks kept as stored.

A :class:`QuantizedArray` stands in for a 2-D Dense kernel ``(in, out)`` in a params tree: its
codes and scales are its pytree children (so it is jitted, sharded and placed like any array),
the scheme and logical shape are static. :func:`dequantize_weight` gives the float32 kernel.

Schemes:
  ``nf4``    Dettmers et al. 2023 (QLoRA): 4-bit NormalFloat codes (:data:`NF4_CODEBOOK`), two per
             byte along the input axis, one absmax per block of 64 inputs of each output column;
             ``nf4-dq`` quantizes those absmaxes again (int8 per block of 256 after subtracting
             their mean: about 4.13 bits per weight instead of 4.5).
  ``int8``   per-output-channel absmax: ``codes * scale[out]``.
  ``q4_0``, ``q4_1``, ``q8_0``  llama.cpp's blocks of 32 along each row of the (out, in) matrix,
             exactly as the GGUF file stores them (fp16 scale [and minimum], 4- or 8-bit codes):
             the weights llama.cpp computes with, never dequantised and requantised.
  ``q4_k``, ``q5_k``, ``q6_k``  llama.cpp's K-quants (what Q4_K_M / Q5_K_M / Q6_K files hold):
             super-blocks of 256 along each row, with 6-bit (q4_k, q5_k: scale and minimum) or
             8-bit (q6_k: scale) sub-block scales under one fp16 scale [and minimum], as stored.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxlora.dataflow import computed_after

# QLoRA's NormalFloat4: 8 positive and 7 negative quantiles of N(0, 1) (the two halves drawn
# separately so that 0 is exact), scaled to [-1, 1]; the values of bitsandbytes' NF4 table.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64  # inputs per absmax
SCALE_BLOCK = 256  # absmaxes per second-level scale (double quantization)
GGUF_SCHEMES = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")
SCHEMES = ("nf4", "nf4-dq", "int8", *GGUF_SCHEMES)


class QuantizedArray(struct.PyTreeNode):
    """A quantized stand-in for a float (in, out) kernel.

    Attributes:
      data: the codes and scales (arrays; names and layouts per ``scheme``).
      scheme: one of :data:`SCHEMES`.
      shape: the (in, out) shape of the kernel it stands for.
    """

    data: dict[str, jax.Array]
    scheme: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    is_quantized_weight = True  # one leaf for flaxlora.pytree (its paths name weights, not codes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.data))

    def astype(self, dtype) -> jax.Array:
        return dequantize_weight(self).astype(dtype)

    def data_shardings(self, weight: jax.sharding.Sharding) -> dict[str, jax.sharding.Sharding]:
        """Where each of the codes and scales goes for a weight that would be placed with
        ``weight``: split along the same mesh axes as the weight's (in, out) dimensions (an axis
        that does not divide a dimension is dropped there); second-level scales replicated."""
        if not isinstance(weight, jax.sharding.NamedSharding):
            return dict.fromkeys(self.data, weight)
        mesh, (axis_in, axis_out) = weight.mesh, (*tuple(weight.spec), None, None)[:2]
        roles = {"in": axis_in, "out": axis_out, None: None}

        def place(leaf: jax.Array, dims: tuple[str | None, ...]) -> jax.sharding.NamedSharding:
            axes = []
            for size, dim in zip(leaf.shape, (*dims, *(None,) * leaf.ndim)):
                axis = roles[dim]
                names = (axis,) if isinstance(axis, str) else tuple(axis or ())
                axes.append(axis if names and size % math.prod(mesh.shape[n] for n in names) == 0 else None)
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

        return {k: place(v, _LAYOUTS.get(k, ())) for k, v in self.data.items()}


# The (in, out) dimension each axis of a code or scale array runs along (for its sharding).
_LAYOUTS = {"codes": ("in", "out"), "absmax": ("in", "out"), "scale": ("out",),
            "d": ("out", "in"), "m": ("out", "in"), "dmin": ("out", "in"),
            "qs": ("out", "in", None), "ql": ("out", "in", None), "qh": ("out", "in", None),
            "scales": ("out", "in", None)}


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


# ------------------------------------------------------------------------------------ NF4 / int8


def _nf4_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(packed codes (in/2, out) uint8, absmax (in/64, out) f32) of ``w`` (in, out)."""
    n_in, n_out = w.shape
    blocks = w.astype(jnp.float32).reshape(n_in // NF4_BLOCK, NF4_BLOCK, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normalized = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None, :]
    book = jnp.asarray(NF4_CODEBOOK)
    idx = jnp.searchsorted((book[1:] + book[:-1]) / 2, normalized.reshape(n_in, n_out)).astype(jnp.uint8)
    packed = idx[0::2] | (idx[1::2] << 4)
    return packed, absmax


def _double_quantize(absmax: jax.Array) -> dict[str, jax.Array]:
    flat = absmax.reshape(-1)
    mean = jnp.mean(flat)
    pad = -flat.size % SCALE_BLOCK
    centred = jnp.pad(flat - mean, (0, pad)).reshape(-1, SCALE_BLOCK)
    step = jnp.max(jnp.abs(centred), axis=1) / 127
    codes = jnp.round(centred / jnp.where(step == 0, 1.0, step)[:, None]).astype(jnp.int8)
    return {"absmax_codes": codes, "absmax_step": step, "absmax_mean": mean}


def _absmax(data: dict[str, jax.Array], shape: tuple[int, int]) -> jax.Array:
    if "absmax" in data:
        return data["absmax"]
    n = (shape[0] // NF4_BLOCK) * shape[1]
    flat = data["absmax_codes"].astype(jnp.float32) * data["absmax_step"][:, None] + data["absmax_mean"]
    return flat.reshape(-1)[:n].reshape(shape[0] // NF4_BLOCK, shape[1])


def quantize_weight(w: jax.Array, scheme: str) -> QuantizedArray:
    """``w`` (in, out) quantized with ``scheme`` (``nf4``, ``nf4-dq`` or ``int8``; GGUF blocks come
    from the file: :func:`from_gguf_blocks`). Jit-able.

    Raises ValueError for an unknown scheme, a weight that is not 2-D, or (NF4) an input width that
    is not a multiple of 64.
    """
    if scheme not in ("nf4", "nf4-dq", "int8"):
        raise ValueError(f"cannot quantize a float weight as {scheme!r}: choose nf4, nf4-dq or int8 "
                         f"({', '.join(GGUF_SCHEMES)} are read from a GGUF file as stored)")
    if w.ndim != 2:
        raise ValueError(f"only 2-D (in, out) kernels are quantized, got shape {w.shape}")
    shape = tuple(w.shape)
    if scheme == "int8":
        scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) / 127
        codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
        return QuantizedArray({"codes": codes, "scale": scale}, scheme, shape)
    if shape[0] % NF4_BLOCK:
        raise ValueError(f"NF4 needs an input width that is a multiple of {NF4_BLOCK}, got {shape}")
    packed, absmax = _nf4_codes(w)
    data = {"codes": packed, **(_double_quantize(absmax) if scheme == "nf4-dq" else {"absmax": absmax})}
    return QuantizedArray(data, scheme, shape)


# ------------------------------------------------------------------------------------------ GGUF

# Each GGML type kept as stored: (our scheme, elements per block, its fields in storage order as
# (name, bytes, numpy dtype)). Every field becomes a (out, in / block, ...) array of the same name.
_F16, _U8, _I8 = np.float16, np.uint8, np.int8
_GGUF_LAYOUTS = {
    "Q4_0": ("q4_0", 32, (("d", 2, _F16), ("qs", 16, _U8))),
    "Q4_1": ("q4_1", 32, (("d", 2, _F16), ("m", 2, _F16), ("qs", 16, _U8))),
    "Q8_0": ("q8_0", 32, (("d", 2, _F16), ("qs", 32, _I8))),
    "Q4_K": ("q4_k", 256, (("d", 2, _F16), ("dmin", 2, _F16), ("scales", 12, _U8), ("qs", 128, _U8))),
    "Q5_K": ("q5_k", 256, (("d", 2, _F16), ("dmin", 2, _F16), ("scales", 12, _U8), ("qh", 32, _U8),
                           ("qs", 128, _U8))),
    "Q6_K": ("q6_k", 256, (("ql", 128, _U8), ("qh", 64, _U8), ("scales", 16, _I8), ("d", 2, _F16))),
}
GGUF_TYPES = tuple(_GGUF_LAYOUTS)


def gguf_scheme(type_name: str) -> str | None:
    """Our scheme for a GGML type name (``"Q4_1"`` -> ``"q4_1"``); None where it is not kept as stored."""
    return _GGUF_LAYOUTS[type_name][0] if type_name in _GGUF_LAYOUTS else None


def from_gguf_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedArray:
    """A kernel of ``shape`` (in, out) from a GGUF tensor's raw blocks ``raw`` (out rows x bytes, as
    the file stores them, rows already in Hugging Face order), kept exactly as stored."""
    if type_name not in _GGUF_LAYOUTS:
        raise ValueError(f"GGUF type {type_name} is not kept as stored (supported: {', '.join(GGUF_TYPES)}): use "
                         "--quantize nf4 (dequantised from the file, then NF4) or no --quantize")
    scheme, block, fields = _GGUF_LAYOUTS[type_name]
    n_in, n_out = shape
    blocks = np.ascontiguousarray(raw).reshape(n_out, n_in // block, -1)
    data, offset = {}, 0
    for name, size, dtype in fields:
        field = blocks[..., offset:offset + size].copy().view(dtype)
        data[name], offset = (field[..., 0] if dtype == _F16 else field), offset + size
    return QuantizedArray(data, scheme, shape)


def _nibbles(qs: jax.Array, group: int) -> jax.Array:
    """(..., n / group, 2, group) low then high nibbles of each run of ``group`` bytes of ``qs`` (..., n)."""
    runs = qs.reshape(*qs.shape[:-1], -1, 1, group)
    return jnp.concatenate([runs & 0x0F, runs >> 4], axis=-2)


def _k_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 8 six-bit sub-block scales and minimums packed in 12 bytes (q4_k, q5_k), as float32."""
    d, m, md = jnp.split(scales.reshape(*scales.shape[:-1], 3, 4), 3, axis=-2)
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(*scales.shape[:-1], 8).astype(jnp.float32), mn.reshape(*scales.shape[:-1], 8).astype(jnp.float32)


def _gguf_rows(q: QuantizedArray) -> jax.Array:
    """The (out, in) float32 matrix of GGUF blocks, with ggml's arithmetic (that of gguf's
    ``dequantize``, operation for operation, so the values agree bit for bit)."""
    data, f32 = q.data, jnp.float32
    d = data["d"].astype(f32)[..., None]
    if q.scheme == "q8_0":
        w = data["qs"].astype(f32) * d
    elif q.scheme in ("q4_0", "q4_1"):  # 16 bytes: elements 0-15 in their low, 16-31 in their high nibbles
        nibbles = _nibbles(data["qs"], 16).reshape(*data["qs"].shape[:-1], 32)
        if q.scheme == "q4_0":
            w = d * (nibbles.astype(jnp.int8) - 8).astype(f32)
        else:
            w = d * nibbles.astype(f32) + data["m"].astype(f32)[..., None]
    elif q.scheme == "q6_k":  # 16 sub-blocks of 16, int8 scales; 4 low bits in ql, 2 high in qh
        low = _nibbles(data["ql"], 64).reshape(*data["ql"].shape[:-1], 8, 32)
        runs = data["qh"].reshape(*data["qh"].shape[:-1], 2, 1, 32)
        high = jnp.concatenate([(runs >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-2).reshape(low.shape)
        codes = ((low | (high << 4)).astype(jnp.int8) - 32).reshape(*low.shape[:-2], 16, 16).astype(f32)
        w = (d * data["scales"].astype(f32))[..., None] * codes
    else:  # q4_k, q5_k: 8 sub-blocks of 32 with a 6-bit scale and minimum each
        sc, mn = _k_scales(data["scales"])
        codes = _nibbles(data["qs"], 32).reshape(*data["qs"].shape[:-1], 8, 32)
        if q.scheme == "q5_k":
            runs = data["qh"].reshape(*data["qh"].shape[:-1], 1, 32)
            codes = codes | (jnp.concatenate([(runs >> s) & 0x01 for s in range(8)], axis=-2) << 4)
        w = (d * sc)[..., None] * codes.astype(f32) - (data["dmin"].astype(f32)[..., None] * mn)[..., None]
    return w.reshape(q.shape[1], q.shape[0])


# ------------------------------------------------------------------------------------- decoding


def dequantize_weight(q: QuantizedArray, after: jax.Array | None = None) -> jax.Array:
    """The float32 (in, out) kernel ``q`` stands for. Jit-able.

    after: an array the result must not be computed before (a layer's input): its first value
      times zero is added to every code and scale, so XLA can neither schedule any part of the
      decoding earlier nor share it with a decoding that follows another array (the forward and
      backward passes of a layer).
    """
    if after is not None:
        q = q.replace(data={k: computed_after(v, after) for k, v in q.data.items()})
    if q.scheme in GGUF_SCHEMES:
        return _gguf_rows(q).T
    if q.scheme == "int8":
        return q.data["codes"].astype(jnp.float32) * q.data["scale"]
    n_in, n_out = q.shape
    codes = q.data["codes"]
    idx = jnp.stack([codes & 0x0F, codes >> 4], axis=1).reshape(n_in, n_out)
    values = jnp.asarray(NF4_CODEBOOK)[idx].reshape(n_in // NF4_BLOCK, NF4_BLOCK, n_out)
    return (values * _absmax(q.data, q.shape)[:, None, :]).reshape(n_in, n_out)
