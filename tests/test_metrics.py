"""flaxlora.training.metrics against scikit-learn, with weight-0 padding and degenerate label sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from flaxlora.training.metrics import confusion_counts, metrics_from_counts


def _reference(predicted, labels, weights):
    """scikit-learn's values; weight-0 rows are removed, the rest weighted."""
    keep = weights > 0
    args = (labels[keep], predicted[keep])
    kwargs = {"sample_weight": weights[keep]}
    return {
        "accuracy": skm.accuracy_score(*args, **kwargs),
        "f1": skm.f1_score(*args, zero_division=0.0, **kwargs),
        "mcc": skm.matthews_corrcoef(*args, **kwargs),
        "precision": skm.precision_score(*args, zero_division=0.0, **kwargs),
        "recall": skm.recall_score(*args, zero_division=0.0, **kwargs),
    }


def _logits_for(predicted, rng):
    """(n, 2) random logits whose argmax is ``predicted``."""
    low = rng.normal(size=len(predicted))
    high = low + rng.uniform(0.1, 2.0, size=len(predicted))
    return np.where(predicted[:, None] == 1, np.stack([low, high], 1), np.stack([high, low], 1))


def _summed_metrics(logits, labels, weights, batch_size):
    counts_fn = jax.jit(confusion_counts)
    chunks = [slice(i, i + batch_size) for i in range(0, len(labels), batch_size)]
    counts = sum(counts_fn(logits[c], labels[c], weights[c]) for c in chunks)
    return jax.jit(metrics_from_counts)(counts), counts


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 96
    labels = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, 2)).astype(np.float32)
    predicted = logits.argmax(-1)
    # Real rows weigh 1 (or a random positive weight), padding rows 0.
    weights = np.where(rng.random(n) < 0.2, 0.0, 1.0)
    if seed % 2:
        weights = weights * rng.uniform(0.5, 2.0, n)
    values, counts = _summed_metrics(logits, labels, weights.astype(np.float32), batch_size=32)
    assert float(counts.sum()) == pytest.approx(weights.sum(), rel=1e-5)
    expected = _reference(predicted, labels, weights)
    for name, value in expected.items():
        assert float(values[name]) == pytest.approx(value, abs=1e-5), name


def test_padding_rows_do_not_count():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 10)
    weights = np.ones(10, np.float32)
    base = confusion_counts(logits[:6], labels[:6], weights[:6])
    # The last 4 rows are padding: flipping their labels must change nothing.
    padded_weights = np.concatenate([weights[:6], np.zeros(4, np.float32)])
    flipped = np.concatenate([labels[:6], 1 - labels[6:]])
    np.testing.assert_array_equal(confusion_counts(logits, labels, padded_weights), base)
    np.testing.assert_array_equal(confusion_counts(logits, flipped, padded_weights), base)


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize(
    "labels, predicted",
    [
        ([1, 1, 1, 1], [1, 1, 1, 1]),  # one class, all right: MCC undefined.
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # no positives at all: F1, precision, recall undefined.
        ([0, 0, 0, 0], [1, 0, 1, 0]),  # no positive labels.
        ([1, 0, 1, 0], [0, 0, 0, 0]),  # no positive predictions.
        ([1, 1, 0, 0], [0, 0, 1, 1]),  # all wrong: MCC -1.
    ],
)
def test_degenerate_cases_match_sklearn(labels, predicted):
    labels, predicted = np.array(labels), np.array(predicted)
    weights = np.ones(len(labels), np.float32)
    logits = _logits_for(predicted, np.random.default_rng(0))
    values = metrics_from_counts(confusion_counts(jnp.asarray(logits), labels, weights))
    for name, value in _reference(predicted, labels, weights).items():
        assert float(values[name]) == pytest.approx(value, abs=1e-6), name


def test_counts_layout():
    # Rows: TP, FP, TN, FN, FN, and a padding row that would be a TP.
    logits = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    labels = np.array([1, 0, 0, 1, 1, 1])
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
    counts = confusion_counts(logits, labels, weights)
    assert counts.dtype == jnp.float32 and counts.shape == (4,)
    np.testing.assert_array_equal(counts, [1, 1, 1, 2])
