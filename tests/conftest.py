"""Shared fixtures: the two offline pretrained models (loaded once per session) and QQP pairs."""

import csv
import importlib.resources

import pytest

from flaxlora.loading import load_pretrained

QQP_SAMPLE = importlib.resources.files("flaxlora.qqp") / "qqp_sample" / "glue_train_sample_a.tsv"


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
