import pytest

from flaxlora.qqp.config import PRESETS, RunConfig


def test_presets_round_trip_through_json_dicts():
    for name, run in PRESETS.items():
        assert RunConfig.from_dict(run.to_dict()) == run, name
    with pytest.raises(ValueError, match="unknown run config fields"):
        RunConfig.from_dict({**RunConfig().to_dict(), "epocs": 3})


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=30, accum_steps=4), "multiple of accum_steps"),
    (dict(buckets=(64, 32)), "buckets must be increasing"),
    (dict(buckets=(32, 256)), "end at max_length"),
    (dict(buckets=(32, 64)), "end at max_length 128"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(lora_path="fast"), "lora_path must be"),
    (dict(eval_examples=0), "eval_examples must be >= 1"),
    (dict(lora=RunConfig().lora.replace(dropout=0.1), lora_path="merged"), "use lora_path='factored'"),
])
def test_invalid_run_configs_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_enhanced_preset_adapts_every_linear_layer_under_two_percent(model, request):
    import jax

    from flaxlora import pytree
    from flaxlora.lora.adapters import init_lora, trainable_params
    from flaxlora.lora.summary import summarize
    from flaxlora.qqp.config import ENHANCED_LORA, PLAIN_LORA

    params = request.getfixturevalue(model).params
    summaries = {
        name: summarize(params, init_lora(params, config, jax.random.key(0)), config, trainable_params(params, config))
        for name, config in (("plain", PLAIN_LORA), ("enhanced", ENHANCED_LORA))
    }
    assert summaries["plain"].trainable_fraction < summaries["enhanced"].trainable_fraction < 0.02
    kernels = {p for p, leaf in pytree.flatten(params).items() if p.endswith("/kernel") and leaf.ndim == 2}
    adapted = {row[0] for row in summaries["enhanced"].rows}
    assert adapted == {p for p in kernels if not p.startswith(("classifier", "score"))}
