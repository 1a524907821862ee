"""Fold models that share a backbone (the kernel): the base is loaded ONCE per device and the folds' LoRA adapters
are switched with peft (``load_adapter`` / ``set_adapter``), never merged.

K folds of a Gemma-2-9B are one 9B base and K adapters of a few hundred MB: loading the base K times
costs minutes each and, without care, two bases beside each other on one T4. peft keeps each adapter
under its own name; for a sequence classifier the heads saved in full (``modules_to_save``: score,
classifier, DeBERTa's pooler) are kept per adapter too, and ``set_adapter`` switches them with the LoRA
weights (checked against peft 0.19.1, Kaggle's, and 0.21: ``ModulesToSaveWrapper.set_adapter``).

Also here, because every model load in a threaded caller needs it: :data:`LOAD_LOCK`. transformers'
``from_pretrained`` sets torch's process-wide default dtype while it builds a model; two threads loading
models of different dtypes (the kernel's one thread per GPU) would build each other's layers in the wrong
dtype. And :func:`release`: a fold model survives ``del`` until the cyclic garbage collector runs, so the
next one would load beside it on the same T4.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .errors import KKError

# One model load at a time in this process (see the module docstring).
LOAD_LOCK = threading.RLock()


def release(device=None, device_map: dict | None = None) -> None:
    """Free what the last model left: collect reference cycles (peft and transformers models have them,
    so ``del`` alone frees nothing), then return cached blocks to the driver on that GPU ONLY (inside
    ``torch.cuda.device(d)``: ``empty_cache`` on another device would stall the thread working there)."""
    import gc

    import torch

    gc.collect()
    indices = set()
    if device is not None and str(device).startswith("cuda"):
        indices.add(torch.device(device).index or 0)
    for d in (device_map or {}).values():
        if isinstance(d, int) or str(d).startswith("cuda"):
            indices.add(d if isinstance(d, int) else (torch.device(d).index or 0))
    for i in sorted(indices):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()


def adapter_name(fold_path) -> str:
    """peft adapter names may not contain dots; a fold path is unique within a kernel."""
    return "f_" + "".join(c if c.isalnum() else "_" for c in str(Path(fold_path).resolve()))[-120:]


def group_key(fold_path, backbone: str) -> tuple:
    """Folds with equal keys can share one loaded base: same backbone weights, quantization, precision,
    pooling and pad token. Full-weight folds (no adapter) never share."""
    from .predict import fold_config

    fold_path = Path(fold_path)
    if not (fold_path / "adapter_config.json").exists():
        return ("full", str(fold_path.resolve()))
    m = fold_config(fold_path).inference_model()  # predict.quantization/precision where set
    return ("adapter", str(Path(backbone).expanduser().resolve()) if Path(backbone).expanduser().exists() else backbone,
            m.quantization, m.precision, m.pooling)


class FoldGroup:
    """One loaded model serving several folds: a shared base with their adapters (switched per call), or one
    full-weight fold. ``device_map``: the base split over several GPUs (the kernel's split plan); inputs then
    go to its first GPU.

    A group of one unquantized, unsplit adapter fold merges it into the base (no LoRA cost at inference),
    as :func:`kagglekit.modeling.load_trained` does; otherwise adapters stay unmerged and switchable."""

    def __init__(self, fold_paths, backbone: str | None = None, device: str | None = None, device_map: dict | None = None,
                 precision: str | None = None):
        from .adapters import check_adapter_fits, read_adapter_config
        from .formatting import Formatter
        from .io import safetensors_errors
        from .modeling import device_and_dtype, fold_base_weights, inference_weight_dtype, load_backbone, load_tokenizer, quiet_libraries
        from .predict import fold_config
        from .task import same_task

        quiet_libraries()
        self.folds = [Path(p) for p in fold_paths]
        if not self.folds:
            raise KKError("a fold group needs at least one fold")
        # The model section inference uses (predict.max_length/quantization/precision where set: issue 20).
        self.cfgs = {p: fold_config(p) for p in self.folds}
        self.models = {p: c.inference_model() for p, c in self.cfgs.items()}
        cfg0, m0 = self.cfgs[self.folds[0]], self.models[self.folds[0]]
        self.task = same_task([c.task for c in self.cfgs.values()], "folds of a group")  # one head size for the base
        self.backbone = backbone or fold_base_weights(self.folds[0], m0)
        if device_map:  # inputs go to the first GPU of a split model; accelerate's hooks move activations on
            device = f"cuda:{min(v for v in device_map.values() if isinstance(v, int))}"
        self.device, self.dtype = device_and_dtype(precision or m0.precision, device)
        self.device_map = device_map
        self.names: dict[Path, str] = {}
        self.formatters = {}
        adapters = [(self.folds[0] / "adapter_config.json").exists()] + [(p / "adapter_config.json").exists() for p in self.folds[1:]]
        if not all(adapters) and len(self.folds) > 1:
            raise KKError("only adapter folds can share a base: " + ", ".join(str(p) for p, a in zip(self.folds, adapters) if not a))
        with LOAD_LOCK:
            if adapters[0]:
                from peft import PeftModel

                adapter_cfgs = {p: read_adapter_config(p) for p in self.folds}  # a hostile r never allocates
                tokenizer = load_tokenizer(str(self.folds[0]))
                model_cfg = m0.model_copy(update={"backbone": self.backbone, "init_from": None})
                # A head of another size in the base checkpoint is expected: each adapter carries its trained head.
                base = load_backbone(model_cfg, tokenizer, self.device, self.dtype,
                                     inference_weight_dtype(model_cfg, self.device, self.dtype), report_mismatch=False,
                                     device_map=device_map, num_labels=self.task.n_classes)
                for p in self.folds:
                    check_adapter_fits(p, adapter_cfgs[p], base)
                first = adapter_name(self.folds[0])
                with safetensors_errors(self.folds[0] / "adapter_model.safetensors"):
                    model = PeftModel.from_pretrained(base, str(self.folds[0]), adapter_name=first)
                self.names[self.folds[0]] = first
                for p in self.folds[1:]:
                    with safetensors_errors(p / "adapter_model.safetensors"):
                        model.load_adapter(str(p), adapter_name=adapter_name(p))
                    self.names[p] = adapter_name(p)
                if len(self.folds) == 1 and m0.quantization == "none" and not device_map:
                    model = model.merge_and_unload()  # one fold: plain weights, no LoRA overhead
                    self.names = {}
            else:
                from .modeling import load_trained

                model, _ = load_trained(self.folds[0], cfg0.model_copy(update={"model": m0}), self.device, self.dtype,
                                        backbone)
        model.eval()
        self.model = model
        for p in self.folds:
            self.formatters[p] = Formatter.from_config(load_tokenizer(str(p)), self.models[p])  # at the inference length
        self.active = None

    def use(self, fold_path) -> None:
        """Make ``fold_path``'s adapter (LoRA weights and its saved heads) the active one."""
        fold_path = Path(fold_path)
        if fold_path not in self.formatters:
            raise KKError(f"{fold_path} is not a fold of this group")
        if self.names and self.active != fold_path:
            self.model.set_adapter(self.names[fold_path])
            self.model.eval()
        self.active = fold_path

    def predict(self, fold_path, df, swap: bool = False, rows=None, progress=None, task=None, cache: dict | None = None) -> np.ndarray:
        """One fold's probabilities of one A/B order for ``rows`` of ``df`` (see inference.predict_order)."""
        from .inference import predict_order

        self.use(fold_path)
        cfg = self.cfgs[Path(fold_path)]
        return predict_order(self.model, self.formatters[Path(fold_path)], df, swap=swap, rows=rows,
                             batch_size=cfg.predict.batch_size, device=self.device, autocast_dtype=self.dtype,
                             progress=progress, task=task, cache=cache, max_tokens=cfg.predict.max_tokens,
                             competition=self.task)

    def close(self) -> None:
        """Drop the model and free its memory on its own GPU(s) (:func:`release`)."""
        self.model = None
        self.formatters = {}
        release(self.device, self.device_map)
