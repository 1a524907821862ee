"""Simulated CUDA: tests of GPU-only code paths on a machine without a GPU (see tests/README.md).

Nothing here runs a kernel on a GPU. It makes ``torch.cuda`` *answer* like a machine with GPUs, records what
kagglekit asks of it, and spies on the calls whose arguments decide whether a first GPU run works
(``from_pretrained``'s ``device_map``/``dtype``/``attn_implementation``, ``torch.cuda.set_device``,
``init_process_group``). Out-of-memory errors are raised where a GPU would raise them: from a forward pass.

    from cudasim import Stop, inject_oom, oom_after_load, simulated_cuda, spy

    with simulated_cuda(devices=2, capability=(7, 5)) as gpu:      # two T4s
        device, dtype = device_and_dtype("auto")                  # cuda:0, fp16
        with spy(AutoModelForSequenceClassification, "from_pretrained", stop=True) as calls, pytest.raises(Stop):
            load_backbone(cfg.model, tok, device, dtype)          # stops right after the call is recorded
    assert calls[0].kwargs["device_map"] == {"": 0}

    with oom_after_load(when=lambda ids: ids.shape[0] > 1) as oom:   # any batch of 2+ rows runs out of memory
        train_fold(cfg, 0, run)                                     # ... so training retries in pieces
    assert oom.raised > 0

Real tensors stay on the CPU: code under ``simulated_cuda`` must not move a tensor to ``cuda`` (that needs
a CUDA build of torch); tests stop at the recorded call (``spy(..., stop=True)``), or run the CPU device
while CUDA-only decisions are simulated. Half-precision weights run on the CPU as they are (fp16/bf16
matmuls work there), which is how the fp32 recompute of overflowing rows is checked.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

GIB = 1024**3

# What a GPU says when it runs out of memory (torch.cuda.OutOfMemoryError's own wording).
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB of which 1.12 GiB is free."


class Stop(Exception):
    """Raised by ``spy(..., stop=True)`` right after it records a call: the test has what it needs."""


@dataclass
class Call:
    args: tuple
    kwargs: dict


@dataclass
class SimulatedCuda:
    """What the patched ``torch.cuda`` reports, and what it was asked."""

    devices: int = 1
    capability: tuple = (7, 5)
    name: str = "Tesla T4"
    total: int = int(15 * GIB)
    free: int = int(14 * GIB)
    current: int = 0
    allocated: int = 0  # memory_allocated(); a test's probe may raise ``peak`` to simulate its use
    peak: int = 0  # max_memory_allocated()
    set_device_calls: list = field(default_factory=list)
    device_blocks: list = field(default_factory=list)
    empty_cache_calls: int = 0

    def _index(self, device=None) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        import torch

        d = torch.device(device)
        return self.current if d.index is None else d.index

    def set_device(self, device) -> None:
        index = self._index(device)
        if not 0 <= index < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (simulated: {self.devices} device(s))")
        self.set_device_calls.append(index)
        self.current = index

    @contextlib.contextmanager
    def device(self, device):
        """``torch.cuda.device(i)``: device ``i`` current inside the block (recorded in ``device_blocks``)."""
        prev, index = self.current, self._index(device)
        self.device_blocks.append(index)
        self.current = index
        try:
            yield
        finally:
            self.current = prev

    def properties(self, device=None):
        self._index(device)
        major, minor = self.capability
        return SimpleNamespace(name=self.name, total_memory=self.total, major=major, minor=minor,
                               multi_processor_count=40)

    def reset_peak(self, device=None) -> None:
        self.peak = self.allocated

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1


@contextlib.contextmanager
def simulated_cuda(devices: int = 1, capability: tuple = (7, 5), name: str = "Tesla T4", total_gib: float = 15.0,
                   free_gib: float = 14.0):
    """``torch.cuda`` as on a machine with ``devices`` GPUs of compute capability ``capability`` (7.5 = T4,
    8.0 = A100, 9.0 = H100), ``total_gib`` each with ``free_gib`` free. Patched: is_available, device_count,
    current_device, set_device, get_device_capability, get_device_name, get_device_properties,
    is_bf16_supported (True, as a T4 claims through emulation), mem_get_info, memory_allocated,
    max_memory_allocated, reset_peak_memory_stats, synchronize, empty_cache, get/set_rng_state_all.
    Yields the :class:`SimulatedCuda` (change its fields to change the answers)."""
    import torch

    sim = SimulatedCuda(devices, tuple(capability), name, int(total_gib * GIB), int(free_gib * GIB))
    patches = {
        "is_available": lambda: True,
        "device_count": lambda: sim.devices,
        "current_device": lambda: sim.current,
        "set_device": sim.set_device,
        "get_device_capability": lambda device=None: sim.capability,
        "get_device_name": lambda device=None: sim.name,
        "get_device_properties": sim.properties,
        "is_bf16_supported": lambda *a, **k: True,
        "mem_get_info": lambda device=None: (sim.free, sim.total),
        "memory_allocated": lambda device=None: sim.allocated,
        "max_memory_allocated": lambda device=None: sim.peak,
        "reset_peak_memory_stats": sim.reset_peak,
        "synchronize": lambda device=None: None,
        "empty_cache": sim.empty_cache,
        "device": sim.device,
        "get_rng_state_all": lambda: [],
        "set_rng_state_all": lambda states: None,
    }
    with contextlib.ExitStack() as stack:
        for attr, fake in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, attr, fake))
        yield sim


@contextlib.contextmanager
def spy(owner, attr: str, *, stop: bool = False, passthrough: bool = True, returns=None, side_effect=None):
    """Record every call of ``owner.attr`` (a function, method or classmethod) as :class:`Call` objects in the
    yielded list. ``stop``: raise :class:`Stop` right after recording; otherwise call the real one
    (``passthrough``) or return ``returns``. ``side_effect(*args, **kwargs)`` runs first (e.g. to look at
    what else is true at the moment of the call)."""
    real = getattr(owner, attr)
    calls: list[Call] = []

    def fake(*args, **kwargs):
        calls.append(Call(args, kwargs))
        if side_effect is not None:
            side_effect(*args, **kwargs)
        if stop:
            raise Stop(f"{attr} called")
        return real(*args, **kwargs) if passthrough else returns

    with mock.patch.object(owner, attr, fake):
        yield calls


@contextlib.contextmanager
def distributed_env(world: int, rank: int, local_rank: int | None = None, side_effect=None):
    """The environment torchrun gives rank ``rank`` of ``world``, plus a spy on
    ``torch.distributed.init_process_group`` (never really called: no NCCL here) with ``is_initialized``
    answering False until it is called. ``side_effect`` as in :func:`spy` (e.g. to read
    ``torch.cuda.current_device()`` at that moment). Yields the list of recorded :class:`Call` objects."""
    import torch.distributed as dist

    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with mock.patch.dict(os.environ, env), spy(dist, "init_process_group", passthrough=False, side_effect=side_effect) as calls, \
            mock.patch.object(dist, "is_initialized", lambda: bool(calls)):
        yield calls


@dataclass
class OOMRecord:
    calls: int = 0  # watched forward calls
    raised: int = 0  # out-of-memory errors raised


def _ids_of(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("input_ids", kwargs.get("input"))


@contextlib.contextmanager
def inject_oom(module, when=None, at=None):
    """Raise ``torch.cuda.OutOfMemoryError`` from a forward pre-hook on ``module``, as a GPU would mid-forward.
    ``at``: on the n-th call (1-based; an int or a collection of ints); ``when(ids)``: on any call whose input
    (first positional argument or ``input_ids``: rows x length token ids for an embedding layer) satisfies it;
    neither: every call. Yields an :class:`OOMRecord`."""
    record = OOMRecord()
    hook = _oom_hook(record, when, at)
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def _oom_hook(record, when=None, at=None):
    """The forward pre-hook of :func:`inject_oom` and :func:`oom_after_load`: counts calls in ``record`` and raises
    CUDA's out-of-memory error at the ``at``-th call(s), or where ``when(input ids)`` is true, or always."""
    import torch

    at = {at} if isinstance(at, int) else set(at or ())

    def hook(mod, args, kwargs):
        record.calls += 1
        hit = record.calls in at if at else (when(_ids_of(args, kwargs)) if when is not None else True)
        if hit:
            record.raised += 1
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)

    return hook


@contextlib.contextmanager
def oom_after_load(when=None, at=None):
    """:func:`inject_oom` on the token embeddings (``get_input_embeddings()``, called with the rows x length
    ids of every forward pass, padded or packed) of every model ``AutoModelForSequenceClassification
    .from_pretrained`` loads inside the block: for models built deep inside ``train_fold`` or ``FoldModel``.
    The yielded :class:`OOMRecord` counts over all of them; the hooks go when the block ends."""
    from transformers import AutoModelForSequenceClassification

    record = OOMRecord()
    hook = _oom_hook(record, when, at)
    real = AutoModelForSequenceClassification.from_pretrained

    handles = []

    def load(*args, **kwargs):
        result = real(*args, **kwargs)
        # load_backbone asks for (model, loading info); fold loads get the model alone
        model = result[0] if isinstance(result, tuple) else result
        handles.append(model.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True))
        return result

    try:
        with mock.patch.object(AutoModelForSequenceClassification, "from_pretrained", load):
            yield record
    finally:
        for handle in handles:  # models that outlive the block run normally again
            handle.remove()
