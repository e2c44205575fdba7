"""Architecture configs, built from Hugging Face `config.json` dictionaries.

Field names follow Hugging Face so that `from_hf(json.load(...))` needs no renaming table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from flaxlora.models.layers import ACTIVATIONS

_C = TypeVar("_C")

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")
DECODER_TYPES = ("llama",)
ENCODER_DECODER_TYPES = ("t5",)
# T5 relatives that are refused, and what flaxlora's T5 lacks for them.
UNSUPPORTED_T5 = {
    "mt5": "mT5's multilingual 250k-piece vocabulary layout has no parity test here",
    "umt5": "UMT5 gives every layer its own relative position bias; flaxlora's T5 has only the first "
            "layer's, shared by the others",
}
# What a T5 config.json must give (the rest have T5's defaults).
T5_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def _known_fields(cls: type[_C], hf: Mapping[str, Any], overrides: Mapping[str, Any]) -> _C:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    return cls(**(kwargs | dict(overrides)))


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT-family encoder (BERT, MiniLM; RoBERTa when `model_type` is a RoBERTa type)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    model_type: str = "bert"
    # Not from config.json: activation checkpointing per layer, "none" | "block" | "full"
    # (flaxlora.models.layers.REMAT_POLICIES); the layers under nn.scan (flaxlora.models.scan).
    remat: str = "none"
    scan_layers: bool = False

    @property
    def is_roberta(self) -> bool:
        """RoBERTa: positions start after `pad_token_id`, no pooler, two-layer head."""
        return self.model_type != "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """Most tokens the position table embeds (RoBERTa's positions start after the pad id)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.is_roberta else 0)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
        positions = hf.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise ValueError(f"Unsupported position_embedding_type {positions!r}; supported: 'absolute'.")
        return _known_fields(cls, hf, overrides)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family decoder (Llama 2/3, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    num_labels: int = 2
    model_type: str = "llama"
    # Not from config.json: activation checkpointing per layer, "none" | "block" | "full"
    # (flaxlora.models.layers.REMAT_POLICIES); the layers under nn.scan (flaxlora.models.scan).
    remat: str = "none"
    scan_layers: bool = False

    @property
    def max_sequence_length(self) -> int:
        """The context length the RoPE model was trained for (there is no position table)."""
        return self.max_position_embeddings

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Reads both the transformers 4 (`rope_theta`, `rope_scaling`) and 5
        (`rope_parameters`) spellings of the RoPE settings."""
        rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"Unsupported RoPE type {rope_type!r}; supported: 'default', 'llama3'.")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=rope["factor"],
                low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
        rope_fields = {"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                       "rope_scaling": scaling}
        hf = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
        return _known_fields(cls, hf, rope_fields | overrides)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5-family encoder-decoder (T5 v1.0, T5 v1.1, Flan-T5), in Hugging Face's field names.

    `feed_forward_proj` is 'relu' (v1.0) or 'gated-gelu' (v1.1, Flan-T5), from which Hugging
    Face derives `dense_act_fn` and `is_gated_act`. `tie_word_embeddings`: the LM head is the
    shared embedding table (else an `lm_head` of its own); `scale_decoder_outputs`: decoder
    states are multiplied by d_model**-0.5 before the LM head (default: tie_word_embeddings, as
    in T5 v1.0; transformers 5 writes it to config.json).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    classifier_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None
    num_labels: int = 2
    model_type: str = "t5"
    # Not from config.json: activation checkpointing per block, "none" | "block" | "full"
    # (flaxlora.models.layers.REMAT_POLICIES).
    remat: str = "none"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"Unsupported feed_forward_proj {self.feed_forward_proj!r}; expected "
                             "'ACT' or 'gated-ACT', e.g. 'relu' (T5) or 'gated-gelu' (T5 v1.1).")
        defaults = {"num_decoder_layers": self.num_layers, "scale_decoder_outputs": self.tie_word_embeddings,
                    "decoder_start_token_id": self.pad_token_id}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward activation; 'gated-gelu' means the tanh approximation, as in HF."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> T5Config:
        """Raises ValueError for mT5 / UMT5 and for a config lacking a required field."""
        model_type = hf.get("model_type")
        if model_type in UNSUPPORTED_T5:
            raise ValueError(f"Unsupported T5 variant model_type={model_type!r}: {UNSUPPORTED_T5[model_type]}. "
                             f"Supported: {', '.join(ENCODER_DECODER_TYPES)} (T5, T5 v1.1, Flan-T5).")
        missing = [k for k in T5_REQUIRED if hf.get(k) is None]
        if missing:
            raise ValueError(f"The T5 config lacks {', '.join(missing)}: a T5 config.json gives "
                             f"{', '.join(T5_REQUIRED)}.")
        if isinstance(hf.get("eos_token_id"), list):
            raise ValueError(f"The T5 config has several eos_token_id {hf['eos_token_id']}; one is needed "
                             "(the classifier pools the last eos token).")
        config = _known_fields(cls, hf, overrides)
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"Unsupported feed_forward_proj {config.feed_forward_proj!r}: activation "
                             f"{config.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}.")
        return config
