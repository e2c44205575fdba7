import os

import jax
import numpy as np
import pytest
from toy_models import ToyClassifier, toy_batches

import flaxlora
from flaxlora import training
from flaxlora.training.checkpoint import Checkpointer

CONFIG = flaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"(query|value)/kernel$", trainable=r"^head/", dropout=0.1)


def setup():
    model = ToyClassifier(dropout=0.2)
    batches = toy_batches(8, seed=11)
    params = model.init(jax.random.key(0), batches[0]["input_ids"], batches[0]["attention_mask"])["params"]
    tx = flaxlora.lora_optimizer(training.learning_rate_schedule(1e-2, 8, 2), loraplus_ratio=4.0)
    state, frozen = training.init_train_state(params, CONFIG, tx, jax.random.key(1))
    step = jax.jit(lambda s, f, b: training.train_step(s, f, b, apply=training.logits_fn(model, CONFIG, "factored"), tx=tx))
    return state, frozen, step, batches


def test_resume_is_bitwise_exact(tmp_path):
    state, frozen, step, batches = setup()
    fresh = state
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        for i, batch in enumerate(batches):
            state, _ = step(state, frozen, batch)
            if i + 1 in (2, 3, 5):
                ckpt.save(state, {"data": {"position": i + 1}})
        assert ckpt.all_steps() == [3, 5]  # keeps the last two
    # A new process restores step 5 and replays the remaining batches.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed, meta = ckpt.restore(fresh)
    assert meta == {"data": {"position": 5}} and int(resumed.step) == 5
    for batch in batches[meta["data"]["position"]:]:
        resumed, _ = step(resumed, frozen, batch)
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_inference_restore_needs_no_optimizer(tmp_path):
    state, frozen, step, batches = setup()
    state, _ = step(state, frozen, batches[0])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state, {"lora_config": CONFIG.to_dict()})
    trainable, meta = Checkpointer(tmp_path, read_only=True).restore_for_inference()
    assert flaxlora.LoraConfig(**meta["lora_config"]) == CONFIG
    for x, y in zip(jax.tree.leaves(trainable), jax.tree.leaves(state.trainable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "nowhere", read_only=True)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.read_meta()
    state, frozen, step, batches = setup()
    with Checkpointer(tmp_path / "one") as ckpt:
        ckpt.save(state, {})
        with pytest.raises(FileNotFoundError, match=r"step 7 .*steps found: \[0\]"):
            ckpt.restore(state, step=7)
    assert os.listdir(tmp_path / "one") == ["0"]


def test_inference_restore_on_another_device_count(tmp_path):
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name("eight_device_checkpoint.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trainable, meta = Checkpointer(tmp_path / "ckpt", read_only=True).restore_for_inference()  # here: 1 device
    a = trainable["lora"]["query"]["kernel"]["a"]
    assert meta == {"x": 1} and len(a.sharding.device_set) == 1
    assert float(np.asarray(a).sum()) == float(out.stdout.strip().splitlines()[-1])


def _data_files(step_dir, item):
    """The files orbax reads the arrays of ``item`` from (OCDBT data and b-tree files)."""
    return [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(step_dir):
    for p in _data_files(step_dir, "trainable"):
        os.truncate(p, p.stat().st_size // 2)


def _overwrite(step_dir):
    for p in _data_files(step_dir, "train"):
        data = bytearray(p.read_bytes())
        data[len(data) // 2: len(data) // 2 + 32] = b"\xa5" * 32
        p.write_bytes(bytes(data))


def _delete(step_dir):
    for p in _data_files(step_dir, "trainable"):
        p.unlink()


def _garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"data": ')


@pytest.mark.parametrize("garble", [_truncate, _overwrite, _delete, _garble_meta])
def test_unreadable_latest_step_falls_back_to_the_previous_one(tmp_path, garble, caplog):
    state, frozen, step, batches = setup()
    fresh = state
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        for i, batch in enumerate(batches):
            state, _ = step(state, frozen, batch)
            if i + 1 in (3, 5):
                ckpt.save(state, {"data": {"position": i + 1}})
    garble(tmp_path / "ckpt" / "5")
    with Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:  # inference: skipped, left in place
        trainable, meta = ckpt.restore_for_inference()
        assert meta["data"]["position"] == 3 and [s for s, _ in ckpt.skipped] == [5]
        assert ckpt.all_steps() == [3, 5]
    with caplog.at_level("WARNING", logger="flaxlora.training.checkpoint"), Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed, meta = ckpt.restore(fresh)
        assert ckpt.all_steps() == [3]  # step 5 moved aside, so the run can save step 5 again
    assert "skipping unreadable checkpoint step 5" in caplog.text
    assert (tmp_path / "ckpt.unreadable" / "5").is_dir()
    assert int(resumed.step) == 3 and meta["data"]["position"] == 3
    for batch in batches[3:]:
        resumed, _ = step(resumed, frozen, batch)
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(resumed, {"data": {"position": 8}})
        assert ckpt.all_steps() == [3, 8]


def test_no_readable_step_is_one_named_error(tmp_path):
    state, frozen, step, batches = setup()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state, {})
    _truncate(tmp_path / "ckpt" / "0")
    with Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
        with pytest.raises(ValueError, match=r"no readable checkpoint in .*step 0: ") as err:
            ckpt.restore_for_inference()
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=r"checkpoint step 0 in .* is unreadable") as err:
            ckpt.restore_for_inference(step=0)
        assert "\n" not in str(err.value)


def test_non_finite_params_are_never_saved(tmp_path):
    state, frozen, step, batches = setup()
    poisoned = state.replace(trainable=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf), state.trainable))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(FloatingPointError, match="refusing to save step 0"):
            ckpt.save(poisoned, {})
        assert ckpt.all_steps() == []
