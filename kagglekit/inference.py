"""The prediction core: token sequences tokenized once (:class:`TokenCache`: per formatter settings, shared across
folds, passes and validation during training), one A/B order of one fold through an
:class:`~kagglekit.engine.Engine` (the (B,A) order mapped back by the task's swap), swap TTA. Both orders of a row
are laid out identically, which keeps the TTA average exactly swap-equivariant.
"""

from __future__ import annotations

import numpy as np

from .engine import softmax


class TokenCache:
    """Token sequences of a frame's rows per formatter settings and A/B order: the rows are tokenized once however
    many folds (with one tokenizer and the same formatting settings) and passes read them. Holds the frame, so the
    key (its identity) cannot be reused by another frame while the cache lives."""

    def __init__(self):
        self._encoded: dict = {}
        self._orders: dict = {}

    def sequences(self, fmt, df, swap: bool = False):
        """(token sequences, truncation stats) of every row of ``df`` in one order."""
        key = (fmt.signature(), id(df))
        if (key, swap) not in self._orders:
            if key not in self._encoded:
                self._encoded[key] = (df, fmt.encode_rows(df))
            self._orders[key, swap] = fmt.sequences(self._encoded[key][1], swap=swap)
        return self._orders[key, swap]


def predict_order(engine, fold, df, swap: bool = False, rows=None, cache: TokenCache | None = None, on_rows=None) -> np.ndarray:
    """Probabilities of one A/B order of ``fold`` for ``rows`` of ``df`` (every row when None), in the original class
    order: a (B,A) prediction is mapped back by the task's swap."""
    engine.use(fold)
    fmt = engine.formatter(fold)
    seqs, stats = (cache if cache is not None else TokenCache()).sequences(fmt, df, swap)
    segs = fmt.segments(stats) if engine.config(fold).model.pooling == "pair" else None
    if rows is not None:
        seqs = [seqs[i] for i in rows]
        segs = [segs[i] for i in rows] if segs is not None else None
    if not len(seqs):
        return np.zeros((0, engine.task.n_classes))
    p = softmax(engine.logits(seqs, segs, on_rows))
    return engine.task.swap_probs(p) if swap else p


def predict_tta(engine, fold, df, tta=True, cache: TokenCache | None = None, on_rows=None, description: str = "predict") -> dict:
    """One fold's probabilities for a frame of parsed rows (:func:`kagglekit.data.load_arena`) with swap TTA.

    Returns ``probs`` (TTA-averaged where the second pass ran), ``probs_ab`` (the given order), ``probs_ba``
    (swapped, mapped back, for ``tta_rows``; None without TTA), ``tta_rows`` (every row with ``tta=True``, the
    fold's ``predict.tta_share`` least confident with ``"uncertain"``) and the truncation stats."""
    from .tta import merge_passes, second_pass_rows
    from .ui import warn

    cache = cache if cache is not None else TokenCache()
    before = engine.counts["fp32_rows"] if hasattr(engine, "counts") else 0
    p_ab = predict_order(engine, fold, df, False, None, cache, on_rows)
    rows = second_pass_rows(tta, engine.config(fold).predict.tta_share, p_ab)
    p_ba = predict_order(engine, fold, df, True, rows, cache, on_rows) if len(rows) else None
    fp32 = engine.counts["fp32_rows"] - before if hasattr(engine, "counts") else 0
    if fp32:
        warn(f"{description}: {fp32} sequence(s) overflowed in {str(getattr(engine, 'dtype', '')).replace('torch.', '')} "
             "and were recomputed in fp32")
    return {"probs": merge_passes(p_ab, p_ba, rows), "probs_ab": p_ab, "probs_ba": p_ba, "tta_rows": rows,
            "stats": cache.sequences(engine.formatter(fold), df)[1], "fp32_rows": fp32}
