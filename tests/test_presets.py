import pytest

from flaxlora.presets import PRESETS, RunConfig


def test_presets_round_trip_through_json_dicts():
    for name, run in PRESETS.items():
        assert RunConfig.from_dict(run.to_dict()) == run, name
    with pytest.raises(ValueError, match="unknown run config fields"):
        RunConfig.from_dict({**RunConfig().to_dict(), "epocs": 3})


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=30, accum_steps=4), "multiple of accum_steps"),
    (dict(buckets=(64, 32)), "buckets must be increasing"),
    (dict(buckets=(32, 256)), "ending at max_length"),
    (dict(buckets=(32, 64)), "ending at max_length 128"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(lora_path="fast"), "lora_path must be"),
    (dict(lora=RunConfig().lora.replace(dropout=0.1)), "needs lora_path='factored'"),
])
def test_invalid_run_configs_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)
