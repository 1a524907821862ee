"""Runs on the user's machine: executes the built notebook in a fake /kaggle tree with the network cut off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from ..errors import KKError
from .common import HIDDEN_TEST_ROWS, KAGGLE_LIMIT_H, MANIFEST, check_budget_h


def _offline_kernelspec(tmp: Path, env: dict, python: str | None = None) -> str:
    """A Jupyter kernel started inside a new network namespace (`unshare -n`) when the system allows it,
    under ``python`` (another interpreter, e.g. a venv with Kaggle's package versions) or this one."""
    argv = [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    isolated = bool(shutil.which("unshare")) and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    spec = tmp / "jupyter" / "kernels" / "kk-offline"
    spec.mkdir(parents=True)
    argv = ["unshare", "-n", *argv] if isolated else argv
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "kagglekit offline", "language": "python", "env": env}))
    return "isolated" if isolated else "proxies only"


# What the notebook needs from the interpreter it runs under: a Jupyter kernel (ipykernel), pip (the
# offline install of the wheels) and the libraries Kaggle's image provides and kagglekit imports.
PROBE = """
import importlib, sys
missing = []
for name in ("ipykernel", "pip", "torch", "transformers", "peft", "tokenizers", "accelerate", "safetensors", "pandas",
             "numpy", "yaml", "pydantic", "rich"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__})")
print("kk-probe", sys.version.split()[0], ";".join(missing))
"""


def check_python(python: str) -> str:
    """``--python`` must be a Python that can run the notebook: it answers the probe with its version and
    imports what the notebook needs. One line naming what is missing otherwise; returns the version."""
    try:
        probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KKError(f"--python {python}: not a Python that can run the notebook "
                      f"({getattr(e, 'strerror', None) or type(e).__name__})") from None
    lines = [ln for ln in probe.stdout.splitlines() if ln.startswith("kk-probe ")]
    if probe.returncode != 0 or not lines:
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}, no answer to the probe"])[-1]
        raise KKError(f"--python {python}: not a Python that can run the notebook ({why})")
    version, _, missing = lines[-1][len("kk-probe "):].partition(" ")
    if missing.strip():
        raise KKError(f"--python {python} (Python {version}) cannot run the notebook: missing {missing.strip().replace(';', ', ')}")
    return version


def _read_json(path: Path, what: str, keys: tuple = ()) -> dict:
    """A metadata file the dry run reads, checked: one line naming it when missing, damaged or incomplete."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KKError(f"{path} is missing: not a kernel built by kk kernel ({what})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise KKError(f"{path} is damaged ({e}); rebuild the kernel with kk kernel --force") from None
    if not isinstance(data, dict):
        raise KKError(f"{path} is damaged (not a JSON object); rebuild the kernel with kk kernel --force")
    for key in keys:
        if not isinstance(data.get(key), str) or not data[key]:
            raise KKError(f"{path} is damaged (no {key!r}); rebuild the kernel with kk kernel --force")
    return data


def dry_run(kernel_dir, test_csv=None, timeout: int = 3600, gpu_factor: float = 1.0, keep: str | None = None,
            python: str | None = None, time_budget_h: float | None = None) -> dict:
    """Run the kernel as Kaggle would, offline, in a fake /kaggle tree; check the submission it writes.

    ``python``: the interpreter the notebook runs under (default: this one); a venv holding Kaggle's
    image versions (transformers, peft, tokenizers...) tests the kernel against them. It needs ipykernel.
    ``time_budget_h``: the notebook's budget for this run (try the budget logic: a small one leaves the
    one-order submission). The fake /kaggle tree is a temporary folder, removed at the end (kept in
    ``keep`` when given); the executed notebook, the submission and kk_passes.json are copied to
    ``<kernel_dir>/dry-run/`` (not part of what kk kernel --push uploads)."""
    if time_budget_h is not None:
        check_budget_h(time_budget_h)
    kernel_dir = Path(kernel_dir)
    meta_path = kernel_dir / "kernel" / "kernel-metadata.json"
    if not meta_path.exists():
        raise KKError(f"{kernel_dir} is not a kernel built by kk kernel (no kernel/kernel-metadata.json)")
    meta = _read_json(meta_path, "kernel metadata", ("code_file",))
    nb_path = kernel_dir / "kernel" / meta["code_file"]
    if Path(meta["code_file"]).name != meta["code_file"] or not nb_path.is_file():
        raise KKError(f"{meta_path}: code_file {meta['code_file']!r} is not a notebook in {nb_path.parent}")
    datasets = []
    for ds in sorted(p for p in (kernel_dir / "datasets").iterdir() if p.is_dir()) if (kernel_dir / "datasets").is_dir() else []:
        ds_meta = ds / "dataset-metadata.json"
        dataset_id = _read_json(ds_meta, "dataset metadata", ("id",))["id"]
        parts = dataset_id.split("/")
        if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise KKError(f"{ds_meta}: id {dataset_id!r} is not owner/slug")
        datasets.append((ds, parts))
    if python is not None:
        check_python(python)
    from ..io import check_writable

    check_writable(kernel_dir, f"kernel folder {kernel_dir}")
    import tempfile

    if keep:
        shutil.rmtree(keep, ignore_errors=True)
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="kk-dry-run-"))
    try:
        return _dry_run_in(tmp, kernel_dir, meta, nb_path, datasets, test_csv, timeout, gpu_factor, python, time_budget_h)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _dry_run_in(tmp: Path, kernel_dir: Path, meta: dict, nb_path: Path, datasets: list, test_csv, timeout: int,
                gpu_factor: float, python: str | None, time_budget_h: float | None) -> dict:
    import nbformat
    import pandas as pd
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from ..data import load_test, read_raw
    from ..ensemble import check_submission
    from ..io import atomic_dir, write_table
    from ..synthetic import make_synthetic
    from ..ui import console, table

    root = tmp / "kaggle"
    task = kernel_task(kernel_dir)
    comp = root / "input" / "competitions" / task.competition
    comp.mkdir(parents=True, exist_ok=True)
    test_file = comp / task.test_file  # where Kaggle puts it: test.csv (LMSYS), test.parquet (WSDM)
    if test_csv is not None:
        test_df, _ = load_test(test_csv, task=task)  # the same checks as everywhere: a bad file is one clear line
        if Path(test_csv).suffix.lower() == test_file.suffix:
            shutil.copy2(test_csv, test_file)
        else:  # a CSV for a parquet competition (or the reverse): the kernel finds the file Kaggle would give it
            write_table(test_file, read_raw(test_csv, "test"))
    else:
        write_table(test_file, make_synthetic(50, seed=7, with_labels=False, task=task))
        test_df, _ = load_test(test_file, task=task)
    sample = task.sample_submission(test_df["id"])
    sample.to_csv(comp / "sample_submission.csv", index=False)
    for ds, (owner, slug) in datasets:
        mount = root / "input" / "datasets" / owner / slug
        mount.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(ds.resolve(), mount)  # read-only in spirit: the notebook writes only to working/
    (root / "working").mkdir(exist_ok=True)

    env = {"KAGGLE_ROOT": str(root), "KK_SITE": str(tmp / "site"), "KK_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "PYTHONNOUSERSITE": "1"}
    if time_budget_h is not None:
        env["KK_TIME_BUDGET_H"] = repr(float(time_budget_h))
    network = _offline_kernelspec(tmp, env, python)
    jupyter_path = os.pathsep.join(filter(None, [str(tmp / "jupyter"), os.environ.get("JUPYTER_PATH")]))
    nb = nbformat.read(str(nb_path), as_version=4)
    out_dir = kernel_dir / "dry-run"
    t0 = time.time()
    failed = None
    try:  # JUPYTER_PATH finds the kernelspec while the notebook runs, and is restored after
        with mock.patch.dict(os.environ, {"JUPYTER_PATH": jupyter_path}), console.status(f"running {nb_path.name} offline in {root} ..."):
            km = KernelManager(kernel_name="kk-offline", transport="ipc", ip=str(tmp / "zmq"))
            NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(root / "working")}}).execute()
    except CellExecutionError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        failed = lines[-1] if lines else str(e)
    finally:
        # What the run left, kept beside the kernel (the temporary tree goes): the executed notebook, and
        # the submission and kk_passes.json when it wrote them.
        with atomic_dir(out_dir) as keep_dir:
            nbformat.write(nb, str(keep_dir / "executed.ipynb"))
            for f in ("submission.csv", "kk_passes.json"):
                if (root / "working" / f).exists():
                    shutil.copy2(root / "working" / f, keep_dir / f)
    if failed is not None:
        raise KKError(f"the kernel failed in the dry run: {failed} (executed notebook: {out_dir / 'executed.ipynb'})")
    wall = time.time() - t0
    sub_path = out_dir / "submission.csv"
    if not sub_path.exists():
        raise KKError(f"the kernel ran but wrote no {root / 'working' / 'submission.csv'}")
    sub = pd.read_csv(sub_path, dtype={"id": str})
    check_submission(sub, test_df["id"].to_numpy(), comp / "sample_submission.csv", task=task)

    report = _report_from_outputs(nb)
    try:  # written by the notebook as its passes ran; none when it stopped before
        passes_log = json.loads((out_dir / "kk_passes.json").read_text())
    except (OSError, ValueError):
        passes_log = {}
    est = flops_estimate(kernel_dir, test_df, meta.get("machine_shape", "NvidiaTeslaT4"))
    passes_run = report.get("passes_run", report.get("passes", 2))
    per_row_pass = report.get("seconds_per_row_pass", wall / max(1, len(test_df)))
    passes = report.get("passes", 2)
    # Fixed costs (start-up, install, model loading) + per-row prediction cost scaled to the hidden test set,
    # for the passes the kernel plans (its budget decides on Kaggle how many of them run).
    fixed_s = max(0.0, wall - per_row_pass * len(test_df) * passes_run)
    estimate_h = (fixed_s + per_row_pass * HIDDEN_TEST_ROWS * passes / gpu_factor) / 3600
    result = {"submission": str(sub_path), "task": task.name, "rows": len(sub), "wall_s": round(wall, 1), "network": network,
              "inference_s": report.get("seconds"), "passes_per_row": passes, "passes_run": passes_run,
              "submission_from": report.get("submission_from"), "passes_log": passes_log,
              "estimate_hidden_h": estimate_h, "fits_9h": estimate_h < KAGGLE_LIMIT_H, "gpu_factor": gpu_factor,
              "work_dir": str(out_dir), "model_estimate": est}
    ran = "; ".join(f"pass {p['pass']} ({p['order']}): " + (p["decision"] if p.get("decision") and p.get("status") != "done"
                                                             else p.get("status", "?"))
                    for p in passes_log.get("passes", [])) or "?"
    flops_h = ("unknown (a backbone attached from Kaggle: its size is not known here)" if est is None else
               f"{est['hours']:.2f} ({est['tflop']:,.0f} TFLOP; {est['assumption']}; model loading not included)")
    console.print(table(
        f"dry run of {kernel_dir}",
        ["check", "value"],
        [["network", network], ["notebook wall time (s)", f"{wall:.1f}"], ["submission rows", len(sub)],
         ["prediction (s per row and pass)", f"{per_row_pass:.4f}"],
         ["format vs sample_submission", "ok"], ["fold x order passes per row (planned / run)", f"{passes:g} / {passes_run:g}"],
         [f"passes run (budget {passes_log.get('budget_h', '?')} h)", ran],
         ["submission from", report.get("submission_from") or "?"],
         [f"estimate for {HIDDEN_TEST_ROWS:,} rows from FLOPs (h)", flops_h],
         [f"measured here, scaled to {HIDDEN_TEST_ROWS:,} rows (h)", f"{estimate_h:.2f} (x1/{gpu_factor:g} GPU factor; limit {KAGGLE_LIMIT_H:g} h)"],
         ["fits Kaggle's limit", "yes" if result["fits_9h"] else "NO"],
         ["kept", str(out_dir)]],
    ))
    return result


def kernel_task(kernel_dir: Path):
    """The task a built kernel is for (its manifest). A kernel built before tasks existed is LMSYS's; one
    without a readable manifest too (the notebook then stops on it with its own message)."""
    from ..task import get_task

    art = _artifacts(kernel_dir)
    try:
        manifest = json.loads((art / MANIFEST).read_text()) if art is not None else {}
    except (OSError, ValueError):
        manifest = {}
    return get_task(manifest.get("task", "lmsys") if isinstance(manifest, dict) else "lmsys")


def _artifacts(kernel_dir: Path) -> Path | None:
    """The kernel's artifacts dataset: the one holding the manifest."""
    datasets = Path(kernel_dir) / "datasets"
    return next((d for d in datasets.iterdir() if (d / MANIFEST).exists()), None) if datasets.is_dir() else None


def _report_from_outputs(nb) -> dict:
    """The JSON run_offline's cell printed (its last stdout object), parsed back."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "run_offline" in cell.source:
            text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                           if o.get("output_type") == "stream" and o.get("name") == "stdout")
            start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.find("{")
            if start >= 0:
                try:
                    return json.loads(text[start:])
                except ValueError:
                    pass
    return {}


def flops_estimate(kernel_dir: Path, test_df, machine_shape: str = "NvidiaTeslaT4") -> dict | None:
    """Hours for the hidden test from the models' size and the test's token counts under each fold's formatter:
    the kernel plan's estimate (kagglekit.kernel.plan.estimate_run). None where a backbone is not in the artifacts
    (attached from Kaggle: its config is not here)."""
    from ..runs import open_run
    from .plan import MACHINES, T4_FP16_UTILISATION, T4_PEAK_TFLOPS, THROUGHPUT, estimate_run

    art = _artifacts(kernel_dir)
    if art is None:
        return None
    manifest = json.loads((art / MANIFEST).read_text())
    tflop, hours, runs = 0.0, 0.0, []
    for entry in manifest["runs"]:
        if "path" not in entry.get("backbone", {}):
            return None
        run = open_run(art / entry["name"], entry["folds"])
        est = estimate_run(run.folds, art / entry["backbone"]["path"], machine_shape, test_df, tta=entry.get("tta"),
                           tta_share=entry.get("tta_share"))
        pl = est["placement"]
        if est["hours"] is None:
            return None
        tflop, hours = tflop + est["tflop"], hours + est["hours"]["total_h"]
        runs.append({"run": entry["name"], "params": int(pl.params - pl.embed_params), "mean_tokens": est["tokens"],
                     "passes": est["passes"], "placement": pl.describe(), "weights": pl.weights})
    gpus = MACHINES.get(machine_shape, MACHINES["NvidiaTeslaT4"])[0]
    factors = ", ".join(f"{k} x{v:g}" for k, v in THROUGHPUT.items() if k != "fp32")
    return {"hours": hours, "tflop": tflop, "runs": runs,
            "assumption": f"{gpus} x T4 at {T4_FP16_UTILISATION:.0%} of {T4_PEAK_TFLOPS:g} fp16 TFLOP/s ({factors})"}


