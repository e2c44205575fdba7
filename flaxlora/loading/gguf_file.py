"""llama.cpp GGUF files: dequantised Llama weights under Hugging Face names, the config and the
byte-level BPE tokenizer rebuilt from the file's metadata."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp pre-tokenizer names -> how text is split before byte-level BPE.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
Index = tuple[slice, ...]


def hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names unchanged."""
    base, leaf = name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}" if part in _LAYER_NAMES else name
    return f"{_TOP_NAMES[base]}.{leaf}" if base in _TOP_NAMES else name


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order (per head, the rows of the two halves of head_dim are
    interleaved for its pairwise RoPE) into the rotate-half order of Hugging Face Llama."""
    out_features = w.shape[0]
    return (w.reshape(num_heads, out_features // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFFile:
    """A GGUF file of a Llama-architecture model."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader  # optional dependency: flaxlora[gguf]

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No GGUF file at {self.path}.")
        self.reader = GGUFReader(self.path)

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> dict[str, Any]:
        """A Hugging Face style config dict from the metadata."""
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ValueError(f"Unsupported architecture in {self.path}: general.architecture={arch!r}. "
                             "Supported GGUF architectures: llama.")
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise ValueError(f"{self.path} uses Llama 3 RoPE scaling (rope_freqs), which is not read "
                             "from GGUF; load the Hugging Face folder instead.")
        heads = self.field("llama.attention.head_count")
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.field("llama.vocab_size") or len(self.field("tokenizer.ggml.tokens")),
            "hidden_size": self.field("llama.embedding_length"),
            "intermediate_size": self.field("llama.feed_forward_length"),
            "num_hidden_layers": self.field("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.field("llama.attention.head_count_kv", heads),
            "head_dim": self.field("llama.attention.key_length"),
            "max_position_embeddings": self.field("llama.context_length"),
            "rms_norm_eps": self.field("llama.attention.layer_norm_rms_epsilon"),
            "rope_theta": self.field("llama.rope.freq_base", 10000.0),
            "tie_word_embeddings": "output.weight" not in names,
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
        }

    @functools.cached_property
    def _index(self) -> dict[str, Any]:
        """{HF name: gguf ReaderTensor (its ``data`` a memory map of the file)}."""
        return {hf_name(t.name): t for t in self.reader.tensors}

    @functools.cached_property
    def _heads(self) -> dict[str, int]:
        """Heads of the projections whose rows llama.cpp permutes."""
        cfg = self.config()
        return {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF name: shape in HF (out, in) layout}, from the file's tensor infos alone."""
        return {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self._index.items()}

    def _row_order(self, name: str) -> np.ndarray:
        """The file's row of each Hugging Face row of 2-D tensor ``name`` (q/k rows are permuted)."""
        order = np.arange(self.shapes()[name][0])
        projection = name.rsplit(".", 2)[-2]
        return unpermute_rows(order, self._heads[projection]) if projection in self._heads else order

    def tensor_type(self, name: str) -> str:
        """The GGML type name a tensor is stored as (``"Q4_K"``, ``"F32"``, ...), from its header."""
        return self._index[name].tensor_type.name

    def read_blocks(self, name: str) -> tuple[str, np.ndarray]:
        """(GGML type name, the tensor's raw rows as stored: (out, bytes) uint8, in Hugging Face row
        order) of a 2-D tensor, for keeping its quantized blocks as they are."""
        return self.tensor_type(name), np.asarray(self._index[name].data)[self._row_order(name)].view(np.uint8)

    def read(self, name: str, index: Index = ()) -> np.ndarray:
        """``tensor[index]`` in HF layout, float32: only the rows of the slice are read and
        dequantised (blocks run along the rows); q/k rows are put back in Hugging Face's order."""
        from gguf.quants import dequantize

        t, shape = self._index[name], self.shapes()[name]
        if len(shape) == 1:
            return np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)[index]
        rows, cols = (*index, slice(None), slice(None))[:2]
        picked = self._row_order(name)[rows]
        w = dequantize(np.asarray(t.data[picked]), t.tensor_type).reshape(len(picked), shape[1])
        return np.asarray(w[:, cols], np.float32)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The byte-level BPE tokenizer described by the `tokenizer.ggml.*` metadata."""
        kind, pre = self.field("tokenizer.ggml.model"), self.field("tokenizer.ggml.pre", "gpt2")
        if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
            raise ValueError(f"Unsupported GGUF tokenizer in {self.path}: model={kind!r}, pre={pre!r}. "
                             f"Supported: model 'gpt2' (byte-level BPE) with pre {sorted(_PRE_TOKENIZERS)}.")
        tokens = self.field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ")) for m in self.field("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        types = self.field("tokenizer.ggml.token_type", [])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
        tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

        def special(key: str) -> str | None:
            index = self.field(f"tokenizer.ggml.{key}_token_id")
            return None if index is None else tokens[index]

        bos, eos = special("bos"), special("eos")
        if self.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, tokens.index(bos))])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=special("unknown"),
            pad_token=special("padding") or eos, padding_side="right",
            model_input_names=["input_ids", "attention_mask"])
