"""The code has no unused imports or variables, undefined names or syntax errors (pyflakes rules)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyflakes_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--output-format", "concise",
                             "flaxlora", "experiments", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_anywhere():
    """Nothing is ever unpickled: weights are safetensors or GGUF, checkpoints orbax (tensorstore +
    JSON), the token cache npz read with allow_pickle=False, everything else JSON."""
    import re

    banned = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b"
                        r"|torch\.load\(|allow_pickle\s*=\s*True|pd\.read_pickle|\.load\(.*\bpickle\b")
    np_load = re.compile(r"\bnp\.load\(")
    offenders = []
    for path in sorted((ROOT / "flaxlora").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line) or (np_load.search(line) and "allow_pickle=False" not in line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
