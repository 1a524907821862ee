"""Batched forward passes shared by evaluation, `kk predict`, the kernel and the benchmarks.

Length-sorted dynamic batching: sequences are ordered by token length, each batch is
padded only to its own longest sequence, and results are put back in the original
order. On a mixed length distribution this is several times faster than padding
every sequence to ``max_length``, with the same logits up to float rounding.
"""

from __future__ import annotations

import numpy as np

from .batching import auto_max_tokens, length_sorted_batches
from .errors import KKError
from .task import LMSYS, Task


def pad_segments(segs, width: int):
    """Segment ids (see Formatter.segments) padded like pad_batch pads the tokens."""
    import torch

    out = torch.zeros((len(segs), width), dtype=torch.long)
    for r, s in enumerate(segs):
        out[r, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def pad_batch(seqs: list[list[int]], pad_id: int, pad_to: int | None = None, pin: bool = False):
    """(ids, attention mask), right-padded to the longest row (or ``pad_to``). ``pin``: in page-locked host
    memory, so that ``.to(cuda, non_blocking=True)`` copies while the GPU keeps working."""
    import torch

    width = pad_to or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, pin_memory=pin)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, pin_memory=pin)
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
    T4) are recomputed one by one truly in fp32 (:func:`kagglekit.modeling.true_fp32`: also for weights
    loaded in half precision or 4-bit), so one bad row never sinks a submission; their number is added to
    ``counts["fp32_rows"]``. Rows still not finite in fp32 stay NaN for the caller to report.
    Out of GPU memory, a batch is retried in halves (then quarters...) and every later batch runs in as many
    pieces; a single sequence that does not fit is one line (:class:`kagglekit.memory.OutOfMemory`).
    The logits stay on the device until the end: one host sync per call, not one per batch.
    ``sort=False`` and ``pad_to`` exist for the benchmarks' baselines (file order,
    fixed padding); kagglekit itself always sorts and pads per batch. ``max_tokens``: batches by a token
    budget (rows x longest <= budget) instead of ``batch_size`` rows; ``"auto"`` measures one batch on a GPU
    and fills 80% of its free memory (rows on CPU).
    """
    import torch

    from .memory import OutOfMemory, free_memory, is_oom
    from .modeling import true_fp32
    from .ui import warn

    device = device or next(model.parameters()).device

    if max_tokens == "auto" and seqs:
        max_tokens = inference_budget(model, seqs, pad_id, device, autocast_dtype, segs)
    if sort:
        batches = length_sorted_batches([len(s) for s in seqs], batch_size, max_tokens or None)
    else:
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    cuda = device.type == "cuda"
    out = None  # (n, the task's classes): sized by the first batch's logits, kept on the device

    def run(idx):
        nonlocal out
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id, pad_to, pin=cuda)
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        set_segments(model, pad_segments([segs[i] for i in idx], ids.shape[1]).to(device) if segs is not None else None)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if out is None:
            out = torch.empty((len(seqs), logits.shape[1]), dtype=torch.float32, device=device)
        out[idx] = logits

    pieces = 1  # after an out-of-memory error every batch runs in this many pieces
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in batches:
            while True:
                try:
                    for part in np.array_split(np.asarray(idx), min(pieces, len(idx))):
                        run(part.tolist())
                    break
                except Exception as e:
                    if not is_oom(e):
                        raise
                free_memory(device)  # outside the except block: the error's traceback no longer holds the batch
                if pieces >= len(idx):
                    raise OutOfMemory(f"out of GPU memory predicting one sequence of {max(len(seqs[i]) for i in idx)} tokens on "
                                      f"{device}: lower model.max_length or load the backbone in 4-bit (model.quantization=4bit)")
                pieces *= 2
                warn(f"out of GPU memory: inference batches now run in {pieces} pieces "
                     "(a lower predict.max_tokens or predict.batch_size avoids this)")

            if progress is not None:
                progress.advance(task, len(idx))
        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist() if autocast_dtype is not None and out is not None else []
        if bad:
            try:
                with true_fp32(model):
                    for r in bad:  # one row at a time: fp32 activations are twice the size
                        ids = torch.as_tensor(np.asarray(seqs[r], dtype=np.int64))[None].to(device)
                        set_segments(model, pad_segments([segs[r]], ids.shape[1]).to(device) if segs is not None else None)
                        out[r] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()[0]
            except OutOfMemory:
                raise
            except KKError as e:
                raise KKError(f"{len(bad)} sequence(s) have non-finite {str(autocast_dtype).replace('torch.', '')} logits "
                              f"and cannot be recomputed in fp32: {e}") from None
            except Exception as e:
                if not is_oom(e):
                    raise
                raise OutOfMemory(f"out of GPU memory recomputing {len(bad)} overflowing sequence(s) in fp32 on {device}; "
                                  "use model.precision=bf16 where the GPU has it (compute capability 8.0+)") from None
            if counts is not None:
                counts["fp32_rows"] = counts.get("fp32_rows", 0) + len(bad)
    model.train(was_training)
    if out is None:  # no rows
        return np.zeros((0, _num_labels(model)), dtype=np.float32)
    return out.cpu().numpy()


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


def order_sequences(formatter, df, swap: bool = False, cache: dict | None = None):
    """(token sequences, truncation stats) of every row of ``df`` in one A/B order. ``cache``: a dict shared
    by the folds of an ensemble; folds with the same tokenizer and formatting settings then tokenize the
    rows once, not once per fold (and not once per order)."""
    base = (formatter.signature(), id(df), len(df)) if cache is not None else None
    if base is not None and (*base, swap) in cache:
        return cache[(*base, swap)]
    enc = cache.get((*base, "encoded")) if base is not None else None
    if enc is None:
        enc = formatter.encode_rows(df)
        if base is not None:
            cache[(*base, "encoded")] = enc
    out = formatter.sequences(enc, swap=swap)
    if base is not None:
        cache[(*base, swap)] = out
    return out


def predict_order(model, formatter, df, swap: bool = False, rows=None, batch_size: int = 8, device=None,
                  autocast_dtype=None, progress=None, task=None, cache: dict | None = None,
                  max_tokens: int | str | None = None, counts: dict | None = None, competition: Task = LMSYS) -> np.ndarray:
    """Probabilities of one A/B order for ``rows`` of ``df`` (every row when None), in the original class
    order: a (B,A) prediction is mapped back by ``competition``'s swap of the classes (``task`` is the
    progress bar's). Both orders of a row are laid out identically, which keeps the TTA average exactly
    swap-equivariant. The kernel's passes and :func:`predict_pairs` both run this."""
    seqs, stats = order_sequences(formatter, df, swap, cache)
    segs = formatter.segments(stats) if uses_segments(model) else None
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        seqs = [seqs[i] for i in rows]
        segs = [segs[i] for i in rows] if segs is not None else None
    if not len(seqs):
        return np.zeros((0, competition.n_classes))
    p = softmax(infer_logits(model, seqs, formatter.tokenizer.pad_token_id, batch_size, device, autocast_dtype, progress,
                             task, counts=counts, segs=segs, max_tokens=max_tokens))
    return competition.swap_probs(p) if swap else p


def predict_pairs(model, formatter, df, batch_size: int = 8, tta=True, device=None, autocast_dtype=None,
                  progress=None, description: str = "predict", remove_task: bool = False, cache: dict | None = None,
                  max_tokens: int | str | None = None, tta_share: float = 0.3, task: Task = LMSYS) -> dict:
    """Probabilities for a frame of parsed rows (see :func:`kagglekit.data.load_arena`).

    Returns ``probs`` (TTA-averaged where the second pass ran), ``probs_ab`` (the given order),
    ``probs_ba`` (swapped, mapped back, for ``tta_rows``; None without TTA), ``tta_rows`` (the rows the
    second pass ran on: every row with ``tta=True``, the ``tta_share`` least confident with
    ``tta="uncertain"``, see :mod:`kagglekit.tta`) and truncation stats.
    ``cache``: see :func:`order_sequences`; ``max_tokens``: see :func:`infer_logits` (``predict.max_tokens``);
    ``task``: the competition, whose swap maps the (B,A) pass back.
    """
    from .tta import merge_passes, tta_mode, uncertain_rows

    mode = tta_mode(tta)
    n = len(df)
    total = n * {"full": 2, "none": 1}.get(mode, 1 + tta_share)
    bar_task = progress.add_task(description, total=total, status="") if progress is not None else None
    counts = {"fp32_rows": 0}
    run = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, progress=progress, task=bar_task,
               cache=cache, max_tokens=max_tokens, counts=counts, competition=task)
    p_ab = predict_order(model, formatter, df, swap=False, **run)
    _, stats = order_sequences(formatter, df, False, cache)
    rows = None if mode == "full" else uncertain_rows(p_ab, tta_share) if mode == "uncertain" else np.zeros(0, np.int64)
    p_ba = predict_order(model, formatter, df, swap=True, rows=rows, **run) if mode != "none" else None
    probs = merge_passes(p_ab, p_ba, rows)
    if progress is not None and remove_task:
        progress.remove_task(bar_task)
    if counts["fp32_rows"]:
        from .ui import warn

        warn(f"{description}: {counts['fp32_rows']} sequence(s) overflowed in {str(autocast_dtype).replace('torch.', '')} "
             "and were recomputed in fp32")
    tta_rows = np.arange(n) if mode == "full" else rows if rows is not None else np.zeros(0, np.int64)
    return {"probs": probs, "probs_ab": p_ab, "probs_ba": p_ba, "tta_rows": tta_rows, "stats": stats,
            "fp32_rows": counts["fp32_rows"]}


def uses_segments(model) -> bool:
    """Whether the model pools by segment (model.pooling: pair) and so needs segment ids."""
    from .modeling import segment_poolers

    return bool(segment_poolers(model))


def set_segments(model, seg) -> None:
    from .modeling import segment_poolers

    for m in segment_poolers(model):
        m.segments = seg
