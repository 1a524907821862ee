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


def read_manifest(artifacts: Path) -> dict:
    """The artifacts dataset's kk_manifest.json, checked: one line naming the file when it is damaged."""
    path = Path(artifacts) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list) or not manifest["runs"]:
            raise ValueError("no runs")
        for e in manifest["runs"]:
            if not isinstance(e, dict) or not e.get("name") or not e.get("folds") or not isinstance(e.get("backbone"), dict):
                raise ValueError("a run without name, folds or backbone")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise KKError(f"{path} is damaged ({e}): rebuild the kernel with kk kernel --force") from None
    return manifest


def detect_devices(devices=None) -> tuple[list[str], int]:
    """(one worker device per GPU, or ["cpu"]; the free bytes of the smallest GPU). ``devices``: given
    explicitly (tests, a CPU dry run)."""
    if devices is not None:
        from .plan import T4_BYTES

        return list(devices), T4_BYTES if any(str(d).startswith("cuda") for d in devices) else 0
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        n = 0
    if not n:
        return ["cpu"], 0
    check_gpus_usable()
    free = min(int(torch.cuda.mem_get_info(i)[0]) for i in range(n))
    return [f"cuda:{i}" for i in range(n)], free


def run_offline(artifacts, test_csv, out, sample_submission=None, input_root=None, tta=None, started: float | None = None,
                budget_h: float | None = None, devices=None, clock=time.time, group_factory=None) -> dict:
    """Predict ``test_csv`` (the task's test file, CSV or parquet) with every fold in the artifacts dataset and
    write the task's submission (the manifest's task: probabilities, or id,winner labels), in budgeted
    passes (kagglekit.passes): the (A,B) pass of every fold first and a complete submission at its
    end, then the (B,A) pass as far as ``budget_h`` (default: the kernel's predict.time_budget_h) allows.

    Before anything loads, each run's model is placed on the GPUs this notebook really has, from its
    backbone's config (bundled or attached): one fold per GPU, one model split over both, or one line
    naming the fix. ``tta``: overrides each run's predict.tta; ``started``: when the notebook started
    (its budget counts from there); ``devices``: worker devices instead of the detected GPUs; ``clock`` and
    ``group_factory`` (unit -> loaded model): replaced by tests.
    """
    from ..data import load_test
    from ..io import write_json
    from ..passes import PASSES_JSON, Budget, Job, Passes, RunPlan, make_units, plan_second_pass
    from ..runs import open_run
    from ..task import get_task
    from ..tta import tta_mode
    from ..ui import duration, info
    from .plan import adapter_bytes, inference_format, place

    t0 = clock()
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    task = get_task(manifest.get("task", "lmsys"))  # kernels built before tasks existed are LMSYS's
    _compare_versions(manifest)
    test_df, _ = load_test(test_csv, task=task)
    n = len(test_df)
    workers, gpu_bytes = detect_devices(devices)
    n_gpu = sum(str(w).startswith("cuda") for w in workers)
    # KK_TIME_BUDGET_H: set by kk kernel --dry-run --time-budget-h, to try the budget logic here.
    budget_h = budget_h or os.environ.get("KK_TIME_BUDGET_H") or manifest.get("time_budget_h") or 8.0
    budget = Budget(float(budget_h), t0 if started is None else started, clock)

    plans = []
    for r, entry in enumerate(manifest["runs"]):
        bb = entry["backbone"]
        backbone = str(artifacts / bb["path"]) if "path" in bb else str(find_backbone(Path(input_root or artifacts.parent), bb["source"], bb.get("name")))
        run = open_run(artifacts / entry["name"], entry["folds"])
        cfg = run.folds[0].cfg
        placement = None
        if n_gpu:
            # The attached backbone is checked here too: kk kernel could not see its size.
            placement = place(backbone, inference_format(run.folds[0]), n_gpu, gpu_bytes, task.n_classes, adapter_bytes(f.path for f in run.folds))
            if placement.kind == "refused":
                raise KKError(f"run {entry['name']} does not fit this machine's GPUs: {placement.reason}")
        plans.append(RunPlan(entry["name"], [Job(r, f, f.name) for f in run.folds], backbone,
                             tta_mode(entry.get("tta", cfg.predict.tta) if tta is None else tta),
                             float(entry.get("tta_share", cfg.predict.tta_share)), placement))
    units = make_units(plans, workers, n)
    plan_lines = [{"run": x.name, "folds": len(x.jobs), "tta": x.mode, "tta_share": x.share,
                   "placement": x.placement.describe() if x.placement else f"{workers[0]}"} for x in plans]
    for line in plan_lines:
        info(f"plan: {line['run']}: {line['folds']} fold(s), TTA {line['tta']}, {line['placement']}")
    state: dict = {"budget_h": budget.hours, "workers": workers, "runs": plan_lines, "passes": [], "submission_from": None}
    passes_path = Path(out).parent / PASSES_JSON

    def record():
        state["elapsed_h"] = round(budget.elapsed() / 3600, 4)
        state["events"] = list(passes.events)
        write_json(passes_path, state)

    def submit(second: bool) -> Path:
        from ..ensemble import blend, write_submission

        final = blend(passes.fold_probs(plans, second), manifest["weights"], manifest["temperature"], manifest.get("method", "mean"))
        return write_submission(test_df["id"].to_numpy(), final, out, force=True, sample_submission=sample_submission,
                                ids_mismatch="warn", task=task)

    passes = Passes(units, workers, test_df, budget, log=info, record=record, group_factory=group_factory)
    try:
        passes.run_pass(1)
        done = [j for j in passes.jobs() if j in passes.first_pass()]
        path = submit(False)
        state["passes"].append({"pass": 1, "order": "A,B", "status": "done", "rows": n, "folds": len(done),
                                "skipped_folds": [j.name for j in passes.skipped], "at_h": round(budget.elapsed() / 3600, 4)})
        state["submission_from"] = "pass 1"
        info(f"pass 1 done: {path} written from {len(done)} fold(s), one order (A,B), at {duration(budget.elapsed())}")
        record()

        wanted = passes.wanted(plans)
        rows2, decision = plan_second_pass(passes, wanted, plans)
        info(f"pass 2 (B,A): {decision}")
        entry2 = {"pass": 2, "order": "B,A", "decision": decision, "rows": {plans[r].name: int(len(v)) for r, v in rows2.items()}}
        if rows2:
            complete = passes.run_pass(2, rows2)
            entry2["status"] = "done" if complete else "stopped"
            if complete:
                path = submit(True)
                state["submission_from"] = "pass 2"
                info(f"pass 2 done: {path} replaced by the TTA ensemble at {duration(budget.elapsed())}")
        else:
            entry2["status"] = "skipped" if any(len(v) for v in wanted.values()) else "not asked"
        entry2["at_h"] = round(budget.elapsed() / 3600, 4)
        state["passes"].append(entry2)
        record()
    finally:
        passes.free_all()

    jobs_done = [j for j in passes.jobs() if j in passes.first_pass()]
    predict_s = sum(t.get("pass1_s", 0) + t.get("pass2_s", 0) for t in passes.timing.values()) / len(workers)
    rows_run = n * len(jobs_done) + (sum(len(v[0]) for v in passes.second_pass().values())
                                     if state["submission_from"] == "pass 2" else 0)
    planned = sum(len(x.jobs) * (1 + {"full": 1.0, "none": 0.0}.get(x.mode, x.share)) for x in plans)
    return {"submission": str(Path(out)), "task": task.name, "rows": n, "folds": len(jobs_done), "passes": round(planned, 4),
            "passes_run": round(rows_run / max(n, 1), 4), "submission_from": state["submission_from"],
            "devices": workers, "seconds": round(clock() - t0, 2),
            "load_s": round(sum(u.load_s or 0 for u in units) / len(workers), 2),
            "seconds_per_row_pass": predict_s / max(1, rows_run), "passes_json": str(passes_path),
            "timings": [{"fold": j.name, **t} for (j, _), t in passes.timing.items()]}


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
