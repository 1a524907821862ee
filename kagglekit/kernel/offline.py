"""Runs ON KAGGLE, inside the notebook, with the internet off: fold models -> submission.csv.

It imports nothing from the build, dry-run or push modules: what it needs travels in the wheel."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import KKError
from .common import MANIFEST


def find_backbone(input_root: Path, source: str, name: str | None = None) -> Path:
    """The folder of a --backbone-source dataset/model that holds the recorded backbone.

    Candidates are folders with a ``config.json`` under the source's mount (the dataset slug, or the
    model name of ``owner/model/framework/variation/version``); with several, the one named like
    the backbone recorded at training time (``deberta-v3-base`` of ``microsoft/deberta-v3-base``),
    never merely the alphabetically first; still ambiguous or none: one clear error."""
    parts = source.split("/")
    slug = parts[1] if len(parts) > 1 else parts[0]
    candidates = []
    for dirpath, dirnames, filenames in os.walk(input_root, followlinks=True):
        dirnames.sort()
        if "config.json" in filenames and slug in Path(dirpath).relative_to(input_root).parts:
            candidates.append(Path(dirpath))
    if len(candidates) > 1 and name:
        want = Path(name.rstrip("/")).name
        named = [c for c in candidates if c.name == want or want in c.relative_to(input_root).parts]
        candidates = named or candidates
    if not candidates:
        raise KKError(f"backbone source {source} is not attached under {input_root} (no config.json under a '{slug}' folder)")
    if len(candidates) > 1:
        raise KKError(f"backbone source {source}: {len(candidates)} model folders could be {name or 'the backbone'}: "
                      + ", ".join(map(str, candidates)))
    return candidates[0]


def check_source_handle(source: str) -> str:
    """``owner/slug`` (a dataset) or ``owner/model/framework/variation/version`` (a Kaggle model)."""
    parts = source.split("/")
    if len(parts) not in (2, 5) or not all(parts) or (len(parts) == 5 and not parts[4].isdigit()):
        raise KKError(f"--backbone-source {source!r}: give a dataset as owner/slug or a model as "
                      "owner/model/framework/variation/version (version a number)")
    return source


def run_offline(artifacts, test_csv, out, sample_submission=None, input_root=None, tta: bool = True) -> dict:
    """Predict ``test_csv`` (the task's test file, CSV or parquet) with every fold in the artifacts dataset
    and write the task's submission.

    Folds are spread over the GPUs (two on Kaggle's T4 x2) in threads; on CPU they run in turn.
    """
    import numpy as np

    from ..data import load_test
    from ..ensemble import apply_temperature, combine, finalize_probs, write_submission
    from ..predict import FoldModel
    from ..task import get_task

    t0 = time.time()
    artifacts = Path(artifacts)
    manifest = json.loads((artifacts / MANIFEST).read_text())
    task = get_task(manifest.get("task", "lmsys"))  # kernels built before tasks existed are LMSYS's
    _compare_versions(manifest)
    test_df, _ = load_test(test_csv, task=task)
    jobs = []
    for r, entry in enumerate(manifest["runs"]):
        bb = entry.get("backbone", {})
        backbone = str(artifacts / bb["path"]) if "path" in bb else str(find_backbone(Path(input_root or artifacts.parent), bb["source"], bb.get("name")))
        for k in entry["folds"]:
            jobs.append((r, artifacts / entry["name"] / f"fold_{k}", backbone))
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except ImportError:
        n_gpu = 0
    devices = [f"cuda:{i}" for i in range(n_gpu)] or ["cpu"]
    if n_gpu:
        check_gpus_usable()
    timings = []
    token_cache: dict = {}  # folds that share a tokenizer tokenize the test set once

    def predict(job_index: int, device: str):
        r, path, backbone = jobs[job_index]
        t = time.time()
        fm = FoldModel(path, backbone, device=device)
        t_load = time.time() - t
        res = fm.predict(test_df, tta=tta, cache=token_cache)
        probs = res["probs"]
        timings.append({"fold": str(path.relative_to(artifacts)), "load_s": t_load, "predict_s": time.time() - t - t_load,
                        "fp32_rows": res.get("fp32_rows", 0),
                        "device": str(fm.device)})
        del fm
        return r, probs

    results = run_per_device(len(jobs), devices, predict)
    per_run = []
    for r in range(len(manifest["runs"])):
        fold_probs = [p for rr, p in results if rr == r]
        per_run.append(combine(fold_probs, method=manifest.get("method", "mean")))
    probs = apply_temperature(combine(per_run, manifest["weights"]), manifest["temperature"])
    final = finalize_probs(probs)
    if not np.isfinite(final).all():
        raise KKError("the ensemble produced NaN probabilities")
    path = write_submission(test_df["id"].to_numpy(), final, out, force=True, sample_submission=sample_submission,
                            ids_mismatch="warn", task=task)
    seconds = time.time() - t0
    passes = len(jobs) * (2 if tta else 1)
    # Per-row cost from prediction time alone (loading is a fixed cost per fold), per GPU in parallel.
    predict_s = sum(t["predict_s"] for t in timings) / len(devices)
    return {"submission": str(path), "task": task.name, "rows": len(test_df), "folds": len(jobs), "passes": passes, "devices": devices,
            "seconds": round(seconds, 2), "load_s": round(sum(t["load_s"] for t in timings) / len(devices), 2),
            "seconds_per_row_pass": predict_s / max(1, len(test_df) * passes), "timings": timings}


# --- the dry run --------------------------------------------------------------------------------------------------




def run_per_device(n_jobs: int, devices: list[str], fn) -> list:
    """``fn(job, device)`` for every job, in job order. Each device has its own queue (job i -> device
    i mod n) worked through by one thread, so two folds never share a GPU while another idles (a shared
    pool hands the next fold to whichever thread is free, whatever device that fold was meant for)."""
    queues = [list(range(d, n_jobs, len(devices))) for d in range(len(devices))]
    if len(devices) == 1:
        return [fn(i, devices[0]) for i in queues[0]]
    from concurrent.futures import ThreadPoolExecutor

    def work(d: int):
        return [(i, fn(i, devices[d])) for i in queues[d]]

    results: list = [None] * n_jobs
    with ThreadPoolExecutor(len(devices)) as pool:
        for done in pool.map(work, range(len(devices))):
            for i, r in done:
                results[i] = r
    return results


def check_gpus_usable() -> None:
    """One clear line, not a CUDA traceback, on a GPU the installed torch has no kernels for
    (a P100, sm_60, under Kaggle's CUDA 12.8 torch)."""
    import torch

    archs = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if not archs:
        return
    lowest = min(int(a[3:]) for a in archs)
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if major * 10 + minor < lowest:
            raise KKError(f"GPU {i} ({torch.cuda.get_device_name(i)}, sm_{major}{minor}) is not supported by this torch "
                          f"(built for {', '.join(archs)}): choose a T4 (machine_shape NvidiaTeslaT4) in the kernel's settings")


def _compare_versions(manifest: dict) -> None:
    """Print the versions each run was trained with beside this image's; warn on a major mismatch."""
    from ..ui import console, table, warn
    from ..versions import LIBRARIES, library_versions, major_mismatches

    here = library_versions()
    rows = [[name, *[e.get("versions", {}).get(name, "") for e in manifest["runs"]], here.get(name, "")]
            for name in ("python", *LIBRARIES)]
    console.print(table("library versions", ["library", *[f"trained: {e['name']}" for e in manifest["runs"]], "here"], rows))
    for e in manifest["runs"]:
        for m in major_mismatches(e.get("versions", {}), here):
            warn(f"run {e['name']}: {m}; pin the training versions with kk kernel --pin-deps")
