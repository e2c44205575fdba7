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
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(max_skipped_steps=0), "max_skipped_steps must be >= 1"),
    (dict(lora=RunConfig().lora.replace(dropout=0.1), lora_path="merged"), "use lora_path='factored'"),
    (dict(members=0), "members must be >= 1"),
    (dict(members=2, seed=2**31), r"members \* \(seed \+ 1\) <= 2\*\*32"),
    (dict(members=2, lora=PRESETS["full"].lora), "full fine-tuning has none; use --members 1"),
    (dict(members=2, rank_budget=32), "--rank-budget gives each its own; use --members 1"),
    (dict(members=3, lora=RunConfig().lora.replace(init="pissa")), "init 'pissa' gives each its own"),
])
def test_invalid_run_configs_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)


def test_ensemble_members_are_single_runs_with_their_own_seeds():
    run = PRESETS["enhanced"].replace(members=3, seed=5)
    assert [run.member(i).seed for i in range(3)] == [15, 16, 17]
    assert run.member(2) == run.replace(members=1, seed=17)
    assert RunConfig(seed=5).member(0) == RunConfig(seed=5)  # a single run is its own member
    with pytest.raises(ValueError, match="member 3 of a run with 3 members"):
        run.member(3)


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_enhanced_preset_adapts_every_linear_layer_under_two_percent(model, request):
    import jax

    from flaxlora import pytree
    from flaxlora.lora.adapters import init_lora, trainable_params
    from flaxlora.lora.summary import summarize

    params = request.getfixturevalue(model).params
    summaries = {
        name: summarize(params, init_lora(params, run.lora, jax.random.key(0)), run.lora, trainable_params(params, run.lora))
        for name, run in PRESETS.items() if name in ("lora", "enhanced")
    }
    members = PRESETS["enhanced"].members  # each member trains its own adapters and extras
    assert summaries["lora"].trainable_fraction < members * summaries["enhanced"].trainable_fraction < 0.02
    kernels = {p for p, leaf in pytree.flatten(params).items() if p.endswith("/kernel") and leaf.ndim == 2}
    adapted = {row[0] for row in summaries["enhanced"].rows}
    assert adapted == {p for p in kernels if not p.startswith(("classifier", "score"))}


def test_batch_sizes_must_split_over_the_mesh_batch_axes():
    """On 8 (simulated) devices, checked before any data or weight is loaded."""
    import os
    import subprocess
    import sys

    code = """
from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.run import check_hardware
for changes in (dict(mesh="data=4,fsdp=2", eval_batch_size=12), dict(mesh="data=2,tensor=4", batch_size=31)):
    try:
        check_hardware(RunConfig(**changes))
    except ValueError as err:
        print(err)
print(dict(check_hardware(RunConfig(mesh="data=2,tensor=4", batch_size=32, eval_batch_size=6)).shape))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("--eval-batch-size 12 must be a multiple of the 8 devices on the batch axes")
    assert lines[1].startswith("--batch-size 31 must be a multiple of the 2 devices")
    assert lines[2] == "{'data': 2, 'fsdp': 1, 'tensor': 4}"
