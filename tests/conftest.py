"""Shared fixtures: the two offline pretrained models (loaded once per session), QQP pairs, a
small QQP data folder and the experiments/qqp.py script as a module."""

import csv
import importlib.resources
import importlib.util
import pathlib
import sys

import pytest

from flaxlora.loading import load_pretrained

QQP_SAMPLE = importlib.resources.files("flaxlora.qqp") / "qqp_sample" / "glue_train_sample_a.tsv"
QQP_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "qqp.py"
# The experiment scripts import their shared helpers (experiments/qqp_runs.py) as `python experiments/X.py` does.
sys.path.insert(0, str(QQP_SCRIPT.parent))


@pytest.fixture(scope="session")
def minilm():
    return load_pretrained("minilm-l6")


@pytest.fixture(scope="session")
def smollm2():
    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def qqp_pairs() -> list[tuple[str, str]]:
    """The first 100 (question1, question2) pairs of the GLUE QQP train sample."""
    with QQP_SAMPLE.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["question1"], r["question2"]) for r, _ in zip(rows, range(100))]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """300 real QQP rows in one GLUE-format TSV (hash-split 80/10/10 by the loader)."""
    folder = tmp_path_factory.mktemp("qqp")
    lines = QQP_SAMPLE.read_text(encoding="utf-8").splitlines()[:301]
    (folder / "rows.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def qqp_script():
    """experiments/qqp.py imported as a module (call its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location("qqp_script", QQP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
