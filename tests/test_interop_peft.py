"""Interop with PyTorch, checked by the real peer: PEFT adapters both ways, merged exports, the CLI.

Logits are compared in fp32 on 32 real QQP pairs; PEFT and transformers load what we write.
Every preset (lora, enhanced, head; full refused for PEFT, merged instead) on MiniLM and SmolLM2.
"""

import copy
import json
import logging
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from test_models import tiny_bert, tiny_llama

import flaxlora
from flaxlora.data.tokenize import encode_pairs
from flaxlora.interop import (
    classification_pad_token,
    export,
    hf_config,
    load_peft,
    save_merged,
    save_peft,
)
from flaxlora.loading.registry import resolve
from flaxlora.models import RopeScaling, init_params, sequence_classifier
from flaxlora.qqp.config import ENHANCED_LORA, PRESETS, RunConfig
from flaxlora.qqp.run import finetune

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY = 1e-4  # max abs logit difference, fp32
LABELS = ("not_duplicate", "duplicate")


def encode(tokenizer, pairs, pair_format="template", max_length=64):
    """32 pairs tokenised as in training, right-padded to the longest."""
    first, second = map(list, zip(*pairs[:32]))
    encoded = encode_pairs(tokenizer, first, second, max_length, pair_format=pair_format, use_cache=False)
    return encoded.pad(np.arange(len(encoded)), int(encoded.lengths.max()))


def torch_logits(model, batch, pad_id=None) -> np.ndarray:
    inputs = {k: torch.tensor(np.asarray(batch[k])) for k in ("input_ids", "attention_mask", "token_type_ids")
              if k in batch}
    if pad_id is not None:
        inputs["input_ids"] = torch.where(inputs["attention_mask"] == 1, inputs["input_ids"], pad_id)
    with torch.no_grad():
        return model.eval()(**inputs).logits.numpy()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def random_adapter(params, config, seed=0, extras_scale=0.1, lora_scale=0.05):
    """(base, lora, extras) with every adapter leaf and trained extra perturbed: no zero b."""
    def noisy(tree, scale, key):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                            for x, k in zip(leaves, keys)])

    base, lora = flaxlora.init_adapter(params, config, jax.random.key(seed))
    extras = flaxlora.trainable_params(params, config)
    return base, noisy(lora, lora_scale, jax.random.key(seed + 1)), noisy(extras, extras_scale, jax.random.key(seed + 2))


def card_model(folder):
    """Run the Python of ``folder``'s model card; its namespace (``model``, maybe ``tokenizer``)."""
    card = (pathlib.Path(folder) / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(folder), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def minilm_batch(minilm, qqp_pairs):
    return encode(minilm.tokenizer, qqp_pairs)


@pytest.fixture(scope="module")
def minilm_logits(minilm, minilm_batch):
    """Our logits for merged params on the 32 pairs (one compilation for all cases)."""
    forward = jax.jit(minilm.model.apply)
    b = minilm_batch
    return lambda params: np.asarray(forward({"params": params}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))


def minilm_torch():
    """A fresh PyTorch MiniLM classifier (its classifier random: the adapter must carry ours)."""
    return transformers.BertForSequenceClassification.from_pretrained(resolve("minilm-l6"), num_labels=2)


VARIANTS = {
    "standard": flaxlora.LoraConfig(rank=4, alpha=8, targets=r"(query|value)/kernel$",
                                    rank_pattern={r"layer/1/.*query": 2}, alpha_pattern={"value": 4.0},
                                    trainable=r"^(classifier|bert/pooler)/"),
    # LayerNorm biases only: not in LoRA-adapted modules, so PEFT's bias="all" (every bias saved).
    "rslora": flaxlora.LoraConfig(rank=8, alpha=4, scaling="rslora", targets=r"(key|attention/output/dense)/kernel$",
                                  trainable=r"^classifier/|attention/output/LayerNorm/bias$"),
    "dora": flaxlora.LoraConfig(rank=4, alpha=8, use_dora=True, targets=r"(query|value|intermediate/dense)/kernel$",
                                trainable=r"^classifier/"),
    # PiSSA / OLoRA (SVD / QR at init) on two layers only, to keep the test fast.
    "pissa": flaxlora.LoraConfig(rank=4, alpha=8, init="pissa", targets=r"layer/[01]/.*(query|value)/kernel$",
                                 trainable=r"^classifier/"),
    "olora-rslora-dora": flaxlora.LoraConfig(rank=4, alpha=8, init="olora", scaling="rslora", use_dora=True,
                                             targets=r"layer/[01]/.*(query|value)/kernel$", trainable=r"^classifier/"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_exported_adapter_matches_peft(name, minilm, minilm_batch, minilm_logits, tmp_path):
    config = VARIANTS[name]
    base, lora, extras = random_adapter(minilm.params, config)
    ours = minilm_logits(flaxlora.merge(base, lora, config, extras))
    save_peft(tmp_path, minilm.params, lora, config, extras, save_modules=minilm.missing)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == (2 * config.rank if config.init in ("pissa", "olora") else config.rank)
    assert written["bias"] == ("all" if name == "rslora" else "none")
    theirs = torch_logits(peft.PeftModel.from_pretrained(minilm_torch(), tmp_path), minilm_batch)
    diff = max_diff(ours, theirs)
    print(f"export {name}: PEFT vs flaxlora max abs diff {diff:.1e} (|logits| <= {np.abs(ours).max():.2f})")
    assert diff < PARITY
    adapter = load_peft(tmp_path, minilm.params)  # our own export reads back to the same model
    again = minilm_logits(adapter.merged(minilm.params))
    assert max_diff(again, ours) < 1e-5


# What each preset's adapter is in PEFT: (target_modules, modules_to_save, bias) on MiniLM and SmolLM2.
PRESET_EXPORTS = {
    "lora": {"minilm": (["query", "value"], ["classifier"], "none"),
             "smollm2": (["q_proj", "v_proj"], ["score"], "none")},
    # BitFit on adapted layers through bias="lora_only", norms and head saved whole.
    "enhanced": {"minilm": (["dense", "key", "query", "value"], ["LayerNorm", "classifier"], "lora_only"),
                 "smollm2": (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                             ["input_layernorm", "norm", "post_attention_layernorm", "score"], "none")},
    # No LoRA layers: PEFT's dummy target, modules_to_save only.
    "head": {"minilm": ("dummy-target-modules", ["bert.pooler.dense", "classifier"], "none"),
             "smollm2": ("dummy-target-modules", ["score"], "none")},
}
FULL_REFUSED = r"every parameter is trained .*full fine-tuning.* export the merged model instead .*--format merged"


def check_preset_export(preset, params, missing, lora, config, extras, folder, family):
    """save_peft of a preset's adapter: the PEFT settings it should have, or the refusal for full."""
    if preset == "full":
        with pytest.raises(ValueError, match=FULL_REFUSED) as err:
            save_peft(folder, params, lora, config, extras, save_modules=missing)
        assert "\n" not in str(err.value) and len(str(err.value)) < 300
        assert not folder.exists() or not any(folder.iterdir())
        return False
    written = save_peft(folder, params, lora, config, extras, save_modules=missing)
    assert (written["target_modules"], written["modules_to_save"], written["bias"]) == PRESET_EXPORTS[preset][family]
    assert written == json.loads((folder / "adapter_config.json").read_text())
    return True


@pytest.mark.parametrize("preset", ["lora", "enhanced", "head", "full"])
def test_preset_exports_match_peft_minilm(preset, minilm, minilm_batch, minilm_logits, tmp_path):
    config = PRESETS[preset].lora
    base, lora, extras = random_adapter(minilm.params, config, extras_scale=0.01 if preset == "full" else 0.1)
    merged = flaxlora.merge(base, lora, config, extras)
    ours = minilm_logits(merged)
    if check_preset_export(preset, minilm.params, minilm.missing, lora, config, extras, tmp_path / "adapter", "minilm"):
        theirs = torch_logits(peft.PeftModel.from_pretrained(minilm_torch(), tmp_path / "adapter"), minilm_batch)
        adapter = load_peft(tmp_path / "adapter", minilm.params)  # and our own export reads back
        assert max_diff(minilm_logits(adapter.merged(minilm.params)), ours) < 1e-5
    else:
        save_merged(tmp_path / "merged", minilm, merged, LABELS)
        theirs = torch_logits(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged"),
                              minilm_batch)
    diff = max_diff(ours, theirs)
    print(f"minilm {preset}: {'merged' if preset == 'full' else 'PEFT'} vs flaxlora max abs diff {diff:.1e}")
    assert diff < PARITY


TORCH_VARIANTS = {
    "standard": dict(target_modules=["query", "value"], rank_pattern={"layer.1.attention.self.query": 2},
                     alpha_pattern={"value": 4}),
    # "dense" would match the pooler's dense, which modules_to_save excludes, as PEFT does.
    "rslora": dict(target_modules=["key", "dense"], use_rslora=True, modules_to_save=["pooler"]),
    "dora-regex": dict(target_modules=r".*\.(query|value)", use_dora=True),
    "pissa-unconverted": dict(target_modules=r".*\.layer\.[01]\..*\.(query|value)", init_lora_weights="pissa"),
    # BitFit: every bias, LayerNorms whole (PEFT also saves its wrappers' bias copies).
    "bias-all": dict(target_modules=["query", "value"], bias="all", modules_to_save=["LayerNorm"]),
    "bias-lora-only": dict(target_modules=["query", "dense"], bias="lora_only"),
    "head-only": dict(target_modules="dummy-target-modules", modules_to_save=["pooler"]),
}


@pytest.mark.parametrize("name", TORCH_VARIANTS)
def test_peft_adapter_imports(name, minilm, minilm_batch, minilm_logits, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, **TORCH_VARIANTS[name])
    model = peft.get_peft_model(minilm_torch(), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora_A / lora_B / magnitudes and the saved modules
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    theirs = torch_logits(model, minilm_batch)
    adapter = load_peft(tmp_path, minilm.params)
    assert adapter.config.init == ("pissa" if name.startswith("pissa") else "lora")
    assert (adapter.config.targets is None) == (name == "head-only")
    ours = minilm_logits(adapter.merged(minilm.params))
    diff = max_diff(ours, theirs)
    print(f"import {name}: flaxlora vs PEFT max abs diff {diff:.1e} (|logits| <= {np.abs(theirs).max():.2f})")
    assert diff < PARITY


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A real 4-step run of one member of the default (enhanced) preset on MiniLM, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    run = RunConfig(data_dir=str(data_dir), max_steps=4, save_every=2, batch_size=8, max_length=64, buckets=(64,),
                    eval_batch_size=16, learning_rate=1e-2, lora=PRESETS["enhanced"].lora)
    finetune(run, out, progress=False)
    return out


def card_rows(folder) -> dict[str, str]:
    """The model card's table as {key: value}."""
    rows = re.findall(r"^\| (.+?) \| (.*) \|$", (pathlib.Path(folder) / "README.md").read_text(), flags=re.M)
    return {k: v.replace("\\|", "|") for k, v in rows}


def test_trained_run_exports_match_peft_and_transformers(trained_run, minilm, minilm_batch, minilm_logits, qqp_pairs,
                                                        caplog, capfd, tmp_path):
    with caplog.at_level(logging.WARNING):
        ours = minilm_logits(flaxlora.restore(trained_run).params)
    assert capfd.readouterr() == ("", "") and not caplog.records  # restore says nothing
    cli = subprocess.run([sys.executable, "-m", "flaxlora.export", "--checkpoint", str(trained_run),
                          "--format", "peft", "--out", str(tmp_path / "adapter")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (cli.stdout, cli.stderr) == (f"wrote peft export to {tmp_path / 'adapter'}\n", "")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["target_modules"], written["modules_to_save"], written["bias"]) == PRESET_EXPORTS["enhanced"]["minilm"]
    assert written["task_type"] == "SEQ_CLS" and written["use_rslora"]
    peft_diff = max_diff(ours, torch_logits(peft.PeftModel.from_pretrained(minilm_torch(), tmp_path / "adapter"),
                                            minilm_batch))
    card_peft_diff = max_diff(ours, torch_logits(card_model(tmp_path / "adapter")["model"], minilm_batch))

    export.main(["--checkpoint", str(trained_run), "--format", "merged", "--out", str(tmp_path / "merged")])
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["architectures"] == ["BertForSequenceClassification"]
    assert written["id2label"] == {"0": "not_duplicate", "1": "duplicate"}
    loaded = card_model(tmp_path / "merged")  # model and tokenizer, as the card loads them
    batch = encode(loaded["tokenizer"], qqp_pairs)
    np.testing.assert_array_equal(batch["input_ids"], minilm_batch["input_ids"])
    merged_diff = max_diff(ours, torch_logits(loaded["model"], batch))
    print(f"trained enhanced run: PEFT {peft_diff:.1e} (card's code {card_peft_diff:.1e}), merged transformers "
          f"{merged_diff:.1e}")
    assert max(peft_diff, card_peft_diff, merged_diff) < PARITY


def test_model_cards_describe_the_run(trained_run, tmp_path):
    results = json.loads((trained_run / "results.json").read_text())
    test = results["splits"]["test"]
    for fmt in ("peft", "merged"):
        export.export(trained_run, tmp_path / fmt, fmt)
        rows = card_rows(tmp_path / fmt)
        assert rows["Base model"] == f"`minilm-l6` ({resolve('minilm-l6')})"
        assert rows["Preset"] == "enhanced"
        assert rows["LoRA"] == f"rank 4, alpha 16, scale alpha / sqrt(r) (rsLoRA), targets `{ENHANCED_LORA.targets}`, init lora"
        assert rows["Trained in full"] == f"`{ENHANCED_LORA.trainable}`"
        assert rows["Trainable parameters"] == (f"{results['trainable_params']:,} of {results['total_params']:,} "
                                                f"({results['trainable_percent']:.3f}%)")
        assert rows["Held-out metrics"].startswith(
            f"test split (n={test['n']}): accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f}, MCC {test['mcc']:.4f}")
        assert ("PEFT settings" in rows) == (fmt == "peft")
    assert 'bias `lora_only`' in card_rows(tmp_path / "peft")["PEFT settings"]
    export.export(trained_run, tmp_path / "step2", "peft", step=2)  # not the step results.json was measured at
    assert card_rows(tmp_path / "step2")["Held-out metrics"] == "none for this checkpoint (results.json is for step 4)"


@pytest.fixture(scope="module")
def smollm2_batch(smollm2, qqp_pairs):
    return encode(smollm2.tokenizer, qqp_pairs, "prompt", max_length=48)


@pytest.fixture(scope="module")
def smollm2_logits(smollm2, smollm2_batch):
    forward = jax.jit(smollm2.model.apply)
    return lambda params: np.asarray(forward({"params": params}, smollm2_batch["input_ids"],
                                             smollm2_batch["attention_mask"]))


@pytest.fixture(scope="module")
def smollm2_pad_id(smollm2):
    # transformers pools the rightmost token that is not pad_token_id; SmolLM2 pads with eos, which ends
    # our prompts: pad with another token, as the merged export does.
    pad_id = smollm2.tokenizer.convert_tokens_to_ids(classification_pad_token(smollm2.tokenizer))
    assert pad_id != smollm2.tokenizer.eos_token_id
    return pad_id


@pytest.fixture(scope="module")
def smollm2_torch(smollm2, smollm2_pad_id):
    """The PyTorch SmolLM2 classifier from the same GGUF file, built as the model card's code builds it
    (loaded once: ~30 s; copy it per use)."""
    args = export.base_args("smollm2-135m", smollm2)
    gguf = resolve("smollm2-135m")
    assert args == f"{str(gguf.parent)!r}, gguf_file={gguf.name!r}, num_labels=2, pad_token_id={smollm2_pad_id}"
    model = eval(f"transformers.AutoModelForSequenceClassification.from_pretrained({args})")
    assert model.config.pad_token_id == smollm2_pad_id
    return model


@pytest.mark.parametrize("preset", ["lora", "enhanced", "head", "full"])
def test_preset_exports_match_peft_smollm2(preset, smollm2, smollm2_batch, smollm2_logits, smollm2_pad_id,
                                           smollm2_torch, tmp_path):
    config = PRESETS[preset].lora
    if preset == "full":  # the refusal comes before any work: no need for a full-size random copy
        check_preset_export(preset, smollm2.params, smollm2.missing, {}, config,
                            flaxlora.trainable_params(smollm2.params, config), tmp_path, "smollm2")
        return
    # Smaller updates than on MiniLM: 30 layers of 7 adapted projections each add up.
    base, lora, extras = random_adapter(smollm2.params, config, extras_scale=0.02, lora_scale=0.02)
    ours = smollm2_logits(flaxlora.merge(base, lora, config, extras))
    assert check_preset_export(preset, smollm2.params, smollm2.missing, lora, config, extras, tmp_path, "smollm2")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2_torch), tmp_path)
    diff = max_diff(ours, torch_logits(model, smollm2_batch, smollm2_pad_id))
    print(f"smollm2 {preset}: PEFT on GGUF base vs flaxlora max abs diff {diff:.1e} (|logits| <= {np.abs(ours).max():.1f})")
    assert diff < PARITY
    assert max_diff(smollm2_logits(load_peft(tmp_path, smollm2.params).merged(smollm2.params)), ours) < 1e-4


def test_smollm2_exports_match_peft_on_gguf_and_transformers(smollm2, qqp_pairs, smollm2_batch, smollm2_logits,
                                                             smollm2_pad_id, smollm2_torch, tmp_path):
    config = flaxlora.LoraConfig(rank=4, alpha=8, targets=r"(q_proj|v_proj)/kernel$", use_dora=True, trainable=r"^score/")
    base, lora, extras = random_adapter(smollm2.params, config)
    merged = flaxlora.merge(base, lora, config, extras)
    ours, batch, pad_id = smollm2_logits(merged), smollm2_batch, smollm2_pad_id

    save_peft(tmp_path / "adapter", smollm2.params, lora, config, extras, save_modules=smollm2.missing)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2_torch), tmp_path / "adapter")
    peft_diff = max_diff(ours, torch_logits(peft_model, batch, pad_id))

    save_merged(tmp_path / "merged", smollm2, merged, LABELS)
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForSequenceClassification"] and len(written["id2label"]) == 2
    assert written["pad_token_id"] == pad_id
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    exported_batch = encode(tokenizer, qqp_pairs, "prompt", max_length=48)
    real = batch["attention_mask"] == 1
    np.testing.assert_array_equal(exported_batch["input_ids"][real], batch["input_ids"][real])
    assert np.all(exported_batch["input_ids"][~real] == pad_id)
    merged_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    merged_diff = max_diff(ours, torch_logits(merged_model, exported_batch))
    print(f"smollm2 DoRA: PEFT on GGUF base {peft_diff:.1e}, merged transformers {merged_diff:.1e} "
          f"(|logits| <= {np.abs(ours).max():.1f})")
    assert peft_diff < PARITY and merged_diff < PARITY


def test_merged_tiny_llama_config_round_trips(tmp_path):
    """A Llama with GQA, head_dim and llama3 RoPE: transformers reads back our config.json as built."""
    config = tiny_llama(head_dim=16, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), num_labels=3)
    hf_config(config, ("a", "b", "c")).save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.architectures == ["LlamaForSequenceClassification"] and loaded.num_labels == 3
    assert (loaded.head_dim, loaded.num_key_value_heads, loaded.rope_parameters["rope_type"]) == (16, 2, "llama3")
    with pytest.raises(ValueError, match="2 label names for a classifier with 3 outputs"):
        hf_config(config, ("a", "b"))


# --- rejected before use -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(minilm, tmp_path_factory):
    """A valid export (standard LoRA + pooler + classifier) to break in the tests below."""
    folder = tmp_path_factory.mktemp("exported")
    config = VARIANTS["standard"]
    _, lora, extras = random_adapter(minilm.params, config)
    save_peft(folder, minilm.params, lora, config, extras, save_modules=minilm.missing)
    return folder


def broken(exported, tmp_path, tensors=None, settings=None):
    """A copy of ``exported`` with its tensors and adapter_config.json changed by the given functions."""
    loaded = safetensors.numpy.load_file(exported / "adapter_model.safetensors")
    safetensors.numpy.save_file(tensors(loaded) if tensors else loaded, tmp_path / "adapter_model.safetensors")
    written = json.loads((exported / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(settings(written) if settings else written))
    return tmp_path


Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def without(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def renamed(old, new):
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


@pytest.mark.parametrize("tensors, settings, error", [
    (without(f"{Q0}.lora_B.weight"), None, r"has \['lora_A.weight'\], expected \['lora_A.weight', 'lora_B.weight'\]"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith(Q0)}, None, r"no LoRA tensors for \['bert.encoder.layer.0"),
    (without("base_model.model.classifier.bias"), None, r"missing \['base_model.model.classifier.bias'\]"),
    (lambda t: {**t, f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"][:, :100]}, None,
     r"lora_A.weight has shape \(4, 100\), expected \(4, 384\) .* another model or hidden size"),
    (lambda t: {**t, "base_model.model.classifier.weight": np.zeros((3, 384), np.float32)}, None,
     r"classifier.weight has shape \(384, 3\) .* has \(384, 2\)"),
    (renamed(".query.", ".q_proj."), lambda s: {**s, "target_modules": ["q_proj", "value"]},
     r"not Linear layers of the base model: \['bert.encoder.layer.0.attention.self.q_proj'"),
    (lambda t: {**t, "base_model.model.bert.embeddings.position_ids": np.zeros(4, np.float32)}, None,
     r"'base_model.model.bert.embeddings.position_ids' is not a parameter of the base model"),
    (None, lambda s: {**s, "target_modules": ["query"]}, r"tensors for modules it does not select: \['bert.encoder"),
    (None, lambda s: {**s, "r": 8}, r"'bert.encoder.layer.0.attention.self.query' has rank 4, but .* says 8"),
    (None, lambda s: {**s, "use_dora": True}, r"expected \['lora_A.weight', 'lora_B.weight', 'lora_magnitude_vector'\]"),
    (None, lambda s: {**s, "layers_to_transform": [0]}, r"unsupported PEFT options layers_to_transform=\[0\]"),
    (None, lambda s: {**s, "bias": "everything"}, r"unsupported PEFT options bias='everything'"),
    (None, lambda s: {**s, "bias": "all"}, r"bias='all': missing \['base_model.model.bert.embeddings.LayerNorm.bias'"),
    (None, lambda s: {**s, "peft_type": "IA3"}, r"peft_type 'IA3'; only LORA"),
    (None, lambda s: {**s, "init_lora_weights": "loftq"}, r"init_lora_weights='loftq' changes the base weights"),
    (None, lambda s: {**s, "target_modules": ".*(query"}, r"target_modules '\.\*\(query' is not a valid regex \(missing \)"),
    (None, lambda s: {**s, "target_modules": "a" * 5000}, r"target_modules must be a regex string of at most 1000"),
    (None, lambda s: {**s, "target_modules": 7}, r"target_modules must be a regex string or a list of module names"),
    (None, lambda s: {**s, "rank_pattern": {"query[": 4}}, r"rank_pattern key .* is not a valid regex"),
    (None, lambda s: {**s, "alpha_pattern": ["query"]}, r"alpha_pattern must be an object of regex keys"),
    (None, lambda s: {**s, "modules_to_save": ["(classifier"]}, r"modules_to_save entry .* is not a valid regex"),
], ids=["lora_B-missing", "module-missing", "head-bias-missing", "hidden-size", "num-labels", "unknown-module",
        "unknown-tensor", "not-targeted", "rank", "dora-magnitude-missing", "layers_to_transform", "bias-option",
        "bias-all-incomplete", "ia3", "loftq", "bad-target-regex", "long-target-regex", "target-type",
        "bad-rank-pattern", "alpha-pattern-type", "bad-modules-to-save"])
def test_bad_adapters_are_rejected_naming_the_problem(minilm, exported, tmp_path, tensors, settings, error):
    with pytest.raises(ValueError, match=error) as err:
        load_peft(broken(exported, tmp_path, tensors, settings), minilm.params)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def exported_bitfit(minilm, tmp_path_factory):
    """A valid export of the enhanced preset (biases of adapted layers through bias="lora_only")."""
    folder = tmp_path_factory.mktemp("exported_bitfit")
    _, lora, extras = random_adapter(minilm.params, ENHANCED_LORA)
    save_peft(folder, minilm.params, lora, ENHANCED_LORA, extras, save_modules=minilm.missing)
    return folder


@pytest.mark.parametrize("tensors, settings, error", [
    (without(f"{Q0}.base_layer.bias"), None, rf"bias='lora_only': missing \['{Q0}.base_layer.bias'\]"),
    (renamed(".base_layer.bias", ".bias"), None,
     r"is a parameter of a LoRA-adapted module, which PEFT keeps as base_model\.model\..*\.base_layer\.bias"),
    (None, lambda s: {**s, "bias": "none"}, r"'base_model.model.bert.*.base_layer.bias' is not a parameter"),
    (None, lambda s: {**s, "modules_to_save": ["classifier"]},
     r"not saved for them \['base_model.model.bert.embeddings.LayerNorm.bias', 'base_model.model.bert.embeddings.LayerNorm.weight'"),
], ids=["bias-missing", "bias-misnamed", "bias-undeclared", "norms-not-declared"])
def test_bias_tensors_are_checked(minilm, exported_bitfit, tmp_path, tensors, settings, error):
    with pytest.raises(ValueError, match=error):
        load_peft(broken(exported_bitfit, tmp_path, tensors, settings), minilm.params)


def test_adapter_for_another_architecture_is_rejected(minilm, exported, tmp_path):
    config = tiny_llama()
    params = init_params(sequence_classifier(config), jax.random.key(0))
    lora_config = flaxlora.LoraConfig(rank=2, alpha=4, targets=r"q_proj/kernel$", trainable=r"^score/")
    _, lora, extras = random_adapter(params, lora_config)
    save_peft(tmp_path, params, lora, lora_config, extras)
    with pytest.raises(ValueError, match=r"not Linear layers of the base model: \['model.layers.0.self_attn.q_proj'"):
        load_peft(tmp_path, minilm.params)
    narrow_bert = init_params(sequence_classifier(tiny_bert(num_hidden_layers=6, num_labels=2)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape \(4, 384\), expected \(4, 32\) .* another model or hidden size"):
        load_peft(exported, narrow_bert)


def test_pickle_and_missing_files_are_refused(minilm, exported, tmp_path):
    (tmp_path / "adapter_config.json").write_text((exported / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is a pickle, which is never loaded"):
        load_peft(tmp_path, minilm.params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_peft(tmp_path / "empty", minilm.params)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_peft(tmp_path, minilm.params)


@pytest.mark.parametrize("config, error", [
    (PRESETS["full"].lora, FULL_REFUSED),
    # PEFT saves the SEQ_CLS head whole, so it cannot carry LoRA.
    (flaxlora.LoraConfig(rank=2, targets=r"^classifier/kernel$"),
     r"LoRA on 'classifier' cannot be expressed in PEFT, which saves that module whole .*--format merged"),
    (flaxlora.LoraConfig(rank=2, targets=r"word_embeddings/embedding$"),
     r"PEFT adapts 2-D Linear weights, not the kernel 'bert/embeddings/word_embeddings/embedding' .*--format merged"),
], ids=["full", "lora-on-head", "embedding"])
def test_exports_peft_cannot_express_are_refused_in_one_line(minilm, tmp_path, config, error):
    _, lora, extras = random_adapter(minilm.params, config)
    with pytest.raises(ValueError, match=error) as err:
        save_peft(tmp_path, minilm.params, lora, config, extras, save_modules=minilm.missing)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)
    assert not any(tmp_path.iterdir())


# --- the CLI -----------------------------------------------------------------------------------

def test_cli_never_overwrites_or_loses_files(trained_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    args = ["--checkpoint", str(trained_run), "--format", "peft", "--out", str(out)]
    with pytest.raises(SystemExit) as err:
        export.main(args)
    assert "is not empty: pass --force to replace a previous export" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as err:  # --force replaces only a previous export of this tool
        export.main([*args, "--force"])
    assert "holds no flaxlora_export.json" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in out.rglob("*")) == ["data.bin", "keep.txt", "sub"]
    assert (out / "keep.txt").read_text() == "precious" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"

    new = tmp_path / "new"
    export.main(["--checkpoint", str(trained_run), "--format", "peft", "--out", str(new)])
    exported = sorted(p.name for p in new.iterdir())
    assert exported == ["README.md", "adapter_config.json", "adapter_model.safetensors", "flaxlora_export.json"]
    assert json.loads((new / "flaxlora_export.json").read_text())["format"] == "peft"
    before = (new / "adapter_model.safetensors").read_bytes()

    def failing(folder, *args, **kwargs):
        (pathlib.Path(folder) / "adapter_model.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_peft", failing)
    with pytest.raises(OSError, match="disk full"):
        export.export(trained_run, new, "peft", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    assert (new / "adapter_model.safetensors").read_bytes() == before
    monkeypatch.undo()

    export.main(["--checkpoint", str(trained_run), "--format", "merged", "--out", str(new), "--force"])
    assert json.loads((new / "flaxlora_export.json").read_text())["format"] == "merged"
    assert not (new / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    for bad, message in [
        (["--checkpoint", str(tmp_path / "nothing"), "--format", "peft", "--out", str(tmp_path / "x")], "no run or checkpoint folder"),
        (["--checkpoint", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "x")], "invalid choice: 'onnx'"),
        (["--checkpoint", str(trained_run), "--format", "merged", "--out", str(trained_run), "--force"], "holds the checkpoint"),
        (["--checkpoint", str(trained_run), "--format", "merged", "--out", str(new / "config.json")], "is not a folder"),
        (["--checkpoint", str(trained_run), "--step", "999", "--format", "peft", "--out", str(tmp_path / "x")], "no checkpoint for step 999"),
    ]:
        with pytest.raises(SystemExit) as err:
            export.main(bad)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
