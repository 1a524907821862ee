"""Inference engines behind one seam, and the Hugging Face engine (README, "One prediction path").

Everything that predicts goes through an :class:`Engine` (``predict.engine`` chooses it, ``ENGINES``), a loaded
model serving a group of folds, which only turns token sequences into logits. :class:`HFEngine` never merges
adapters, not even for a fold alone, so a fold predicts the same numbers whichever folds share its base, at the
price of the LoRA matmuls (``kk merge --unload`` makes a plain model). :data:`LOAD_LOCK`: ``from_pretrained``
sets torch's process-wide default dtype while building, so the kernel's GPU threads load one at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from .batching import auto_max_tokens, length_sorted_batches
from .errors import KKError

LOAD_LOCK = threading.RLock()
ENGINES = {"hf": ("kagglekit.engine", "HFEngine"), "vllm": ("kagglekit.vllm_engine", "VLLMEngine")}


class Engine(Protocol):
    """One loaded model serving a group of folds (a shared base with switched adapters, or one full-weight fold).
    Constructed as ``Engine(folds, backbone=None, device=None, device_map=None, overrides=None)``."""

    task: object  # kagglekit.task.Task
    device: object  # where inputs go (the first GPU of a split model)

    def config(self, fold) -> object: ...  # the fold's inference config (--set predict.* applied)
    def formatter(self, fold) -> object: ...  # the fold's Formatter at its inference length
    def use(self, fold) -> None: ...  # make this fold's weights (adapter and head) the active ones
    def logits(self, seqs: list, segs: list | None = None, on_rows: Callable[[int], None] | None = None) -> np.ndarray: ...
    # (len(seqs), classes) float32 logits in input order; on_rows(k) after each chunk of k rows (progress, time budget)
    def close(self) -> None: ...  # free its memory now


def open_engine(folds: list, backbone: str | None = None, device=None, device_map: dict | None = None,
                overrides: list[str] | None = None) -> Engine:
    """The engine ``predict.engine`` names (the first fold's; a group shares one), loaded with ``folds``."""
    import importlib

    name = getattr(folds[0].inference(overrides).predict, "engine", "hf")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)(folds, backbone, device, device_map, overrides)


def group_key(fold, backbone: str, overrides: list[str] | None = None) -> tuple:
    """Folds with equal keys can share one loaded base: same backbone weights, quantization, precision, pooling
    and engine. Full-weight folds (no adapter) never share."""
    if not fold.adapter:
        return ("full", str(fold.path.resolve()))
    m, p = fold.inference(overrides).inference_model(), fold.inference(overrides).predict
    local = Path(backbone).expanduser()
    return ("adapter", str(local.resolve()) if local.exists() else backbone, m.quantization, m.precision, m.pooling,
            getattr(p, "engine", "hf"))


class HFEngine:
    """transformers' forward pass over a group of folds (see the module docstring). ``device_map``: the base split
    over several GPUs (the kernel's split plan); inputs then go to its first GPU."""

    def __init__(self, folds: list, backbone: str | None = None, device=None, device_map: dict | None = None,
                 overrides: list[str] | None = None):
        from .formatting import Formatter
        from .modeling import device_and_dtype, fold_base_weights, load_tokenizer, quiet_libraries
        from .task import same_task

        quiet_libraries()
        if not folds:
            raise KKError("an engine needs at least one fold")
        self.folds = list(folds)
        self.cfgs = {f: f.inference(overrides) for f in self.folds}
        models = {f: c.inference_model() for f, c in self.cfgs.items()}  # predict.max_length/quantization/precision
        f0, m0 = self.folds[0], models[self.folds[0]]
        self.task = same_task([c.task for c in self.cfgs.values()], "folds of a group")  # one head size for the base
        if self.cfgs[f0].predict.threads:
            import torch

            torch.set_num_threads(self.cfgs[f0].predict.threads)
        if device_map:  # inputs go to the first GPU of a split model; accelerate's hooks move activations on
            device = f"cuda:{min(v for v in device_map.values() if isinstance(v, int))}"
        self.device, self.dtype = device_and_dtype(m0.precision, device)
        self.device_map, self.names, self.active, self.counts = device_map, {}, None, {"fp32_rows": 0}
        if len(self.folds) > 1 and not all(f.adapter for f in self.folds):
            raise KKError("only adapter folds can share a base: " + ", ".join(str(f.path) for f in self.folds if not f.adapter))
        tokenizers = {f: load_tokenizer(str(f.path)) for f in self.folds}
        base_cfg = m0.model_copy(update={"backbone": backbone or fold_base_weights(f0.path, m0), "init_from": None})
        with LOAD_LOCK, _oom_as_one_line(f"loading {f0.path} on {self.device}"):
            self.model = self._load_adapters(base_cfg, tokenizers[f0]) if f0.adapter else self._load_full(f0, m0, tokenizers[f0])
        self.model.eval()
        self.formatters = {f: Formatter.from_config(tokenizers[f], models[f]) for f in self.folds}  # at the inference length

    def _load_adapters(self, model_cfg, tokenizer):
        from peft import PeftModel

        from .adapters import check_adapter_fits, read_adapter_config
        from .io import safetensors_errors
        from .modeling import inference_weight_dtype, load_backbone

        adapter_cfgs = {f: read_adapter_config(f.path) for f in self.folds}  # a hostile r never allocates
        # A head of another size in the base checkpoint is expected: each adapter carries its trained head.
        base = load_backbone(model_cfg, tokenizer, self.device, self.dtype, inference_weight_dtype(model_cfg, self.device, self.dtype),
                             report_mismatch=False, device_map=self.device_map, num_labels=self.task.n_classes)
        model = None
        for f in self.folds:
            check_adapter_fits(f.path, adapter_cfgs[f], base)
            self.names[f] = "f_" + "".join(c if c.isalnum() else "_" for c in str(f.path.resolve()))[-120:]  # no dots
            with safetensors_errors(f.path / "adapter_model.safetensors"):
                if model is None:
                    model = PeftModel.from_pretrained(base, str(f.path), adapter_name=self.names[f])
                else:
                    model.load_adapter(str(f.path), adapter_name=self.names[f])
        return model

    def _load_full(self, fold, model_cfg, tokenizer):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from .io import load_safetensors, safetensors_errors
        from .modeling import apply_pooling, attention_implementation, no_remote_code

        if not (fold.path / "config.json").exists():
            raise KKError(f"{fold.path} has no adapter_config.json or config.json: not a trained fold")
        with safetensors_errors(fold.path):
            attn = attention_implementation(AutoConfig.from_pretrained(str(fold.path), **no_remote_code(fold.path)))
            model = AutoModelForSequenceClassification.from_pretrained(str(fold.path), num_labels=self.task.n_classes,
                                                                       attn_implementation=attn, trust_remote_code=False)
        model.config.pad_token_id = tokenizer.pad_token_id
        if model_cfg.pooling != "cls":
            # The pooling wrapper's weights (and the pooler under it) are saved under the wrapper's names: wrap first.
            apply_pooling(model, model_cfg.pooling)
            for f in sorted(fold.path.glob("model*.safetensors")):
                model.load_state_dict(load_safetensors(f), strict=False)
        return model.to(self.device)

    @classmethod
    def live(cls, model, formatter, cfg, device, dtype, task) -> HFEngine:
        """An engine over a model in memory (validation while it trains): the key ``None`` is its one fold."""
        self = cls.__new__(cls)
        self.folds, self.cfgs, self.formatters = [None], {None: cfg}, {None: formatter}
        self.model, self.task, self.device, self.dtype, self.device_map = model, task, device, dtype, None
        self.names, self.active, self.counts = {}, None, {"fp32_rows": 0}
        return self

    def config(self, fold):
        return self.cfgs[fold]

    def formatter(self, fold):
        return self.formatters[fold]

    def use(self, fold) -> None:
        if fold not in self.cfgs:
            raise KKError(f"{getattr(fold, 'path', fold)} is not a fold of this engine")
        if self.names and self.active is not fold:
            self.model.set_adapter(self.names[fold])
            self.model.eval()
        self.active = fold

    def logits(self, seqs, segs=None, on_rows=None) -> np.ndarray:
        fold = self.active if self.active is not None else self.folds[0]
        p = self.cfgs[fold].predict
        return infer_logits(self.model, seqs, self.formatters[fold].tokenizer.pad_token_id, p.batch_size, self.device,
                            self.dtype, on_rows, counts=self.counts, segs=segs, max_tokens=p.max_tokens)

    def close(self) -> None:
        from .memory import free_memory

        self.model, self.formatters = None, {}
        free_memory(self.device, self.device_map)


@contextlib.contextmanager
def _oom_as_one_line(what: str):
    """Out of GPU memory while loading: one line naming the fix, not a traceback."""
    from .memory import OutOfMemory, is_oom

    try:
        yield
    except Exception as e:
        if isinstance(e, KKError) or not is_oom(e):
            raise
        raise OutOfMemory(f"out of GPU memory {what}: free the GPU (another model loaded?), or predict with "
                          "--set predict.quantization=4bit") from None


# --- batched forward passes ---------------------------------------------------------------------------------------------


def pad_batch(seqs: list, pad_id: int, pad_to: int | None = None, pin: bool = False, segs: list | None = None):
    """(ids, attention mask[, segment ids]), right-padded to the longest row (or ``pad_to``). ``pin``: in page-locked
    host memory, so that ``.to(cuda, non_blocking=True)`` copies while the GPU keeps working."""
    import torch

    width = pad_to or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, pin_memory=pin)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, pin_memory=pin)
    seg = torch.zeros((len(seqs), width), dtype=torch.long) if segs is not None else None
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[r, : len(s)] = 1
        if seg is not None:
            seg[r, : len(s)] = torch.as_tensor(np.asarray(segs[r], dtype=np.int64))
    return (ids, mask) if seg is None else (ids, mask, seg)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def set_segments(model, seg) -> None:
    """Segment ids for the pair poolers (model.pooling: pair), set before every forward."""
    from .modeling import segment_poolers

    for m in segment_poolers(model):
        m.segments = seg


def infer_logits(model, seqs: list, pad_id: int, batch_size: int = 8, device=None, autocast_dtype=None, on_rows=None,
                 sort: bool = True, pad_to: int | None = None, counts: dict | None = None, segs: list | None = None,
                 max_tokens: int | str | None = None) -> np.ndarray:
    """Logits (n, number of labels) for token sequences, in input order; ``on_rows(k)`` after each batch of k rows.

    Rows whose half-precision logits are not finite (fp16 overflow, a known DeBERTa-v3 issue on T4) are recomputed
    one by one truly in fp32 (:func:`kagglekit.modeling.true_fp32`: also for weights loaded in half precision or
    4-bit), so one bad row never sinks a submission; their number is added to ``counts["fp32_rows"]``. Rows still
    not finite in fp32 stay NaN for the caller to report. Out of GPU memory, a batch is retried in halves (then
    quarters...) and every later batch runs in as many pieces; a single sequence that does not fit is one line
    (:class:`kagglekit.memory.OutOfMemory`). The logits stay on the device until the end: one host sync per call.
    ``sort=False`` and ``pad_to`` exist for the benchmarks' baselines (file order, fixed padding). ``max_tokens``:
    batches by a token budget (rows x longest <= budget) instead of ``batch_size`` rows; ``"auto"`` measures one
    batch on a GPU and fills 80% of its free memory (rows on CPU).
    """
    import torch

    from .memory import OutOfMemory, free_memory, is_oom
    from .modeling import classifier_of, true_fp32
    from .ui import warn

    device = device or next(model.parameters()).device
    if not seqs:
        return np.zeros((0, classifier_of(model).config.num_labels), dtype=np.float32)
    if max_tokens == "auto":
        max_tokens = inference_budget(model, seqs, pad_id, device, autocast_dtype, segs)
    if sort:
        batches = length_sorted_batches([len(s) for s in seqs], batch_size, max_tokens or None)
    else:
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    cuda = device.type == "cuda"
    out = None  # (n, the task's classes): sized by the first batch's logits, kept on the device

    def forward(idx, fp32=False):
        nonlocal out
        padded = pad_batch([seqs[i] for i in idx], pad_id, None if fp32 else pad_to, pin=cuda and not fp32,
                           segs=[segs[i] for i in idx] if segs is not None else None)
        set_segments(model, padded[2].to(device) if segs is not None else None)
        ids, mask = padded[0].to(device, non_blocking=True), padded[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None and not fp32):
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
                        forward(part.tolist())
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
            if on_rows is not None:
                on_rows(len(idx))
        bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist() if autocast_dtype is not None else []
        if bad:
            try:
                with true_fp32(model):
                    for r in bad:  # one row at a time: fp32 activations are twice the size
                        forward([r], fp32=True)
            except KKError as e:
                if isinstance(e, OutOfMemory):
                    raise
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
    return out.cpu().numpy()


def inference_budget(model, seqs, pad_id: int, device, autocast_dtype=None, segs=None) -> int | None:
    """``predict.max_tokens: auto``: the token budget measured with a forward pass of the longest sequence
    (cached on the model per length); None on CPU."""
    import torch

    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    width = len(seqs[longest])
    cache = model.__dict__.setdefault("_kk_max_tokens", {})
    if width not in cache:
        def probe(rows, length):
            padded = pad_batch([seqs[longest]] * rows, pad_id, segs=[segs[longest]] * rows if segs is not None else None)
            set_segments(model, padded[2].to(device) if segs is not None else None)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(input_ids=padded[0].to(device), attention_mask=padded[1].to(device))

        was_training = model.training
        model.eval()
        cache[width] = auto_max_tokens(probe, width, device)
        model.train(was_training)
    return cache[width]
