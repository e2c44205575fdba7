"""flaxlora: pure-functional LoRA fine-tuning for JAX/Flax transformers."""

__version__ = "0.1.0"
