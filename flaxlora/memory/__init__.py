"""Accelerator memory of a LoRA train step: XLA's account of a compiled step, and a model of it.

    account.py   what a compiled program holds at its peak, by category (:func:`memory_account`)
"""

from flaxlora.memory.account import CATEGORIES, MemoryAccount, memory_account

__all__ = ["CATEGORIES", "MemoryAccount", "memory_account"]
