"""The README's examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_lora_example_runs_and_learns(capsys):
    block = next(b for b in python_blocks() if "flaxlora.init_lora" in b)
    assert len(block.strip().splitlines()) <= 22
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "layers_0/kernel" in out and "trainable:" in out
    first = float(namespace["optax"].softmax_cross_entropy_with_integer_labels(
        namespace["model"].apply({"params": namespace["params"]}, namespace["x"]), namespace["y"]).mean())
    assert float(namespace["loss"]) < first
