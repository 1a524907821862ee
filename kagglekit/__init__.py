"""kagglekit: K-fold LoRA models, swap TTA and offline kernels for Kaggle's LLM
Classification Finetuning (LMSYS Chatbot Arena) competition and the WSDM Cup 2025
Multilingual Chatbot Arena (``get_task("lmsys" | "wsdm")``).

Heavy pieces load lazily: ``from kagglekit import Predictor`` imports torch only then.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Config": ("kagglekit.config", "Config"),
    "load_config": ("kagglekit.config", "load_config"),
    "load_train": ("kagglekit.data", "load_train"),
    "load_test": ("kagglekit.data", "load_test"),
    "make_folds": ("kagglekit.folds", "make_folds"),
    "make_synthetic": ("kagglekit.synthetic", "make_synthetic"),
    "train_fold": ("kagglekit.train", "train_fold"),
    "Predictor": ("kagglekit.predict", "Predictor"),
    "KKError": ("kagglekit.errors", "KKError"),
    "get_task": ("kagglekit.task", "get_task"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kagglekit' has no attribute {name!r}")
