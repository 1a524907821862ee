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


def free_memory(device=None) -> None:
    """Collect the garbage an out-of-memory error left (tensors held by its traceback) and return the
    allocator's cached blocks to the GPU, so the retry starts from a clean slate."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.empty_cache()
