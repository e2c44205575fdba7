import dataclasses

import numpy as np
import pytest

from flaxlora.qqp import baselines
from flaxlora.qqp.data import load_qqp


@pytest.fixture(scope="module")
def data():
    return load_qqp()


def head(split, n):
    return dataclasses.replace(split, ids=split.ids[:n], question1=split.question1[:n],
                               question2=split.question2[:n], labels=split.labels[:n])


def test_majority_class_scores(data):
    result = baselines.majority_class(data["train"], data["test"])
    assert result["mcc"] == 0.0 and result["f1"] == 0.0  # the majority label is "not duplicate"
    assert result["accuracy"] == pytest.approx(1 - np.mean(data["test"].labels))


def test_tfidf_logreg_beats_the_majority_class(data):
    result = baselines.tfidf_logreg(head(data["train"], 3000), {"validation": data["validation"]})["validation"]
    majority = baselines.majority_class(data["train"], data["validation"])
    assert result["accuracy"] > majority["accuracy"] + 0.08
    assert result["mcc"] > 0.3 and result["loss"] < majority["loss"]
