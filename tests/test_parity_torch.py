"""Parity with PyTorch transformers on the same weights (fp32, CPU)."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from test_models import tiny_llama, tiny_roberta
from toy_models import tied_lm_logits

from flaxlora.loading import params_from_hf, to_hf
from flaxlora.loading.registry import resolve
from flaxlora.models import RopeScaling, sequence_classifier
from flaxlora.models.llama import rope_frequencies

LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)


def as_torch(batch) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}


def max_diff(ours, theirs, mask=None) -> float:
    """Largest absolute difference, over real tokens when `mask` (batch, len) is given."""
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
    return float(diff[np.asarray(mask, bool)].max() if mask is not None else diff.max())


def load_state(module: torch.nn.Module, params) -> None:
    """Loads our params into a transformers model; only non-parameter buffers may be left out."""
    result = module.load_state_dict({k: torch.tensor(v) for k, v in to_hf(params).items()}, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("position_ids") for k in result.missing_keys), result.missing_keys


@pytest.fixture(scope="module")
def minilm_batch(minilm, qqp_pairs):
    first, second = map(list, zip(*qqp_pairs[:8]))
    return minilm.tokenizer(first, second, padding=True, return_tensors="np")


def test_minilm_hidden_states_match_torch(minilm, minilm_batch):
    reference = transformers.BertModel.from_pretrained(resolve("minilm-l6")).eval()
    with torch.no_grad():
        expected = reference(**as_torch(minilm_batch)).last_hidden_state.numpy()
    ours = minilm.model.apply({"params": minilm.params}, minilm_batch["input_ids"],
                              minilm_batch["attention_mask"], minilm_batch["token_type_ids"],
                              method="hidden_states")
    diff = max_diff(ours, expected)
    print(f"minilm hidden states, max abs diff {diff:.2e}")
    assert ours.shape == expected.shape and diff < 1e-4


def test_minilm_classifier_logits_match_torch(minilm, minilm_batch):
    config = transformers.BertConfig.from_pretrained(resolve("minilm-l6"), num_labels=2)
    reference = transformers.BertForSequenceClassification(config).eval()
    load_state(reference, minilm.params)
    with torch.no_grad():
        expected = reference(**as_torch(minilm_batch)).logits.numpy()
    ours = minilm.model.apply({"params": minilm.params}, minilm_batch["input_ids"],
                              minilm_batch["attention_mask"], minilm_batch["token_type_ids"])
    diff = max_diff(ours, expected)
    print(f"minilm classifier logits, max abs diff {diff:.2e}")
    assert diff < 1e-4


def test_smollm2_logits_match_transformers_gguf(smollm2, qqp_pairs):
    first, second = map(list, zip(*qqp_pairs[:4]))
    batch = smollm2.tokenizer(first, second, padding=True, return_tensors="np")
    ours = tied_lm_logits(smollm2, batch["input_ids"], batch["attention_mask"])
    gguf = resolve("smollm2-135m")
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    with torch.no_grad():
        expected = reference(**as_torch(batch)).logits.numpy()
    diff = max_diff(ours, expected, batch["attention_mask"])
    print(f"smollm2 logits (|logit| up to {np.abs(expected).max():.0f}), max abs diff {diff:.2e}")
    assert diff < 1e-3


def test_smollm2_tokenizer_matches_transformers_gguf(smollm2, qqp_pairs):
    gguf = resolve("smollm2-135m")
    reference = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    first, second = map(list, zip(*qqp_pairs))
    assert smollm2.tokenizer(first, second)["input_ids"] == reference(first, second)["input_ids"]
    assert smollm2.tokenizer(first)["input_ids"] == reference(first)["input_ids"]


def test_llama3_rope_frequencies_match_transformers():
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, **dataclasses.asdict(LLAMA3_ROPE)})
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_frequencies(tiny_llama(hidden_size=64, num_attention_heads=2, rope_scaling=LLAMA3_ROPE))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


def torch_twin(config):
    """A randomly initialised transformers classifier with the same architecture as `config`."""
    fields = dataclasses.asdict(config)
    if config.model_type == "llama":
        scaling = fields.pop("rope_scaling")
        rope = {"rope_type": "llama3", **scaling} if scaling else {"rope_type": "default"}
        torch_config = transformers.LlamaConfig(
            **{k: v for k, v in fields.items() if k not in ("rope_theta", "model_type")},
            rope_parameters={**rope, "rope_theta": config.rope_theta})
        return transformers.LlamaForSequenceClassification(torch_config).eval()
    torch_config = transformers.RobertaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    return transformers.RobertaForSequenceClassification(torch_config).eval()


@pytest.mark.parametrize("config", [
    tiny_roberta(),
    tiny_llama(head_dim=16, attention_bias=True, rope_scaling=LLAMA3_ROPE, pad_token_id=0),
], ids=["roberta", "llama-gqa-llama3rope-bias"])
def test_random_models_match_torch(config):
    torch.manual_seed(0)
    reference = torch_twin(config)
    model = sequence_classifier(config)
    state = ((k, v.numpy()) for k, v in reference.state_dict().items())
    params, missing, _ = params_from_hf(model, state)
    assert missing == ()
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, config.pad_token_id, config.pad_token_id,
                                               config.pad_token_id, config.pad_token_id]])
    batch = {"input_ids": ids, "attention_mask": (ids != config.pad_token_id).astype(np.int64)}
    backbone = getattr(reference, model.backbone)
    with torch.no_grad():
        expected_hidden = backbone(**as_torch(batch)).last_hidden_state.numpy()
        expected_logits = reference(**as_torch(batch)).logits.numpy()
    hidden = model.apply({"params": params}, ids, batch["attention_mask"], method="hidden_states")
    logits = model.apply({"params": params}, ids, batch["attention_mask"])
    assert max_diff(hidden, expected_hidden, batch["attention_mask"]) < 1e-5
    assert max_diff(logits, expected_logits) < 1e-5
