"""Fuzzing with hypothesis: the QQP loader, tokenisation, predict's TSV reader and the CLI flags.

Inputs mix empty and whitespace-only questions, 10k-character questions, control characters,
bytes that are not UTF-8, a BOM, CRLF line ends, wrong column counts and labels outside {0, 1}.
Every case loads correctly, or is counted and skipped, or is a one-line error; never a traceback.
No model is trained.
"""

import os
import pathlib
import tempfile

import numpy as np
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxlora.data.tokenize import encode_pairs
from flaxlora.loading.gguf_file import GGUFFile
from flaxlora.loading.registry import resolve
from flaxlora.qqp.data import load_qqp
from flaxlora.qqp.predict import _read_pairs

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
# Characters that are not line or field breaks of a TSV (those make other rows, as they should).
CONTROL = "\x00\x01\x07\x08\x0b\x0c\x1b\x1c\x1e\x7f\x85\u2028\u2029\ufeff\u200b"
# No U+FFFD: a kept question that holds one was altered by the reader (bytes that are not UTF-8 replaced).
text = st.text(alphabet=st.characters(blacklist_characters="\t\n\r\ufffd", blacklist_categories=("Cs",)), max_size=30)
question = st.one_of(
    text,
    st.just(""),
    st.text(alphabet=" \u00a0\u3000", max_size=5),  # whitespace only
    st.text(alphabet=CONTROL, min_size=1, max_size=5),
    st.builds(lambda s: (s or "x") * (10_000 // max(len(s), 1)), text),  # ~10k characters
)
label = st.one_of(st.sampled_from(["0", "1"]), st.sampled_from(["2", "-1", "", "yes", "1.0", " 1", "NaN"]))


@st.composite
def rows(draw, min_rows=0, max_rows=12):
    """Lines of a GLUE-style TSV as bytes: a row may lose or gain a column or carry invalid UTF-8."""
    out = []
    for i in range(draw(st.integers(min_rows, max_rows))):
        fields = [str(draw(st.integers(0, 10**6))), "", "", draw(question), draw(question), draw(label)]
        line = "\t".join(fields).encode("utf-8")
        damage = draw(st.sampled_from(["none"] * 4 + ["fewer", "more", "latin1", "garbage"]))
        if damage == "fewer":
            line = line.rsplit(b"\t", 1)[0]
        elif damage == "more":
            line += b"\textra"
        elif damage == "latin1":
            line = line.replace(b"\t", b"\t\xe9", 1)
        elif damage == "garbage":
            line = draw(st.binary(max_size=40)).replace(b"\n", b" ").replace(b"\r", b" ")
        out.append(line)
    return out


def tsv_bytes(lines, bom, crlf):
    end = b"\r\n" if crlf else b"\n"
    return (b"\xef\xbb\xbf" if bom else b"") + end.join(["\t".join(HEADER).encode(), *lines]) + end


def one_line(err: BaseException) -> bool:
    return "\n" not in str(err) and "Traceback" not in str(err)


@FUZZ
@given(train=rows(), dev=rows(), glue_layout=st.booleans(), bom=st.booleans(), crlf=st.booleans())
def test_loader_counts_or_keeps_every_row(train, dev, glue_layout, bom, crlf):
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        names = ("train.tsv", "dev.tsv") if glue_layout else ("a.tsv", "b.tsv")
        for name, lines in zip(names, (train, dev)):
            (folder / name).write_bytes(tsv_bytes(lines, bom, crlf))
        try:
            data = load_qqp(folder)
        except ValueError as err:
            assert "no usable question pairs" in str(err) and one_line(err)
            return
    report = data.report
    assert report.rows_read == len(train) + len(dev)
    kept = sum(len(s) for s in data.splits.values())
    if not report.notes:  # every row is kept, dropped as malformed or dropped as a duplicate
        assert kept + report.malformed_total + report.duplicates_dropped == report.rows_read
    for split in data.splits.values():
        assert all(q.strip() for q in split.question1 + split.question2)
        assert set(np.unique(split.labels)) <= {0, 1, -1}
        assert not any(c == "\ufffd" or "\udc80" <= c <= "\udcff" for q in split.question1 + split.question2 for c in q)


@pytest.fixture(scope="module")
def tokenizers():
    """The encoder's tokenizer (pair template) and the decoder's (prompt format)."""
    return {"template": transformers.AutoTokenizer.from_pretrained(resolve("minilm-l6")),
            "prompt": GGUFFile(resolve("smollm2-135m")).tokenizer()}


@FUZZ
@given(pairs=st.lists(st.tuples(question, question), min_size=1, max_size=6),
       max_length=st.integers(8, 64), fmt=st.sampled_from(["template", "prompt"]))
def test_tokenisation_fits_every_pair_in_max_length(tokenizers, pairs, max_length, fmt):
    q1s, q2s = map(list, zip(*pairs))
    try:
        encoded = encode_pairs(tokenizers[fmt], q1s, q2s, max_length, pair_format=fmt, use_cache=False)
    except ValueError as err:  # the decoder prompt alone takes about a dozen tokens
        assert fmt == "prompt" and "leaves no room for the questions" in str(err) and one_line(err)
        return
    assert len(encoded) == len(pairs)
    assert np.all(encoded.lengths <= max_length) and np.all(encoded.lengths >= 1)
    assert encoded.input_ids.shape == (int(encoded.lengths.sum()),)


words = st.lists(st.one_of(st.sampled_from(["how", "do", "I", "unbelievably", "naïve", "Straße", "?", "...", "中文",
                                             "😀", "e-mail", "C++", "x" * 120, "  ", "\u00a0", "'s"]), text),
                  min_size=0, max_size=80).map(" ".join)


@FUZZ
@given(q1=words, q2=words, max_length=st.integers(8, 48))
def test_long_questions_are_cut_without_changing_the_encoding(tokenizers, q1, q2, max_length):
    """The template path cuts long questions before Hugging Face's pair truncation (quadratic in
    the questions' lengths); the ids and token types are exactly what that truncation gives."""
    tokenizer = tokenizers["template"]
    encoded = encode_pairs(tokenizer, [q1], [q2], max_length, use_cache=False)
    plain = tokenizer([q1], [q2], truncation="longest_first", max_length=max_length, return_token_type_ids=True)
    assert encoded.input_ids.tolist() == plain["input_ids"][0]
    assert encoded.token_type_ids.tolist() == plain["token_type_ids"][0]


@FUZZ
@given(lines=rows(), header=st.booleans(), bom=st.booleans(), crlf=st.booleans())
def test_predict_reader_reads_or_names_the_bad_lines(lines, header, bom, crlf):
    data = tsv_bytes(lines, bom, crlf)
    if not header:
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "pairs.tsv"
        path.write_bytes(data)
        try:
            q1s, q2s, ids = _read_pairs(str(path))
        except ValueError as err:
            assert one_line(err) and ("rows unusable" in str(err) or "holds no question pairs" in str(err))
            return
    assert len(q1s) == len(q2s) == len(ids) == len(lines)
    assert all(isinstance(q, str) for q in q1s + q2s)


class Checked(Exception):
    """Raised by the stand-in for finetune once the checks that precede any data or weight pass."""


@pytest.fixture(scope="module")
def script(qqp_script):
    """experiments/qqp.py with finetune replaced by its hardware and model checks (no training)."""
    from flaxlora.qqp import run

    def checks_only(config, output_dir, resume=False, progress=True):
        run.check_hardware(config)
        run.check_model(config)
        raise Checked

    with pytest.MonkeyPatch.context() as patch:  # the module is shared by the session: put finetune back
        patch.setattr(qqp_script, "finetune", checks_only)
        yield qqp_script


NUMBER = st.one_of(st.integers(-3, 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "x", "1e400", "-0", "0x10", "1,2", "٣"]))
FLAGS = {
    "--seed": NUMBER, "--max-steps": NUMBER, "--epochs": NUMBER, "--batch-size": NUMBER, "--eval-batch-size": NUMBER,
    "--eval-examples": NUMBER, "--accum-steps": NUMBER, "--learning-rate": NUMBER, "--loraplus-ratio": NUMBER,
    "--max-length": NUMBER, "--rank": NUMBER, "--alpha": NUMBER, "--rank-budget": NUMBER, "--save-every": NUMBER,
    "--log-every": NUMBER, "--eval-every": NUMBER, "--max-skipped-steps": NUMBER, "--label-smoothing": NUMBER, "--rdrop": NUMBER,
    "--keep-checkpoints": NUMBER,
    "--compilation-cache": st.sampled_from(["none", "/proc/no-such-dir", "", "/dev/null/cache"]),
    "--buckets": st.one_of(st.lists(st.integers(-2, 600), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))), text),
    "--targets": st.one_of(st.sampled_from(["(", "[", "query", r"(query|value)/kernel$", "a{99999}", "*"]), text),
    "--mesh": st.one_of(st.sampled_from(["data=1", "data=2", "data=-1", "fsdp=1,data=1", "tensor=0", "x=1", "data"]), text),
    "--dtype": st.sampled_from(["float32", "bfloat16", "float16", ""]),
    "--lora-path": st.sampled_from(["merged", "factored", "fast"]),
    "--preset": st.sampled_from(["lora", "enhanced", "full", "head", "nope"]),
    "--model": st.sampled_from(["minilm-l6", "smollm2-135m", "/nonexistent/model"]),
}


@FUZZ
@given(chosen=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.none(), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAGS[k] for k in keys})))
def test_cli_flags_give_a_run_config_or_one_line_error(script, chosen):
    argv = [part for flag, value in chosen.items() for part in (flag, value)] + ["--quiet"]
    with pytest.raises((Checked, SystemExit)) as outcome:
        script.main(argv)
    if outcome.type is SystemExit:
        message = str(outcome.value)
        assert message.startswith("qqp.py: error: ") and one_line(outcome.value), message


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--seed", "x"], "invalid int value: 'x'"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
    (["--learning-rate", "nan"], "learning_rate must be > 0 and finite"),
    (["--epochs", "inf"], "epochs must be > 0 and finite"),
    (["--max-steps", "0"], "max_steps must be in [1,"),
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--targets", "(query"], "invalid regex"),
    (["--buckets", "8,a"], "expected comma-separated integers"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--mesh", "data=3"], "needs 3 devices, 1 available"),
    (["--mesh", "rows=1"], "unknown axes ['rows']"),
    (["--max-length", "1024", "--buckets", "1024"], "--max-length 1024 exceeds the 512 positions of minilm-l6"),
    (["--model", "/nonexistent/model"], "is neither an existing file or folder"),
    (["--max-skipped-steps", "0"], "max_skipped_steps must be >= 1"),
    (["--loraplus-ratio", "-1"], "loraplus_ratio must be > 0"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1)"),
    (["--rdrop", "-1"], "rdrop must be >= 0 and finite"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--compilation-cache", "/dev/null/cache"], "--compilation-cache: cannot use /dev/null/cache"),
])
def test_invalid_flags_give_one_line_errors(script, argv, message):
    with pytest.raises(SystemExit) as err:
        script.main([*argv, "--quiet"])
    assert message in str(err.value) and one_line(err.value), str(err.value)
