"""Zero- and few-shot prompting of an instruct decoder: the untuned-LLM baseline on QQP.

Each pair becomes a chat (ChatML, as SmolLM2-Instruct uses) asking whether the two questions
mean the same; the answer is read from the next-token logits of "Yes" and "No" after the
assistant turn opens, so nothing is generated. Few-shot prompts put ``shots`` labelled training
pairs (half duplicates) before the question as earlier user/assistant turns.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.data.batching import default_buckets, inference_batches
from flaxlora.data.tokenize import EncodedPairs
from flaxlora.models.llama import last_token

INSTRUCTION = "Do these two questions ask the same thing? Answer Yes or No.\nQuestion 1: {q1}\nQuestion 2: {q2}"


def _turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def chat_prompt(q1: str, q2: str, demonstrations: Sequence[tuple[str, str, int]] = ()) -> str:
    """The ChatML text up to the assistant's answer for pair (q1, q2) after the demonstrations."""
    turns = [_turn("system", "You are a helpful AI assistant.")]
    for d1, d2, label in demonstrations:
        turns += [_turn("user", INSTRUCTION.format(q1=d1, q2=d2)), _turn("assistant", "Yes" if label else "No")]
    turns.append(_turn("user", INSTRUCTION.format(q1=q1, q2=q2)))
    return "".join(turns) + "<|im_start|>assistant\n"


def pick_demonstrations(q1s, q2s, labels, shots: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """``shots`` labelled pairs, half of them duplicates, in a seeded random order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), (shots + 1 - c) // 2, replace=False) for c in (1, 0)])
    return [(q1s[i], q2s[i], int(labels[i])) for i in rng.permutation(chosen)]


def yes_no_margin(pretrained, prompts: Sequence[str], batch_size: int = 16, max_length: int = 1024) -> np.ndarray:
    """(n,) logit("Yes") - logit("No") of the next token after each prompt.

    ``pretrained`` is a decoder from :func:`flaxlora.load_pretrained` with tied embeddings (the
    output layer is the embedding table).
    """
    if pretrained.kind != "decoder" or not pretrained.config.tie_word_embeddings:
        raise ValueError("prompting needs a decoder with tied embeddings (e.g. smollm2-135m)")
    tokenizer = pretrained.tokenizer
    yes, no = (tokenizer(w, add_special_tokens=False).input_ids for w in ("Yes", "No"))
    if len(yes) != 1 or len(no) != 1:
        raise ValueError("'Yes' and 'No' must be single tokens for this tokenizer")
    table = pretrained.params["model"]["embed_tokens"]["embedding"]
    answers = jnp.stack([table[yes[0]], table[no[0]]])  # (2, hidden)

    @jax.jit
    def margin(params, ids, mask):
        hidden = pretrained.model.apply({"params": params}, ids, mask, method="hidden_states")
        scores = last_token(hidden, mask) @ answers.T.astype(hidden.dtype)
        return scores[:, 0] - scores[:, 1]

    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    longest = max(map(len, encoded))
    if longest > max_length:
        raise ValueError(f"a prompt has {longest} tokens > max_length {max_length}")
    buckets = default_buckets(max(64, 1 << (longest - 1).bit_length()), num_buckets=4, multiple=32)
    out = np.zeros(len(prompts), np.float32)
    for rows, batch in inference_batches(EncodedPairs.from_rows(encoded, tokenizer.pad_token_id), batch_size, buckets):
        out[rows] = np.asarray(margin(pretrained.params, batch["input_ids"], batch["attention_mask"]))[: len(rows)]
    return out
