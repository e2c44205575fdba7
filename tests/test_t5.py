"""T5 against transformers on tiny random weights: structure, parity of both classifiers, loading
(folders, the hub alias from a cache), refusals, PEFT interop, and a QQP run whose merged export
transformers loads as is. Offline: the T5 tokenizer is trained here on QQP questions."""

import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import huggingface_hub.constants
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.models.t5.modeling_t5 import T5Attention

import flaxlora
from flaxlora import pytree
from flaxlora.data.tokenize import T5_PROMPT, encode_pairs
from flaxlora.interop import export, load_peft, save_peft
from flaxlora.loading import load_pretrained
from flaxlora.loading.pretrained import label_token_ids
from flaxlora.lora.targets import resolve_targets
from flaxlora.models import (
    LOGICAL_AXIS_RULES,
    T5Config,
    init_params,
    logical_partition_specs,
    sequence_classifier,
    text_to_text_classifier,
)
from flaxlora.models.t5 import relative_position_buckets
from flaxlora.qqp.config import ENHANCED_LORA, PLAIN_LORA
from flaxlora.qqp.data import LABEL_WORDS, load_qqp

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "flaxlora" / "qqp" / "qqp_sample" / "glue_train_sample_a.tsv"
PARITY = 1e-4  # max abs difference, fp32
# transformers ties these to `shared`; our params have the table once.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
VARIANTS = {  # T5 v1.0 (ReLU, LM head = shared table, rescaled) and v1.1 / Flan-T5 (gated GELU, own head)
    "v1.0-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def qqp_rows(n: int) -> list[dict[str, str]]:
    with SAMPLE.open(newline="", encoding="utf-8") as f:
        return [r for r, _ in zip(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), range(n))]


@pytest.fixture(scope="module")
def tokenizer() -> transformers.T5Tokenizer:
    """A T5 tokenizer (Unigram, like T5's SentencePiece; <pad> 0, </s> 1, <unk> 2) trained on 300 QQP pairs."""
    texts = [r[k] for r in qqp_rows(300) for k in ("question1", "question2")] + [*LABEL_WORDS, *T5_PROMPT]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def torch_config(vocab_size: int, **overrides) -> transformers.T5Config:
    """A tiny T5: d_model 32, 2 encoder and 3 decoder layers, 8 relative position buckets."""
    return transformers.T5Config(**{**dict(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0), **overrides})


def save_folder(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs_batch(tokenizer):
    """8 QQP pairs as `tokenizer(q1, q2)` encodes them, right-padded."""
    rows = qqp_rows(8)
    return tokenizer([r["question1"] for r in rows], [r["question2"] for r in rows], padding=True, return_tensors="np")


def as_torch(batch) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(batch[k])) for k in ("input_ids", "attention_mask")}


def max_diff(ours, theirs, mask=None) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
    return float(diff[np.asarray(mask, bool)].max() if mask is not None else diff.max())


def label_scores(lm, batch, label_ids) -> np.ndarray:
    """(batch, labels) log p(label tokens + eos | input) from transformers' T5ForConditionalGeneration."""
    inputs, columns = as_torch(batch), []
    for ids in label_ids:
        targets = torch.tensor([[*ids, 1]] * len(inputs["input_ids"]))
        with torch.no_grad():
            logits = lm(**inputs, labels=targets).logits
        columns.append(torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].sum(-1).numpy())
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    expected = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance).numpy()
    ours = relative_position_buckets(300, 300, bidirectional=bidirectional, num_buckets=num_buckets,
                                     max_distance=max_distance)
    np.testing.assert_array_equal(ours, expected)


def test_params_have_transformers_names_axes_and_init():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    reference = transformers.T5ForSequenceClassification(torch_config(
        64, num_decoder_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
    names = set(reference.state_dict())
    model = sequence_classifier(config)
    params = init_params(model, jax.random.key(0))
    assert set(flaxlora.loading.to_hf(params)) == names - {f"transformer.{n}" for n in TIED_COPIES}
    flat = pytree.flatten(params)
    assert [p for p in flat if "relative_attention_bias" in p] == [
        "transformer/decoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding",
        "transformer/encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"]
    specs = pytree.flatten(logical_partition_specs(model))
    assert specs["transformer/encoder/block/1/layer/0/SelfAttention/q/kernel"] == PartitionSpec("embed", "heads")
    assert specs["transformer/decoder/block/0/layer/2/DenseReluDense/wo/kernel"] == PartitionSpec("mlp", "embed")
    assert specs["transformer/shared/embedding"] == PartitionSpec("vocab", "embed")
    assert {axis for spec in specs.values() for axis in spec} <= {name for name, _ in LOGICAL_AXIS_RULES}
    # transformers' T5 init: shared N(0, 1), q N(0, (d_model d_kv)^-1/2), wo N(0, d_ff^-1/2)
    stds = {k: float(np.std(flat[k])) for k in ("transformer/shared/embedding",
                                               "transformer/encoder/block/0/layer/0/SelfAttention/q/kernel",
                                               "transformer/encoder/block/0/layer/1/DenseReluDense/wo/kernel")}
    np.testing.assert_allclose(list(stds.values()), [1.0, (32 * 8) ** -0.5, 48**-0.5], rtol=0.15)


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_classifiers_match_transformers(variant, tokenizer, pairs_batch, tmp_path):
    torch.manual_seed(0)
    hf = torch_config(len(tokenizer), **VARIANTS[variant])
    classifier = transformers.T5ForSequenceClassification(hf).eval()
    lm = transformers.T5ForConditionalGeneration(hf).eval()
    untied = not VARIANTS[variant]["tie_word_embeddings"]
    if untied:  # transformers 5 ties the head at init whatever the config says
        lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.lm_head.weight))
    ids, mask = pairs_batch["input_ids"], pairs_batch["attention_mask"]
    inputs = as_torch(pairs_batch)

    ours = load_pretrained(save_folder(tmp_path / "classifier", classifier, tokenizer))
    assert ours.kind == "encoder-decoder" and ours.missing == ours.unused == ()
    assert ours.config.scale_decoder_outputs is not untied
    with torch.no_grad():
        out = classifier(**inputs)
        decoder = classifier.transformer(**inputs, decoder_input_ids=classifier._shift_right(inputs["input_ids"]))
    apply = jax.jit(ours.model.apply, static_argnames="method")
    encoded = ours.model.apply({"params": ours.params}, ids, mask, method=lambda m, i, a: m.transformer.encode(i, a))
    hidden = apply({"params": ours.params}, ids, mask, method="hidden_states")
    logits = apply({"params": ours.params}, ids, mask)
    diffs = {"encoder": max_diff(encoded, out.encoder_last_hidden_state, mask),
             "decoder": max_diff(hidden, decoder.last_hidden_state), "logits": max_diff(logits, out.logits)}

    scorer = load_pretrained(save_folder(tmp_path / "lm", lm, tokenizer), label_words=LABEL_WORDS)
    assert scorer.kind == "text-to-text" and scorer.missing == ()
    assert scorer.config.tie_word_embeddings is not untied  # an lm_head in the checkpoint is used
    label_ids = label_token_ids(tokenizer, LABEL_WORDS)
    scores = scorer.model.apply({"params": scorer.params}, ids, mask)
    expected = label_scores(lm, pairs_batch, label_ids)
    diffs["label scores"] = max_diff(scores, expected)
    print(f"{variant}: max abs diff {diffs}; |label scores| up to {np.abs(expected).max():.0f}")
    assert scores.shape == (len(ids), 2) and max(diffs.values()) < PARITY


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mt5"), r"model_type='mt5'.*vocabulary.*Supported: t5"),
    (dict(model_type="umt5"), r"model_type='umt5'.*every layer its own relative position bias"),
    (dict(d_kv=None, num_heads=None), r"lacks d_kv, num_heads"),
    (dict(feed_forward_proj="gated-gelu-x"), r"feed_forward_proj 'gated-gelu-x'"),
    (dict(feed_forward_proj="gated-tanh"), r"activation 'tanh'"),
    (dict(eos_token_id=[1, 2]), r"several eos_token_id"),
])
def test_unsupported_t5_variants_are_refused_in_one_line(changes, message, tmp_path):
    config = {k: v for k, v in {**torch_config(64).to_dict(), **changes}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))  # refused before any weight is looked for
    with pytest.raises(ValueError, match=message) as err:
        load_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_encoder_only_checkpoint_is_refused(tokenizer, tmp_path):
    save_folder(tmp_path, transformers.T5EncoderModel(torch_config(len(tokenizer))), tokenizer)
    with pytest.raises(ValueError, match=r"lacks \d+ T5 weights, e\.g\. transformer/decoder/"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scores label words with a T5 decoder"):
        load_pretrained("minilm-l6", label_words=LABEL_WORDS)


def test_t5_base_alias_loads_from_the_hub_cache(tokenizer, monkeypatch, tmp_path):
    """`--model t5-base` offline: the alias resolves to google-t5/t5-base in the hub cache."""
    repo = tmp_path / "models--google-t5--t5-base"
    commit = "0" * 40
    torch.manual_seed(0)
    save_folder(repo / "snapshots" / commit, transformers.T5ForConditionalGeneration(torch_config(len(tokenizer))),
                tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_pretrained("t5-base", seed=2)
    assert loaded.kind == "encoder-decoder"
    assert loaded.missing == tuple(f"classification_head/{m}/{p}" for m in ("dense", "out_proj") for p in ("bias", "kernel"))
    assert loaded.tokenizer.eos_token == "</s>" and loaded.tokenizer.pad_token_id == 0


@pytest.fixture(scope="module")
def t5_folder(tokenizer, tmp_path_factory):
    """A T5 v1.1 sequence classifier saved by transformers (no decoder_start_token_id in its config,
    as a bare T5Config writes it) with the T5 tokenizer beside it."""
    torch.manual_seed(0)
    config = torch_config(len(tokenizer), feed_forward_proj="gated-gelu", num_decoder_layers=2)
    del config.decoder_start_token_id
    return save_folder(tmp_path_factory.mktemp("t5"), transformers.T5ForSequenceClassification(config), tokenizer)


@pytest.mark.parametrize("preset", ["lora", "enhanced"])
def test_t5_adapters_export_to_peft(preset, t5_folder, tmp_path):
    from test_interop_peft import random_adapter

    config = {"lora": PLAIN_LORA, "enhanced": ENHANCED_LORA}[preset]
    pretrained = load_pretrained(t5_folder)
    rows = qqp_rows(16)
    q1s, q2s = [r["question1"] for r in rows], [r["question2"] for r in rows]
    encoded = encode_pairs(pretrained.tokenizer, q1s, q2s, 128, use_cache=False)
    batch = encoded.pad(np.arange(len(encoded)), int(encoded.lengths.max()))
    reference = pretrained.tokenizer(q1s, q2s, padding="max_length", max_length=batch["input_ids"].shape[1])
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])  # exactly tokenizer(q1, q2)

    kernels = {p for p in pytree.flatten(pretrained.params) if p.endswith("/kernel")}
    expected = {p for p in kernels if (p.split("/")[-2] in ("q", "v") if preset == "lora"
                                       else not p.startswith("classification_head/"))}
    assert set(resolve_targets(pretrained.params, config)) == expected
    base, lora, extras = random_adapter(pretrained.params, config)
    merged = flaxlora.merge(base, lora, config, extras)
    ours = np.asarray(jax.jit(pretrained.model.apply)({"params": merged}, batch["input_ids"], batch["attention_mask"]))
    save_peft(tmp_path, pretrained.params, lora, config, extras, save_modules=pretrained.missing)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    expected_targets = ["q", "v"] if preset == "lora" else ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]
    assert written["target_modules"] == expected_targets
    saved = written["modules_to_save"]  # the shortest names that select the head's modules, as PEFT matches them
    assert all(any(m == s or m.endswith("." + s) for s in saved)
               for m in ("classification_head.dense", "classification_head.out_proj"))
    torch_base = transformers.T5ForSequenceClassification.from_pretrained(t5_folder)
    torch_base.config.decoder_start_token_id = 0
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(torch_base, tmp_path).eval()(**as_torch(batch)).logits.numpy()
    again = jax.jit(pretrained.model.apply)({"params": load_peft(tmp_path, pretrained.params).merged(pretrained.params)},
                                            batch["input_ids"], batch["attention_mask"])
    print(f"T5 {preset} adapter: PEFT vs flaxlora max abs diff {max_diff(ours, theirs):.1e}")
    assert max_diff(ours, theirs) < PARITY and max_diff(again, ours) < 1e-5


def run_flags(folder, data_dir, out, *extra):
    return ["--model", str(folder), "--data-dir", str(data_dir), "--output-dir", str(out), "--max-steps", "2",
            "--eval-examples", "16", "--batch-size", "8", "--max-length", "64", "--buckets", "64",
            "--eval-batch-size", "16", "--learning-rate", "1e-2", "--members", "1", "--quiet", *extra]


def test_qqp_run_on_a_transformers_t5_classifier_exports_a_merged_model(qqp_script, t5_folder, data_dir, tmp_path):
    out, merged = tmp_path / "run", tmp_path / "merged"
    qqp_script.main(run_flags(t5_folder, data_dir, out))  # one member of the default, enhanced, preset
    cli = subprocess.run([sys.executable, "-m", "flaxlora.export", "--checkpoint", str(out), "--format", "merged",
                          "--out", str(merged)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-2000:]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    test = load_qqp(data_dir)["test"]
    q1s, q2s = list(test.question1[:16]), list(test.question2[:16])
    with torch.no_grad():
        theirs = model(**tokenizer(q1s, q2s, padding=True, return_tensors="pt")).logits.numpy()
    ours = flaxlora.restore(out).logits(q1s, q2s)
    base, batch = load_pretrained(t5_folder), tokenizer(q1s, q2s, padding=True, return_tensors="np")
    base_logits = base.model.apply({"params": base.params}, batch["input_ids"], batch["attention_mask"])
    print(f"T5 run: merged export vs restore max abs diff {max_diff(ours, theirs):.1e}")
    assert max_diff(ours, theirs) <= 1e-3
    assert max_diff(ours, base_logits) > 1e-3  # training changed the classifier


def test_text_to_text_run_scores_label_words(qqp_script, t5_folder, data_dir, tmp_path):
    out = tmp_path / "run"
    results = qqp_script.main(run_flags(t5_folder, data_dir, out, "--text-to-text", "--preset", "lora"))
    assert results["run"]["text_to_text"] and results["run"]["lora"]["trainable"] is None
    predictor = flaxlora.restore(out)
    test = load_qqp(data_dir)["test"].sample(16)
    assert predictor.pair_format == "text"
    assert np.mean(predictor.predict(test.question1, test.question2) == test.labels) == pytest.approx(
        results["accuracy"], abs=1e-6)
    text = [f"{T5_PROMPT[0]} {a}{T5_PROMPT[1]} {b}" for a, b in zip(test.question1, test.question2)]
    encoded = encode_pairs(predictor.tokenizer, test.question1, test.question2, 1024, pair_format="text", use_cache=False)
    assert [list(encoded.input_ids[s:e]) for s, e in zip(encoded.offsets, encoded.offsets[1:])] == \
        predictor.tokenizer(text)["input_ids"]  # "qqp question1: ... question2: ...</s>"
    with pytest.raises(SystemExit, match="text-to-text run.*flaxlora.restore"):
        export.main(["--checkpoint", str(out), "--format", "merged", "--out", str(tmp_path / "merged")])
    with pytest.raises(SystemExit, match="no classification head to train"):
        qqp_script.main(run_flags(t5_folder, data_dir, tmp_path / "head", "--text-to-text", "--preset", "head"))


def test_t5_config_defaults_follow_transformers():
    config = T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=3, num_heads=2, pad_token_id=5,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    assert (config.num_decoder_layers, config.decoder_start_token_id, config.scale_decoder_outputs) == (3, 5, False)
    assert (config.dense_act_fn, config.is_gated_act) == ("gelu_new", True)
    assert dataclasses.replace(config, feed_forward_proj="relu").dense_act_fn == "relu"


@pytest.mark.parametrize("text_to_text", [False, True], ids=["classifier", "text-to-text"])
def test_factored_lora_path_matches_merged(text_to_text):
    """The factored path reaches every T5 projection, cross-attention and both classifiers included."""
    from toy_models import perturb_b

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=not text_to_text)
    model = text_to_text_classifier(config, ((5, 6), (7,))) if text_to_text else sequence_classifier(config)
    params = init_params(model, jax.random.key(0))
    lora_config = ENHANCED_LORA.replace(trainable=None, use_dora=True)
    lora = perturb_b(flaxlora.init_lora(params, lora_config, jax.random.key(1)))
    ids = np.array([[9, 10, 11, 1, 12, 13, 1, 0], [14, 1, 15, 16, 1, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    merged = jax.jit(lambda p, a: model.apply({"params": flaxlora.merge(p, a, lora_config)}, ids, mask))(params, lora)
    factored = jax.jit(lambda p, a: flaxlora.apply_factored(model, {"params": p}, a, lora_config, ids, mask))(params, lora)
    plain = jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params)
    assert max_diff(merged, factored) < 1e-4 and max_diff(merged, plain) > 1e-3
