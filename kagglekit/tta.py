"""Swap test-time augmentation: which rows get the second, swapped-order pass.

``predict.tta``: ``true`` (every row as (A,B) and as (B,A), the two averaged), ``false`` ((A,B) only) or
``uncertain``: the (B,A) pass only on the ``predict.tta_share`` rows whose (A,B) prediction is least confident
(lowest top probability; the WSDM Cup's 1st place). A row without the second pass keeps its (A,B) prediction. One
rule (:func:`second_pass_rows`) for ``kk predict`` / ``kk ensemble``, the kernel's passes (ranked by a run's
fold-mean (A,B) probabilities, the uncertainty of what is submitted), validation during training and
``benchmarks/bench_tta.py`` (what it gives up against full TTA on your runs).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import KKError


def tta_mode(tta) -> str:
    """``full``, ``none`` or ``uncertain`` for a ``predict.tta`` value (True, False or "uncertain")."""
    if tta is True or (isinstance(tta, str) and tta.lower() in ("true", "full")):
        return "full"
    if tta is False or tta is None or (isinstance(tta, str) and tta.lower() in ("false", "none")):
        return "none"
    if isinstance(tta, str) and tta.lower() == "uncertain":
        return "uncertain"
    raise KKError(f"predict.tta must be true, false or uncertain (got {tta!r})")


def second_pass_share(tta, share: float = 1.0) -> float:
    """The share of rows the (B,A) pass covers: 1 (full), 0 (none) or ``share`` (uncertain)."""
    return {"full": 1.0, "none": 0.0}.get(tta_mode(tta), float(share))


def uncertain_rows(probs: np.ndarray, share: float) -> np.ndarray:
    """Indices (ascending) of the ``ceil(share x n)`` rows with the lowest top probability: the least
    confident first-pass predictions. Ties are broken by row order, so the choice is reproducible."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    k = min(n, math.ceil(max(0.0, float(share)) * n - 1e-9))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(probs.max(axis=1), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def second_pass_rows(tta, share: float, first_probs: np.ndarray) -> np.ndarray:
    """The rows the (B,A) pass runs on, from the (A,B) probabilities (a run's fold mean, or one fold's own)."""
    mode = tta_mode(tta)
    if mode == "full":
        return np.arange(len(first_probs))
    return uncertain_rows(first_probs, share) if mode == "uncertain" else np.zeros(0, dtype=np.int64)


def merge_passes(p_ab: np.ndarray, p_ba: np.ndarray | None, rows: np.ndarray | None = None) -> np.ndarray:
    """The TTA average on the rows that had the second pass, the (A,B) prediction elsewhere.

    ``p_ba``: the (B,A) probabilities mapped back to the original class order, for ``rows`` (every row
    when ``rows`` is None); None when no second pass ran."""
    out = np.array(p_ab, dtype=np.float64, copy=True)
    if p_ba is None:
        return out
    if rows is None:
        return (out + p_ba) / 2.0
    out[rows] = (out[rows] + p_ba) / 2.0
    return out
