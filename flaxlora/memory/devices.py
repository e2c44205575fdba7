"""Accelerators' memory and dense matmul peaks, for MFU and for what fits where.

Peaks are the vendors' dense (not 2:4-sparse) matmul figures per chip; memory is the chip's HBM.

    device_named("NVIDIA H100 80GB HBM3")   # jax's device_kind or torch.cuda.get_device_name()
    -> Device("H100", memory_bytes=80 GiB, peak_flops={"bfloat16": 989e12, "float32": 67e12}, ...)
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator chip.

    kinds: lower-case substrings of jax's ``device_kind`` (or torch's device name) that name it;
    memory_bytes: its HBM; peak_flops: dense matmul FLOP/s by compute dtype (a TPU multiplies
    float32 as several bf16 passes: no float32 entry); source: where the figures are from.
    """

    name: str
    kinds: tuple[str, ...]
    memory_bytes: int
    peak_flops: dict[str, float]
    source: str

    def peak(self, dtype: str) -> tuple[float, str]:
        """(peak FLOP/s for ``dtype``, the dtype that peak is for): bfloat16's where ``dtype`` has none."""
        return (self.peak_flops[dtype], dtype) if dtype in self.peak_flops else (self.peak_flops["bfloat16"], "bfloat16")


_HOPPER = {"bfloat16": 989e12, "float32": 67e12}  # BF16 Tensor Core 1,979 TFLOPS with sparsity; FP32 67 TFLOPS

# Most specific first: "h200" before "h100", "v5 lite" before "v5".
DEVICES = (
    Device("H200", ("h200",), 141 * GIB, _HOPPER,
           "https://www.nvidia.com/en-us/data-center/h200/ (Hopper SXM: the H100's compute, 141 GB HBM3e)"),
    Device("H100", ("h100",), 80 * GIB, _HOPPER, "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM)"),
    Device("A100", ("a100",), 80 * GIB, {"bfloat16": 312e12, "float32": 19.5e12},
           "https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM)"),
    Device("TPU v5e", ("v5 lite", "v5e", "v5litepod"), 16 * GIB, {"bfloat16": 197e12}, "https://cloud.google.com/tpu/docs/v5e"),
    Device("TPU v5p", ("v5p", "tpu v5"), 95 * GIB, {"bfloat16": 459e12}, "https://cloud.google.com/tpu/docs/v5p"),
    Device("TPU v6e", ("v6 lite", "v6e"), 32 * GIB, {"bfloat16": 918e12}, "https://cloud.google.com/tpu/docs/v6e"),
    Device("TPU v4", ("tpu v4",), 32 * GIB, {"bfloat16": 275e12}, "https://cloud.google.com/tpu/docs/v4"),
)


def device_named(kind: str) -> Device | None:
    """The :data:`DEVICES` entry whose ``kinds`` occur in ``kind`` (case-insensitive), or None."""
    kind = kind.lower()
    return next((d for d in DEVICES if any(k in kind for k in d.kinds)), None)
