"""How sequences are grouped into batches (plain numpy, so the benchmarks simulate the full competition in a second).

A batch costs ``rows x its longest row`` tokens. :func:`plan_batches` (training): units shuffled, cut into chunks
sorted by length and packed, the chunk doubling until the epoch's padding efficiency reaches ``target``, batches
shuffled again. :func:`length_sorted_batches` (inference): one sort, longest first. ``max_tokens`` sizes batches by
a token budget (:func:`auto_max_tokens` measures one batch on the GPU); ``packed=True`` concatenates rows.
"""

from __future__ import annotations

import numpy as np

TARGET_EFFICIENCY = 0.98
FIRST_CHUNK_BATCHES = 32  # the smallest chunk, in batches: small data keeps this much shuffling


def padding_efficiency(lengths, batches, packed: bool = False) -> float:
    """Real tokens / computed tokens (rows x longest row, summed over batches); 1.0 when packed."""
    real = sum(int(lengths[i]) for b in batches for i in b)
    if packed:
        return 1.0 if real else 0.0
    padded = sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if b)
    return real / padded if padded else 0.0


def _pack(order, units, unit_len, batch_size: int, max_tokens: int, packed: bool, max_packed: int = 0) -> list[list[int]]:
    """Consecutive units of ``order`` into batches: at most ``batch_size`` rows, or (with a budget) at most
    ``max_tokens`` computed tokens: rows x longest (padded) or the sum of lengths (packed); a packed row also
    at most ``max_packed`` tokens (when set)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    width = total = 0
    for u in order:
        rows, n = len(units[u]), int(unit_len[u])
        if cur:
            if max_tokens:
                cost = total + rows * n if packed else (len(cur) + rows) * max(width, n)
                full = cost > max_tokens
            else:
                full = len(cur) + rows > batch_size
            if packed and max_packed:
                full = full or total + rows * n > max_packed
            if full:
                batches.append(cur)
                cur, width, total = [], 0, 0
        cur.extend(units[u])
        width, total = max(width, n), total + rows * n
    if cur:
        batches.append(cur)
    return batches


def plan_batches(lengths, units: list[list[int]], batch_size: int, seed: int, epoch: int, max_tokens: int = 0,
                 packed: bool = False, target: float = TARGET_EFFICIENCY, max_packed: int = 0) -> list[list[int]]:
    """Micro-batches (lists of sequence indices) for one epoch, reproducible from (seed, epoch).

    ``units``: what is kept together (one sequence, or both A/B orders of a pair). Small data keeps the most
    randomness, large data gets the padding it needs (a fixed chunk pads more as the data grows); the chunks are a
    fresh random split every epoch. ``packed``: nothing is sorted, the budget counts real tokens. ``max_packed``: the
    longest a packed row may be, whatever the budget (attention without varlen kernels is quadratic in it: see
    ``kagglekit.train.packed_cap``).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(units))
    unit_len = np.array([max(int(lengths[i]) for i in u) for u in units], dtype=np.int64)
    if packed:
        batches = _pack(perm.tolist(), units, unit_len, batch_size, max_tokens, packed=True, max_packed=max_packed)
    else:
        per_unit = max(1, len(units[0])) if units else 1
        rows_per_batch = batch_size
        if max_tokens and len(unit_len):
            rows_per_batch = max(1, max_tokens // max(1, int(np.median(unit_len))))
        chunk = max(1, rows_per_batch * FIRST_CHUNK_BATCHES // per_unit)
        while True:
            # Sort each chunk longest first (ties by unit index, so the plan is reproducible).
            chunk_id = np.arange(len(perm)) // chunk
            order = perm[np.lexsort((perm, -unit_len[perm], chunk_id))].tolist()
            batches = _pack(order, units, unit_len, batch_size, max_tokens, packed=False)
            if chunk >= len(perm) or padding_efficiency(lengths, batches) >= target:
                break
            chunk *= 2
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def length_sorted_batches(lengths, batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Inference batches of indices, longest first (an out-of-memory shows up at once), ties by index;
    ``batch_size`` rows each, or with ``max_tokens`` as many rows as fit rows x longest <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not max_tokens:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    unit_len = np.asarray(lengths, dtype=np.int64)
    return _pack(order, [[i] for i in range(len(lengths))], unit_len, batch_size, int(max_tokens), packed=False)


def budget_from_probe(peak_bytes: int, probe_tokens: int, free_bytes: int, longest: int, fraction: float = 0.8,
                      multiple: int = 256) -> int:
    """The token budget that fills ``fraction`` of ``free_bytes``, given that a probe batch of ``probe_tokens``
    padded tokens (at the longest length: the most memory per token) raised peak memory by ``peak_bytes``.
    Never below one longest row; rounded down to ``multiple``."""
    per_token = max(1.0, peak_bytes / max(1, probe_tokens))
    budget = int(fraction * free_bytes / per_token)
    budget -= budget % multiple
    return max(int(longest), budget)


def auto_max_tokens(run_probe, longest: int, device, fraction: float = 0.8, probe_rows: int = 2,
                    what: str = "model.max_length") -> int | None:
    """A token budget from the device's free memory, or None on CPU (batches of rows there: host memory is
    not the limit that matters). ``run_probe(rows, length)`` runs one batch as the real work will (forward,
    or forward and backward); its peak memory per token, measured, sets the budget. A probe that runs out of
    memory is tried again with one row; one row that does not fit is :class:`kagglekit.memory.OutOfMemory`,
    naming ``what`` to lower."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    from .memory import OutOfMemory, free_memory, is_oom

    for rows in sorted({probe_rows, 1}, reverse=True):
        torch.cuda.synchronize(device)
        free_memory(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            run_probe(rows, longest)
            break
        except Exception as e:
            if not is_oom(e):
                raise
        free_memory(device)  # the failed probe's tensors went with its traceback
    else:
        raise OutOfMemory(f"out of GPU memory on a single sequence of {longest} tokens on {device}: lower {what}, "
                          "or set model.gradient_checkpointing=true / model.quantization=4bit")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    free_memory(device)
    free, _ = torch.cuda.mem_get_info(device)
    return budget_from_probe(peak, rows * longest, free, longest, fraction)


def device_signature(device) -> dict:
    """Which GPU a measured budget belongs to (its name and total memory): a budget measured on an H100 is
    not replayed on a T4 (``train.max_tokens: auto`` re-measures when the GPU changed)."""
    if getattr(device, "type", str(device)) != "cuda":
        return {"name": "cpu", "total_memory": 0}
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "total_memory": int(props.total_memory)}
