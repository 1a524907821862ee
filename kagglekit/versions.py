"""Library versions, read from package metadata (nothing is imported): recorded beside every trained
fold and compared by the Kaggle notebook with the image's own."""

from __future__ import annotations

import platform

LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "accelerate", "bitsandbytes", "compressed-tensors", "vllm")


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def major_mismatches(trained: dict, here: dict) -> list[str]:
    """Libraries whose major version differs between training and here (e.g. transformers 4 vs 5)."""
    out = []
    for name in LIBRARIES:
        a, b = trained.get(name), here.get(name)
        if a and b and a.split(".")[0] != b.split(".")[0]:
            out.append(f"{name} {a} (trained) vs {b} (here)")
    return out
