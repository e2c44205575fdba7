import jax.numpy as jnp
from flax import nnx

from flaxlora import pytree
from flaxlora.lora.targets import lora_candidates


def test_flatten_unflatten_replace():
    tree = {"enc": {"layer": [{"w": jnp.ones((2, 3))}, {"w": jnp.zeros((2, 3))}]}, "b": jnp.ones(3)}
    flat = pytree.flatten(tree)
    assert list(flat) == ["b", "enc/layer/0/w", "enc/layer/1/w"]
    assert pytree.unflatten({"x/y": 1, "x/z": 2, "w": 3}) == {"x": {"y": 1, "z": 2}, "w": 3}
    new = pytree.replace(tree, {"enc/layer/1/w": jnp.full((2, 3), 5.0)})
    assert float(new["enc"]["layer"][1]["w"][0, 0]) == 5.0
    assert float(new["enc"]["layer"][0]["w"][0, 0]) == 1.0
    assert lora_candidates(tree) == [("enc/layer/0/w", (2, 3)), ("enc/layer/1/w", (2, 3))]
    assert list(pytree.flatten(pytree.select(tree, ["b"]))) == ["b"]


def test_nnx_paths_drop_the_value_attribute():
    state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))[1]
    assert sorted(pytree.flatten(state)) == ["bias", "kernel"]
