"""Log loss, accuracy and swap diagnostics on (n, n_classes) probability arrays (classes in the task's
order; the first two are always "A wins" and "B wins")."""

from __future__ import annotations

import numpy as np

from .task import LMSYS

EPS = 1e-15


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class log loss as Kaggle scores it (rows renormalised, clipped)."""
    return float(np.mean(row_log_loss(probs, labels)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def per_class_accuracy(probs: np.ndarray, labels: np.ndarray, names=LMSYS.class_names) -> dict:
    pred = probs.argmax(axis=1)
    return {n: float((pred[labels == i] == i).mean()) if (labels == i).any() else float("nan") for i, n in enumerate(names)}


def prior_log_loss(labels: np.ndarray, n_classes: int = LMSYS.n_classes) -> float:
    """The log loss of always predicting the class shares: the bar a model must clear."""
    shares = np.bincount(labels, minlength=n_classes) / len(labels)
    return log_loss(np.tile(shares, (len(labels), 1)), labels)


def group_accuracy(probs: np.ndarray, labels: np.ndarray, groups) -> list[tuple[str, int, float]]:
    """(group, rows, accuracy) per value of ``groups`` (a language column), most rows first."""
    groups = np.asarray(groups, dtype=object)
    hit = probs.argmax(axis=1) == labels
    names, counts = np.unique(groups.astype(str), return_counts=True)
    order = sorted(zip(names, counts), key=lambda nc: (-nc[1], nc[0]))
    return [(str(g), int(c), float(hit[groups.astype(str) == g].mean())) for g, c in order]


def swap_flip_rate(p_ab: np.ndarray, p_ba_mapped: np.ndarray) -> float:
    """Share of rows whose A-vs-B preference flips when the order is swapped (0 = order-invariant)."""
    return float(((p_ab[:, 0] > p_ab[:, 1]) != (p_ba_mapped[:, 0] > p_ba_mapped[:, 1])).mean())


def row_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row log loss (the terms :func:`log_loss` averages): what paired comparisons resample."""
    p = np.clip(probs / probs.sum(axis=1, keepdims=True), EPS, 1 - EPS)
    return -np.log(p[np.arange(len(labels)), labels])


def paired_bootstrap(loss_a: np.ndarray, loss_b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``loss_a - loss_b`` over the same rows with a paired bootstrap interval.

    Rows are resampled together, so what varies between the two models on a row (its difficulty) cancels:
    a difference whose interval excludes 0 is not explained by which rows happened to be held out.
    Returns ``{"diff", "low", "high", "p_better"}`` where ``p_better`` is the share of resamples in which
    ``a`` has the lower loss."""
    d = np.asarray(loss_a, dtype=np.float64) - np.asarray(loss_b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty per-row loss arrays")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    return {"diff": float(d.mean()), "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)),
            "p_better": float((means < 0).mean())}
