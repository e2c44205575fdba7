"""Reference points for QQP that need no neural network: majority class and TF-IDF + logistic regression."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, matthews_corrcoef

from flaxlora.qqp.data import QQPSplit


def scores(labels: np.ndarray, predicted: np.ndarray, proba: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, F1 (duplicate class), MCC (and log loss when probabilities are given)."""
    out = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predicted)),
    }
    if proba is not None:
        out["loss"] = float(log_loss(labels, np.clip(proba, 1e-7, 1 - 1e-7), labels=[0, 1]))
    return out


def majority_class(train: QQPSplit, evaluated: QQPSplit) -> dict[str, float]:
    """Always predict the training split's most frequent label."""
    label = int(np.mean(train.labels) >= 0.5)
    rate = float(np.mean(train.labels))
    proba = np.full(len(evaluated), rate)
    return scores(evaluated.labels, np.full(len(evaluated), label), proba)


def _pair_features(vectorizer: TfidfVectorizer, split: QQPSplit) -> sparse.csr_matrix:
    """[|v1 - v2|, v1 * v2] of the two questions' TF-IDF vectors: symmetric in the pair."""
    v1 = vectorizer.transform(split.question1)
    v2 = vectorizer.transform(split.question2)
    return sparse.hstack([abs(v1 - v2), v1.multiply(v2)]).tocsr()


def tfidf_logreg(train: QQPSplit, evaluated: dict[str, QQPSplit], seed: int = 0) -> dict[str, dict[str, float]]:
    """TF-IDF (word 1-2 grams and char 3-5 grams, fit on training questions) of each question,
    pair features ``[|v1 - v2|, v1 * v2]``, and a logistic regression; metrics per split."""
    from sklearn.pipeline import FeatureUnion

    vectorizer = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=3, sublinear_tf=True)),
    ])
    vectorizer.fit(list(train.question1) + list(train.question2))
    model = LogisticRegression(C=4.0, max_iter=2000, random_state=seed)
    model.fit(_pair_features(vectorizer, train), train.labels)
    results = {}
    for name, split in evaluated.items():
        proba = model.predict_proba(_pair_features(vectorizer, split))[:, 1]
        results[name] = scores(split.labels, (proba > 0.5).astype(int), proba)
    return results
