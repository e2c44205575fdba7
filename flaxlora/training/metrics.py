"""Classification loss and binary metrics as pure jnp functions, usable inside ``jit``.

Sum ``confusion_counts`` over batches (padding rows have weight 0), then call
``metrics_from_counts`` once. Class 1 (duplicate) is the positive class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """``(sum of weighted losses, sum of weights)``; padding rows have weight 0."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


def confusion_counts(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted (tp, fp, tn, fn) as a (4,) float32 array.

    Args:
      logits: (batch, 2) class scores; the prediction is their argmax.
      labels: (batch,) 0/1 int labels.
      weights: (batch,) per-example weights, 0 for padding.
    """
    predicted = jnp.argmax(logits, axis=-1) == 1
    actual = labels == 1
    weights = weights.astype(jnp.float32)
    cells = jnp.stack(
        [predicted & actual, predicted & ~actual, ~predicted & ~actual, ~predicted & actual]
    )
    return jnp.sum(cells * weights, axis=-1)


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, 0.0)


def metrics_from_counts(counts: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, F1, MCC, precision and recall (scalars) from (4,) summed (tp, fp, tn, fn).

    Undefined values are 0, as scikit-learn returns them: precision with no positive
    predictions, recall with no positive labels, F1 with neither, MCC with any empty row or
    column of the confusion matrix.
    """
    tp, fp, tn, fn = jnp.asarray(counts, jnp.float32)
    # sqrt of each factor separately keeps the product in float32 range for large counts.
    mcc_denominator = jnp.sqrt(tp + fp) * jnp.sqrt(tp + fn) * jnp.sqrt(tn + fp) * jnp.sqrt(tn + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": _ratio(tp * tn - fp * fn, mcc_denominator),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }
