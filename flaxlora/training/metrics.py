"""Classification loss and binary metrics as pure functions, usable inside ``jit``.

Sum ``confusion_counts`` over batches (padding rows have weight 0), then call
``metrics_from_counts`` once. Class 1 (duplicate) is the positive class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def _ratio(numerator, denominator, xp=jnp):
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division)."""
    safe = xp.where(denominator > 0, denominator, 1.0)
    return xp.where(denominator > 0, numerator / safe, 0.0)


def metrics_from_counts(counts: jax.Array | np.ndarray) -> dict[str, jax.Array | np.ndarray]:
    """Accuracy, F1, MCC, precision and recall from summed (tp, fp, tn, fn): (4,) counts give
    scalars, (..., 4) give (...,). On a jax array (under jit too) in jnp, on a numpy array in
    numpy (no program to compile), float32 either way.

    Undefined values are 0, as scikit-learn returns them: precision with no positive
    predictions, recall with no positive labels, F1 with neither, MCC with any empty row or
    column of the confusion matrix.
    """
    xp = jnp if isinstance(counts, jax.Array) else np
    counts = xp.asarray(counts, xp.float32)
    tp, fp, tn, fn = (counts[..., i] for i in range(4))
    # sqrt of each factor separately keeps the product in float32 range for large counts.
    mcc_denominator = xp.sqrt(tp + fp) * xp.sqrt(tp + fn) * xp.sqrt(tn + fp) * xp.sqrt(tn + fn)
    ratio = functools.partial(_ratio, xp=xp)
    return {
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": ratio(tp * tn - fp * fn, mcc_denominator),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }
