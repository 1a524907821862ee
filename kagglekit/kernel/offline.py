"""Runs ON KAGGLE, inside the notebook, with the internet off: fold models -> submission.csv.

It imports nothing from the build, dry-run or push modules: what it needs travels in the wheel."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import KKError
from .common import MANIFEST


def _find_backbone(input_root: Path, source: str) -> Path:
    """A folder with a model config under the mount of a --backbone-source dataset/model."""
    slug = source.split("/")[1] if "/" in source else source
    for dirpath, dirnames, filenames in os.walk(input_root, followlinks=True):
        dirnames.sort()
        if "config.json" in filenames and slug in Path(dirpath).parts:
            return Path(dirpath)
    raise KKError(f"backbone source {source} is not attached under {input_root}")


def run_offline(artifacts, test_csv, out, sample_submission=None, input_root=None, tta: bool = True) -> dict:
    """Predict ``test_csv`` with every fold in the artifacts dataset and write the submission.

    Folds are spread over the GPUs (two on Kaggle's T4 x2) in threads; on CPU they run in turn.
    """
    import numpy as np

    from ..data import load_test
    from ..ensemble import apply_temperature, combine, finalize_probs, write_submission
    from ..predict import FoldModel

    t0 = time.time()
    artifacts = Path(artifacts)
    manifest = json.loads((artifacts / MANIFEST).read_text())
    test_df, _ = load_test(test_csv)
    jobs = []
    for r, entry in enumerate(manifest["runs"]):
        bb = entry.get("backbone", {})
        backbone = str(artifacts / bb["path"]) if "path" in bb else str(_find_backbone(Path(input_root or artifacts.parent), bb["source"]))
        for k in entry["folds"]:
            jobs.append((r, artifacts / entry["name"] / f"fold_{k}", backbone))
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except ImportError:
        n_gpu = 0
    devices = [f"cuda:{i}" for i in range(n_gpu)] or ["cpu"]
    timings = []

    def predict(job_index: int):
        r, path, backbone = jobs[job_index]
        t = time.time()
        fm = FoldModel(path, backbone, device=devices[job_index % len(devices)])
        t_load = time.time() - t
        probs = fm.predict(test_df, tta=tta)["probs"]
        timings.append({"fold": str(path.relative_to(artifacts)), "load_s": t_load, "predict_s": time.time() - t - t_load,
                        "device": str(fm.device)})
        del fm
        return r, probs

    if len(devices) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # One worker per GPU, each taking every n-th fold: both T4s busy the whole time.
        with ThreadPoolExecutor(len(devices)) as pool:
            results = list(pool.map(predict, range(len(jobs))))
    else:
        results = [predict(i) for i in range(len(jobs))]
    per_run = []
    for r in range(len(manifest["runs"])):
        fold_probs = [p for rr, p in results if rr == r]
        per_run.append(combine(fold_probs, method=manifest.get("method", "mean")))
    probs = apply_temperature(combine(per_run, manifest["weights"]), manifest["temperature"])
    final = finalize_probs(probs)
    if not np.isfinite(final).all():
        raise KKError("the ensemble produced NaN probabilities")
    path = write_submission(test_df["id"].to_numpy(), final, out, force=True, sample_submission=sample_submission)
    seconds = time.time() - t0
    passes = len(jobs) * (2 if tta else 1)
    # Per-row cost from prediction time alone (loading is a fixed cost per fold), per GPU in parallel.
    predict_s = sum(t["predict_s"] for t in timings) / len(devices)
    return {"submission": str(path), "rows": len(test_df), "folds": len(jobs), "passes": passes, "devices": devices,
            "seconds": round(seconds, 2), "load_s": round(sum(t["load_s"] for t in timings) / len(devices), 2),
            "seconds_per_row_pass": predict_s / max(1, len(test_df) * passes), "timings": timings}


# --- the dry run --------------------------------------------------------------------------------------------------


