"""Out-of-memory on the GPU: recognised, freed, and turned into one line that names the setting to lower.

Training, inference and the ``auto`` budget probes retry with smaller pieces when the GPU runs out of memory
(see ``kagglekit.train.fit`` and ``kagglekit.inference.infer_logits``); what cannot be made smaller (one
sequence that does not fit) becomes :class:`OutOfMemory`, a :class:`KKError`: ``error: ...`` on the command
line, a failed trial (marked, the study goes on) in ``kk tune``.
"""

from __future__ import annotations

from .errors import KKError


class OutOfMemory(KKError):
    """The GPU ran out of memory and nothing smaller could be tried; the message names what to lower."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: ``torch.OutOfMemoryError`` (CUDA's), or one of the
    messages accelerate's ``should_reduce_batch_size`` recognises (cuDNN, CPU allocator...)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    try:
        from accelerate.utils.memory import should_reduce_batch_size
    except ImportError:  # accelerate is a dependency of peft; this is only a safety net
        return False
    return should_reduce_batch_size(exc)


def free_memory(device=None, device_map: dict | None = None) -> None:
    """Collect the garbage a model or an out-of-memory error left (peft and transformers models hold reference cycles,
    so ``del`` alone frees nothing; an error's traceback holds its tensors), then return the allocator's cached blocks
    to the driver on the GPU(s) of ``device`` / ``device_map`` ONLY (inside ``torch.cuda.device(i)``: ``empty_cache``
    on another device would stall the thread working there, the kernel's other GPU)."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return
    indices = set()
    for d in [device, *(device_map or {}).values()]:
        if isinstance(d, int) or str(getattr(d, "type", d)).startswith("cuda"):
            index = d if isinstance(d, int) else torch.device(d).index
            indices.add(torch.cuda.current_device() if index is None else index)
    for i in sorted(indices):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()
