"""What the user's machine and the Kaggle notebook agree on: names of the sentinel files,
the competition's slug, the files of a fold that travel, Kaggle's limits."""

MANIFEST = "kk_manifest.json"
WHEELS_SENTINEL = "kk_wheels.json"
HIDDEN_TEST_ROWS = 25_000
KAGGLE_LIMIT_H = 9.0
# Files of a fold that inference needs (checkpoints and logs stay home).
FOLD_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json", "config.yaml",
              "metrics.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spm.model",
              "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")
# Accelerators `kernel-metadata.json` may name. The P100 is listed to be recognised and refused: Kaggle's
# image (torch built for CUDA 12.8) has no kernels for its sm_60 (kk kernel refuses it; a notebook that
# gets one anyway stops with one line).
MACHINE_SHAPES = ("NvidiaTeslaT4", "NvidiaL4", "NvidiaTeslaT4Highmem", "NvidiaTeslaP100")


def check_budget_h(hours: float) -> float:
    """A notebook's time budget in hours, in (0, 24] (NaN refused too: every comparison with it is false)."""
    from ..errors import KKError

    if not 0 < float(hours) <= 24:
        raise KKError(f"--time-budget-h must be in (0, 24] hours (got {float(hours):g})")
    return float(hours)
