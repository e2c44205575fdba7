"""Question pairs to token ids, for encoders (pair template) and decoders (prompt), cached on disk.

``pair_format="template"`` uses the tokenizer's own pair template (BERT: ``[CLS] q1 [SEP] q2
[SEP]`` with token_type_ids 0/1; T5: ``q1 </s> q2 </s>``, all 0), truncated longest-first, as
``tokenizer(q1, q2)`` encodes a pair. ``pair_format="prompt"`` is for decoder tokenizers with no
pair template: whatever the tokenizer puts in front of a single sequence (e.g. BOS), then
``PROMPT`` filled with the two questions (truncated longest-first to fit), then the EOS token,
whose position the classifier pools; token_type_ids are all 0. ``pair_format="text"`` is the
same with the T5 paper's GLUE QQP input ``T5_PROMPT``, ``qqp question1: q1 question2: q2</s>``,
for text-to-text T5.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PairFormat = Literal["template", "prompt", "text"]
PAIR_FORMATS = get_args(PairFormat)
# The prompt around the two questions; each question is tokenised with a leading space.
PROMPT = ("Question 1:", "\nQuestion 2:", "\nDuplicate?")
# The T5 paper's text-to-text input for GLUE QQP (Raffel et al. 2020, appendix D).
T5_PROMPT = ("qqp question1:", " question2:", "")
PROMPTS = {"prompt": PROMPT, "text": T5_PROMPT}
# Model kind (flaxlora.loading.Pretrained.kind) -> pair format.
KIND_FORMATS: dict[str, PairFormat] = {"encoder": "template", "encoder-decoder": "template", "decoder": "prompt",
                                       "text-to-text": "text"}
CACHE_ENV = "FLAXLORA_CACHE_DIR"
_CACHE_VERSION = 1
_CHUNK = 1024
_LONG = 4  # questions of more than _LONG * max_length bytes are encoded by _encode_long_pairs
_FIELDS = ("input_ids", "token_type_ids", "lengths", "labels")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPairs:
    """Tokenised pairs, unpadded and stored end to end.

    Example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``; its attention mask is all ones
    (``pad`` makes the padded arrays).

    Attributes:
      input_ids: (total,) int32 token ids of all examples.
      token_type_ids: (total,) int32 segment ids.
      lengths: (n,) int32 tokens per example, each <= the max_length encoded with.
      labels: (n,) int32, -1 when unlabelled.
      pad_id: the id that ``pad`` fills with (the tokenizer's pad token, else 0).
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    pad_id: int

    @classmethod
    def from_rows(
        cls, ids: Sequence[Sequence[int]], pad_id: int, types: Sequence[Sequence[int]] | None = None,
        labels: np.ndarray | None = None,
    ) -> "EncodedPairs":
        """From per-example token id lists; ``types`` default to 0, ``labels`` to -1 (unlabelled)."""
        return cls(
            input_ids=_flatten(ids),
            token_type_ids=_flatten(types) if types is not None else np.zeros(sum(map(len, ids)), np.int32),
            lengths=np.array([len(x) for x in ids], dtype=np.int32),
            labels=np.full(len(ids), -1, np.int32) if labels is None else labels,
            pad_id=pad_id,
        )

    @classmethod
    def concatenate(cls, parts: Sequence["EncodedPairs"]) -> "EncodedPairs":
        """The examples of ``parts`` (one tokenizer's, so one pad id), in order."""
        fields = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS}
        return cls(**fields, pad_id=parts[0].pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(n + 1,) int64 start of each example in the flat arrays, then the total."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def pad(self, indices: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        """Examples ``indices`` (b,) right-padded to (b, seq_len): input_ids, attention_mask,
        token_type_ids, all int32."""
        lengths = self.lengths[indices]
        if lengths.size and lengths.max() > seq_len:
            raise ValueError(f"an example of length {lengths.max()} does not fit seq_len {seq_len}")
        positions = np.arange(seq_len)
        mask = positions[None, :] < lengths[:, None]
        flat = np.where(mask, self.offsets[indices][:, None] + positions[None, :], 0)
        return {
            "input_ids": np.where(mask, self.input_ids[flat], self.pad_id).astype(np.int32),
            "attention_mask": mask.astype(np.int32),
            "token_type_ids": np.where(mask, self.token_type_ids[flat], 0).astype(np.int32),
        }


def pair_format_for(kind: str) -> PairFormat:
    """The pair format of a model kind: ``"template"`` for encoders and the T5 classifier,
    ``"prompt"`` for decoders, ``"text"`` for text-to-text T5."""
    return KIND_FORMATS[kind]


def default_cache_dir() -> Path:
    """``$FLAXLORA_CACHE_DIR`` if set, else ``~/.cache/flaxlora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flaxlora")


def longest_first(len1: np.ndarray, len2: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths (n,) to keep of two (n,) sequences so each pair fits ``budget``, cutting the longer.

    A pair that fits is kept; otherwise the shorter keeps everything if it fits in half the
    budget and the longer takes the rest, else the first gets ceil(budget / 2) and the second
    floor(budget / 2).
    """
    fits = len1 + len2 <= budget
    keep1 = np.minimum(len1, np.maximum(budget - len2, (budget + 1) // 2))
    return np.where(fits, len1, keep1), np.where(fits, len2, budget - keep1)


def _ids(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _leading_special_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids the tokenizer adds in front of a single sequence (e.g. [BOS]; often none)."""
    plain = tokenizer(PROMPT[0], add_special_tokens=False)["input_ids"]
    full = tokenizer(PROMPT[0])["input_ids"]
    starts = (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
    return full[: next(starts, 0)]


def hf_longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Tokens of each question that Hugging Face tokenizers' ``"longest_first"`` pair truncation
    keeps: all if they fit, else the shorter keeps up to half (ties: the first is the shorter)
    and the longer the rest."""
    if n1 + n2 <= budget:
        return n1, n2
    short, long = sorted((n1, n2))
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    kept = (long, short) if n1 > n2 else (short, long)
    return min(n1, kept[0]), min(n2, kept[1])


def _encode_long_pairs(
    tokenizer: PreTrainedTokenizerFast, q1s: Sequence[str], q2s: Sequence[str], max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """What ``_encode_template`` gives, for pairs with long questions.

    The pair truncation of Hugging Face tokenizers forms every overflowing window of both
    questions and every pair of them, quadratic in their lengths (two 10k-token questions take
    GBs); here the pairs are encoded whole, linear in their lengths, and the tokens that
    truncation would remove are dropped from the end of each question.
    """
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    out = tokenizer(list(q1s), list(q2s), return_token_type_ids=True, return_attention_mask=False, verbose=False)
    ids, types = [], []
    for row in range(len(q1s)):
        sequence = out.sequence_ids(row)  # None for template tokens, 0 / 1 for the questions
        keep = hf_longest_first(sequence.count(0), sequence.count(1), budget)
        seen = [0, 0]
        chosen = []
        for i, s in enumerate(sequence):
            if s is not None:
                seen[s] += 1
            if s is None or seen[s] <= keep[s]:
                chosen.append(i)
        ids.append([out["input_ids"][row][i] for i in chosen])
        types.append([out["token_type_ids"][row][i] for i in chosen])
    return ids, types


def _encode_template(
    tokenizer: PreTrainedTokenizerFast, q1s: Sequence[str], q2s: Sequence[str], max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    ids: list[list[int]] = [[] for _ in q1s]
    types: list[list[int]] = [[] for _ in q1s]
    # A question of more UTF-8 bytes (a token holds at least one) than _LONG * max_length may
    # hold so many more tokens than max_length that Hugging Face's truncation blows up.
    is_long = [max(len(q1.encode()), len(q2.encode())) > _LONG * max_length for q1, q2 in zip(q1s, q2s)]
    for long in (False, True):
        rows = [i for i, flag in enumerate(is_long) if flag == long]
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            a, b = [q1s[i] for i in chunk], [q2s[i] for i in chunk]
            if long:
                chunk_ids, chunk_types = _encode_long_pairs(tokenizer, a, b, max_length)
            else:
                out = tokenizer(a, b, truncation="longest_first", max_length=max_length, return_token_type_ids=True,
                                return_attention_mask=False)
                chunk_ids, chunk_types = out["input_ids"], out["token_type_ids"]
            for i, row_ids, row_types in zip(chunk, chunk_ids, chunk_types):
                ids[i], types[i] = row_ids, row_types
    return ids, types


def _encode_prompt(
    tokenizer: PreTrainedTokenizerFast, q1s: Sequence[str], q2s: Sequence[str], max_length: int,
    prompt: tuple[str, str, str] = PROMPT,
) -> tuple[list[list[int]], list[list[int]]]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the prompt {prompt} needs a tokenizer with an eos token")
    head, middle, tail = (_ids(tokenizer, [text])[0] if text else [] for text in prompt)
    head = _leading_special_ids(tokenizer) + head
    tail = tail + [tokenizer.eos_token_id]
    budget = max_length - len(head) - len(middle) - len(tail)
    if budget < 2:
        raise ValueError(f"max_length {max_length} leaves no room for the questions in the prompt")
    ids = []
    for start in range(0, len(q1s), _CHUNK):
        a = _ids(tokenizer, [" " + q for q in q1s[start : start + _CHUNK]])
        b = _ids(tokenizer, [" " + q for q in q2s[start : start + _CHUNK]])
        keep_a, keep_b = longest_first(
            np.array([len(x) for x in a]), np.array([len(x) for x in b]), budget
        )
        ids.extend(
            head + x[:na] + middle + y[:nb] + tail for x, y, na, nb in zip(a, b, keep_a, keep_b)
        )
    return ids, [[0] * len(x) for x in ids]


def _encode(
    tokenizer: PreTrainedTokenizerFast,
    q1s: Sequence[str],
    q2s: Sequence[str],
    labels: np.ndarray,
    max_length: int,
    pair_format: PairFormat,
) -> EncodedPairs:
    if pair_format == "template":
        ids, types = _encode_template(tokenizer, q1s, q2s, max_length)
    else:
        ids, types = _encode_prompt(tokenizer, q1s, q2s, max_length, PROMPTS[pair_format])
    return EncodedPairs.from_rows(ids, _pad_id(tokenizer), types, labels)


def _flatten(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter((t for row in rows for t in row), dtype=np.int32)


def _pad_id(tokenizer: PreTrainedTokenizerFast) -> int:
    return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def _tokenizer_json(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The serialised tokenizer without the truncation/padding state that each call resets."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return {k: v for k, v in state.items() if k not in ("truncation", "padding")}


def fingerprint(
    tokenizer: PreTrainedTokenizerFast,
    q1s: Sequence[str],
    q2s: Sequence[str],
    labels: np.ndarray,
    max_length: int,
    pair_format: PairFormat,
) -> str:
    """A sha256 hex digest of everything the encoding depends on."""
    digest = hashlib.sha256()
    settings = {
        "version": _CACHE_VERSION,
        "tokenizer": _tokenizer_json(tokenizer),
        "special": [tokenizer.eos_token_id, _pad_id(tokenizer), tokenizer.truncation_side],
        "max_length": max_length,
        "pair_format": pair_format,
        "prompt": PROMPTS.get(pair_format),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for texts in (q1s, q2s):
        digest.update(f"|{len(texts)}|".encode())
        for text in texts:
            encoded = text.encode()
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
    digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return digest.hexdigest()


def _load_cached(path: Path, key: str) -> EncodedPairs | None:
    """The cached encoding at ``path``, or None if it is missing, corrupt or for another key."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                raise ValueError("fingerprint mismatch")
            arrays = {name: stored[name] for name in _FIELDS}
            encoded = EncodedPairs(**arrays, pad_id=int(stored["pad_id"]))
        total = len(encoded.input_ids)
        if encoded.offsets[-1] != total or len(encoded.token_type_ids) != total:
            raise ValueError("inconsistent lengths")
        return encoded
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("rebuilding the token cache %s: %s", path, err)
        return None


def _save_cached(path: Path, key: str, encoded: EncodedPairs) -> None:
    """Writes atomically (a reader sees the old file or the whole new one); failures only warn."""
    arrays = {name: getattr(encoded, name) for name in _FIELDS}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.savez(handle, key=np.str_(key), pad_id=np.int64(encoded.pad_id), **arrays)
        os.replace(handle.name, path)
    except OSError as err:
        logger.warning("could not write the token cache %s: %s", path, err)


def encode_pairs(
    tokenizer: PreTrainedTokenizerFast,
    q1s: Sequence[str],
    q2s: Sequence[str],
    max_length: int,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    pair_format: PairFormat = "template",
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> EncodedPairs:
    """Tokenises n question pairs, each to at most ``max_length`` tokens.

    Args:
      tokenizer: a fast tokenizer; with ``"template"`` it must have a pair template.
      q1s, q2s: (n,) first and second questions.
      max_length: the most tokens per pair, special and prompt tokens included.
      labels: (n,) 0/1 labels, or None for unlabelled (stored as -1).
      pair_format: ``"template"`` (encoders, T5 classifier), ``"prompt"`` (decoders) or
        ``"text"`` (text-to-text T5); see the module doc.
      cache_dir: where the encoding is cached (default ``default_cache_dir()``), keyed by
        ``fingerprint``; a corrupt cache file is rebuilt.
      use_cache: False to neither read nor write the cache.
    """
    if pair_format not in PAIR_FORMATS:
        raise ValueError(f"pair_format must be one of {PAIR_FORMATS}, got {pair_format!r}")
    if len(q1s) != len(q2s):
        raise ValueError(f"{len(q1s)} first questions but {len(q2s)} second questions")
    labels = np.full(len(q1s), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (len(q1s),):
        raise ValueError(f"labels must have shape ({len(q1s)},), got {labels.shape}")
    if not use_cache:
        return _encode(tokenizer, q1s, q2s, labels, max_length, pair_format)
    key = fingerprint(tokenizer, q1s, q2s, labels, max_length, pair_format)
    path = Path(cache_dir or default_cache_dir()) / f"pairs-{key[:32]}.npz"
    encoded = _load_cached(path, key)
    if encoded is None:
        encoded = _encode(tokenizer, q1s, q2s, labels, max_length, pair_format)
        _save_cached(path, key, encoded)
    return encoded
