"""Accelerator memory of a LoRA train step: XLA's account of a compiled step, and a model of it.

    account.py   what a compiled program holds at its peak, by kind (:func:`memory_account`)
    model.py     the peak per device predicted from shapes, and the largest batch that fits
    devices.py   accelerators' memory and dense matmul peaks
"""

from flaxlora.memory.account import CATEGORIES, MemoryAccount, memory_account
from flaxlora.memory.devices import DEVICES, Device, device_named
from flaxlora.memory.model import MemoryEstimate, estimate_memory, largest_batch

__all__ = ["CATEGORIES", "DEVICES", "Device", "MemoryAccount", "MemoryEstimate", "device_named", "estimate_memory",
           "largest_batch", "memory_account"]
