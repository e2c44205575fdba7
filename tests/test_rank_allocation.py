import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyClassifier, toy_batches

import flaxlora
from flaxlora.lora import rank_allocation


def test_greedy_allocation_follows_the_spectra():
    spectra = {"big": np.array([10.0, 9.0, 8.0, 1.0]), "small": np.array([3.0, 0.5, 0.1, 0.0])}
    assert rank_allocation.allocate_ranks(spectra, 4) == {"big": 3, "small": 1}
    assert rank_allocation.allocate_ranks(spectra, 5) == {"big": 4, "small": 1}  # 1.0^2 > 0.5^2
    assert rank_allocation.allocate_ranks(spectra, 4, min_rank=2) == {"big": 2, "small": 2}
    assert rank_allocation.allocate_ranks(spectra, 6, max_rank=3) == {"big": 3, "small": 3}
    with pytest.raises(ValueError, match="budget 1 < min_rank"):
        rank_allocation.allocate_ranks(spectra, 1)
    with pytest.raises(ValueError, match="exceeds"):
        rank_allocation.allocate_ranks(spectra, 9)


def test_allocation_on_a_model_keeps_the_budget_and_the_scale():
    model = ToyClassifier(dropout=0.0)
    batches = toy_batches(3, seed=7)
    params = model.init(jax.random.key(0), batches[0]["input_ids"], batches[0]["attention_mask"])["params"]

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["input_ids"], b["attention_mask"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["labels"][:, None], 1)[:, 0])

    config = flaxlora.LoraConfig(rank=2, alpha=4.0, targets=r"(query|value|head)/kernel$")
    spectra = rank_allocation.gradient_spectra(loss_fn, params, config, batches)
    assert set(spectra) == {"query/kernel", "value/kernel", "head/kernel"}
    assert all(np.all(np.diff(s) <= 1e-6) for s in spectra.values())
    assert len(spectra["head/kernel"]) == 2  # (16, 2) kernel: at most rank 2
    allocated = rank_allocation.allocate(config, params, loss_fn, batches, budget=10)
    ranks = {p: allocated.rank_for(p) for p in spectra}
    assert sum(ranks.values()) == 10 and ranks["head/kernel"] <= 2
    assert ranks == rank_allocation.allocate_ranks(spectra, 10)
    for p, r in ranks.items():
        assert allocated.scale_for(p) == pytest.approx(config.scale_for(p))  # alpha/r kept
    lora = flaxlora.init_lora(params, allocated, jax.random.key(0))
    assert {p: lora[p.split("/")[0]]["kernel"]["a"].shape[-1] for p in ranks} == ranks


def test_allocation_refuses_existing_patterns():
    config = flaxlora.LoraConfig(rank=2, targets="ffn", rank_pattern={"ffn": 1})
    with pytest.raises(ValueError, match="without rank_pattern"):
        rank_allocation.with_ranks(config, {"ffn/kernel": 2})
