import jax
import pytest
from toy_models import toy_setup

import flaxlora


def test_config_is_hashable_and_round_trips():
    config = flaxlora.LoraConfig(rank=4, alpha=8, rank_pattern={"ffn": 2}, in_axes={"out": 2})
    assert hash(config) == hash(flaxlora.LoraConfig(**config.to_dict()))
    assert flaxlora.LoraConfig(**config.to_dict()) == config
    assert config.rank_for("ffn/kernel") == 2 and config.rank_for("query/kernel") == 4
    assert config.scale_for("query/kernel") == 2.0
    assert flaxlora.LoraConfig(rank=4, alpha=8, scaling="rslora").scale_for("x") == 4.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init="xavier"), "init must be one of"),
        (dict(scaling="sqrt"), "scaling must be one of"),
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(alpha=-1.0), "alpha must be > 0"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(targets="("), "invalid regex"),
        (dict(rank_pattern={"ffn": 0}), r"rank_pattern\['ffn'\]"),
        (dict(trainable="[x"), "trainable: invalid regex"),
    ],
)
def test_invalid_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flaxlora.LoraConfig(**kwargs)


def test_errors_resolving_against_params():
    _, params, _ = toy_setup()
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match=r"matches no parameter.*candidates are: .*ffn/kernel"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(targets="q_proj"), rng)
    with pytest.raises(ValueError, match=r"rank 20 for 'ffn/kernel' exceeds min\(fan_in, fan_out\) = min\(16, 32\)"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(rank=20, targets="ffn/kernel"), rng)
    with pytest.raises(ValueError, match="rank_pattern pattern 'nowhere' matches no LoRA target"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(targets="ffn", rank_pattern={"nowhere": 2}), rng)
    with pytest.raises(ValueError, match="trainable 'classifier' matches no parameter"):
        flaxlora.trainable_params(params, flaxlora.LoraConfig(targets="ffn", trainable="classifier"))
    with pytest.raises(ValueError, match="both LoRA-adapted and fully trainable"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(targets="ffn", trainable="ffn"), rng)
    with pytest.raises(ValueError, match="too few axes"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(targets="ffn", in_axes={"ffn": 2}), rng)


def test_rank_pattern_overrides_per_target():
    _, params, _ = toy_setup()
    config = flaxlora.LoraConfig(rank=4, targets=r"(query|ffn)/kernel$", rank_pattern={"ffn": 2}, alpha_pattern={"ffn": 1.0})
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    assert lora["ffn"]["kernel"]["a"].shape == (16, 2)
    assert lora["query"]["kernel"]["a"].shape == (16, 4)
    assert config.scale_for("ffn/kernel") == 0.5


def test_no_targets_means_extras_only():
    model, params, x = toy_setup()
    with pytest.raises(ValueError, match="trains nothing"):
        flaxlora.LoraConfig(targets=None)
    config = flaxlora.LoraConfig(targets=None, trainable=".*")
    assert flaxlora.init_lora(params, config, jax.random.key(0)) == {}
    extras = flaxlora.trainable_params(params, config)
    assert sum(x.size for x in jax.tree.leaves(extras)) == sum(x.size for x in jax.tree.leaves(params))
    merged = flaxlora.merge(params, {}, config, extras)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), merged, params))


def test_layout_patterns_must_name_a_parameter():
    _, params, _ = toy_setup()
    with pytest.raises(ValueError, match="in_axes pattern 'outt/kernel' matches no parameter"):
        flaxlora.init_lora(params, flaxlora.LoraConfig(targets="ffn", in_axes={"outt/kernel": 2}), jax.random.key(0))
