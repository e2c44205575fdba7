"""Interop with PyTorch: PEFT LoRA adapter folders and merged Hugging Face model folders.

    save_peft(folder, params, lora, config, extras)   # for peft.PeftModel.from_pretrained(base, folder)
    adapter = load_peft(folder, params)               # a PEFT adapter saved in PyTorch, checked
    fine_tuned = adapter.merged(params)               # = merge_pretrained(params, lora, config, extras)
    save_merged(folder, pretrained, fine_tuned, labels)  # for AutoModelForSequenceClassification

``python -m flaxlora.export`` does the same from a training run's checkpoint, and writes a model
card (README.md, :mod:`flaxlora.interop.card`) into either folder.
"""

from flaxlora.interop.merged import classification_pad_token, hf_config, save_merged
from flaxlora.interop.peft import PeftAdapter, load_peft, save_peft

__all__ = ["PeftAdapter", "classification_pad_token", "hf_config", "load_peft", "save_merged",
           "save_peft"]
