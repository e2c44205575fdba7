"""Loading pretrained backbones: Hugging Face folders, hub ids, GGUF files, short names.

    pretrained = load_pretrained("minilm-l6", num_labels=2)
    batch = pretrained.tokenizer(questions1, questions2, padding=True, return_tensors="np")
    logits = pretrained.model.apply({"params": pretrained.params}, batch["input_ids"],
                                    batch["attention_mask"], batch.get("token_type_ids"))
"""

from flaxlora.loading.convert import params_from_hf, to_hf
from flaxlora.loading.gguf_file import GGUFFile
from flaxlora.loading.hf_folder import HFFolder
from flaxlora.loading.pretrained import (
    Pretrained,
    base_provenance,
    is_gguf,
    load_config,
    load_pretrained,
    load_tokenizer,
)
from flaxlora.loading.registry import known_models

__all__ = ["GGUFFile", "HFFolder", "Pretrained", "base_provenance", "is_gguf", "known_models", "load_config", "load_pretrained",
           "load_tokenizer", "params_from_hf", "to_hf"]
