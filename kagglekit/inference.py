"""Batched forward passes shared by evaluation, `kk predict`, the kernel and the benchmarks.

Length-sorted dynamic batching: sequences are ordered by token length, each batch is
padded only to its own longest sequence, and results are put back in the original
order. On a mixed length distribution this is several times faster than padding
every sequence to ``max_length``, with the same logits up to float rounding.
"""

from __future__ import annotations

import numpy as np

from .batching import auto_max_tokens, length_sorted_batches
from .task import LMSYS, Task


def pad_segments(segs, width: int):
    """Segment ids (see Formatter.segments) padded like pad_batch pads the tokens."""
    import torch

    out = torch.zeros((len(segs), width), dtype=torch.long)
    for r, s in enumerate(segs):
        out[r, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def pad_batch(seqs: list[list[int]], pad_id: int, pad_to: int | None = None):
    import torch

    width = pad_to or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[r, : len(s)] = 1
    return ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def infer_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int = 8, device=None, autocast_dtype=None,
                 progress=None, task=None, sort: bool = True, pad_to: int | None = None, counts: dict | None = None,
                 segs: list | None = None, max_tokens: int | str | None = None) -> np.ndarray:
    """Logits (n, number of labels) for token sequences, in input order.

    Rows whose half-precision logits are not finite (fp16 overflow, a known DeBERTa-v3 issue on
    T4) are recomputed in fp32, so one bad row never sinks a submission; their number is added to
    ``counts["fp32_rows"]``. Rows still not finite in fp32 stay NaN for the caller to report.
    ``sort=False`` and ``pad_to`` exist for the benchmarks' baselines (file order,
    fixed padding); kagglekit itself always sorts and pads per batch. ``max_tokens``: batches by a token
    budget (rows x longest <= budget) instead of ``batch_size`` rows; ``"auto"`` measures one batch on a GPU
    and fills 80% of its free memory (rows on CPU).
    """
    import torch

    device = device or next(model.parameters()).device
    out = None  # (n, number of labels): sized by the first batch's logits
    if max_tokens == "auto" and seqs:
        max_tokens = inference_budget(model, seqs, pad_id, device, autocast_dtype, segs)
    if sort:
        batches = length_sorted_batches([len(s) for s in seqs], batch_size, max_tokens or None)
    else:
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in batches:
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, pad_to)
            ids, mask = ids.to(device), mask.to(device)
            seg = pad_segments([segs[i] for i in idx], ids.shape[1]).to(device) if segs is not None else None
            set_segments(model, seg)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            bad = ~torch.isfinite(logits).all(dim=1)
            if autocast_dtype is not None and bool(bad.any()):
                set_segments(model, seg[bad] if seg is not None else None)
                with torch.autocast(device.type, enabled=False):
                    logits[bad] = model(input_ids=ids[bad], attention_mask=mask[bad]).logits.float()
                if counts is not None:
                    counts["fp32_rows"] = counts.get("fp32_rows", 0) + int(bad.sum())
            if out is None:
                out = np.zeros((len(seqs), logits.shape[1]), dtype=np.float32)
            out[idx] = logits.cpu().numpy()
            if progress is not None:
                progress.advance(task, len(idx))
    model.train(was_training)
    return out if out is not None else np.zeros((0, _num_labels(model)), dtype=np.float32)


def _num_labels(model) -> int:
    """The classifier's number of outputs (the task's classes), from the model's config under any wrapper."""
    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    return int(getattr(getattr(m, "config", None), "num_labels", 0))


def inference_budget(model, seqs, pad_id: int, device, autocast_dtype=None, segs=None) -> int | None:
    """``predict.max_tokens: auto``: the token budget measured with a forward pass of the longest sequence
    (cached on the model per length); None on CPU."""
    import torch

    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    width = len(seqs[longest])
    cache = model.__dict__.setdefault("_kk_max_tokens", {})
    if width not in cache:
        def probe(rows, length):
            ids, mask = pad_batch([seqs[longest]] * rows, pad_id)
            if segs is not None:
                set_segments(model, pad_segments([segs[longest]] * rows, length).to(device))
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))

        was_training = model.training
        model.eval()
        cache[width] = auto_max_tokens(probe, width, device)
        model.train(was_training)
    return cache[width]


def tta_average(p_ab: np.ndarray, p_ba: np.ndarray, task: Task = LMSYS) -> np.ndarray:
    """Average a prediction with its swapped prediction mapped back (the task's swap of the classes).

    Exactly swap-equivariant: exchanging A and B in the input exchanges the A and B
    columns of the output, bit for bit (the two terms just trade places in a sum).
    """
    return (p_ab + task.swap_probs(p_ba)) / 2.0


def predict_pairs(model, formatter, df, batch_size: int = 8, tta: bool = True, device=None, autocast_dtype=None,
                  progress=None, description: str = "predict", remove_task: bool = False, cache: dict | None = None,
                  max_tokens: int | str | None = None, task: Task = LMSYS) -> dict:
    """Probabilities for a frame of parsed rows (see :func:`kagglekit.data.load_arena`).

    Returns ``probs`` (TTA-averaged when ``tta``), ``probs_ab`` (the given order),
    ``probs_ba`` (swapped, mapped back; None without TTA) and truncation stats.
    The two orders run as separate passes with identical batch layouts, which keeps
    TTA exactly swap-equivariant. ``cache``: a dict shared by the folds of an ensemble; folds with the
    same tokenizer and formatting settings then tokenize the rows once, not once per fold.
    ``max_tokens``: see :func:`infer_logits` (``predict.max_tokens``). ``task``: whose swap maps the
    (B, A) prediction back.
    """
    key = (formatter.signature(), id(df), len(df)) if cache is not None else None
    if key is not None and key in cache:
        seqs_ab, seqs_ba, stats, stats_ba = cache[key]
    else:
        enc = formatter.encode_rows(df)
        seqs_ab, stats = formatter.sequences(enc, swap=False)
        seqs_ba, stats_ba = formatter.sequences(enc, swap=True) if tta else (None, None)
        if key is not None:
            cache[key] = (seqs_ab, seqs_ba, stats, stats_ba)
    pair = uses_segments(model)
    segs_ab = formatter.segments(stats) if pair else None
    pad_id = formatter.tokenizer.pad_token_id
    total = len(seqs_ab) * (2 if tta else 1)
    bar_task = progress.add_task(description, total=total, status="") if progress is not None else None
    counts = {"fp32_rows": 0}
    p_ab = softmax(infer_logits(model, seqs_ab, pad_id, batch_size, device, autocast_dtype, progress, bar_task, counts=counts,
                                segs=segs_ab, max_tokens=max_tokens))
    p_ba = None
    if tta:
        if seqs_ba is None:  # cached by a no-TTA caller
            seqs_ba, stats_ba = formatter.sequences(formatter.encode_rows(df), swap=True)
        segs_ba = formatter.segments(stats_ba) if pair else None
        p_ba = softmax(infer_logits(model, seqs_ba, pad_id, batch_size, device, autocast_dtype, progress, bar_task, counts=counts,
                                    segs=segs_ba, max_tokens=max_tokens))
        p_ba = task.swap_probs(p_ba)
        probs = (p_ab + p_ba) / 2.0
    else:
        probs = p_ab
    if progress is not None and remove_task:
        progress.remove_task(bar_task)
    if counts["fp32_rows"]:
        from .ui import warn

        warn(f"{description}: {counts['fp32_rows']} sequence(s) overflowed in {str(autocast_dtype).replace('torch.', '')} "
             "and were recomputed in fp32")
    return {"probs": probs, "probs_ab": p_ab, "probs_ba": p_ba, "stats": stats, "fp32_rows": counts["fp32_rows"]}


def uses_segments(model) -> bool:
    """Whether the model pools by segment (model.pooling: pair) and so needs segment ids."""
    from .modeling import segment_poolers

    return bool(segment_poolers(model))


def set_segments(model, seg) -> None:
    from .modeling import segment_poolers

    for m in segment_poolers(model):
        m.segments = seg
