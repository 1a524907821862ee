"""Runs on the user's machine: executes the built notebook in a fake /kaggle tree with the network cut off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import KKError
from .common import HIDDEN_TEST_ROWS, KAGGLE_LIMIT_H, MANIFEST


def _offline_kernelspec(tmp: Path, env: dict, python: str | None = None) -> str:
    """A Jupyter kernel started inside a new network namespace (`unshare -n`) when the system allows it,
    under ``python`` (another interpreter, e.g. a venv with Kaggle's package versions) or this one."""
    argv = [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    isolated = False
    if shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            argv = ["unshare", "-n", *argv]
            isolated = True
    spec = tmp / "jupyter" / "kernels" / "kk-offline"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "kagglekit offline", "language": "python", "env": env}))
    return "isolated" if isolated else "proxies only"


def dry_run(kernel_dir, test_csv=None, timeout: int = 3600, gpu_factor: float = 1.0, keep: str | None = None,
            python: str | None = None) -> dict:
    """Run the kernel as Kaggle would, offline, in a fake /kaggle tree; check the submission it writes.

    ``python``: the interpreter the notebook runs under (default: this one); a venv holding Kaggle's
    image versions (transformers, peft, tokenizers...) tests the kernel against them. It needs ipykernel."""
    if python is not None:
        try:
            probe = subprocess.run([python, "-c", "import ipykernel"], capture_output=True, text=True)
        except OSError as e:
            raise KKError(f"--python {python}: not a Python with ipykernel installed ({e.strerror})") from None
        if probe.returncode != 0:
            raise KKError(f"--python {python}: not a Python with ipykernel installed "
                          f"({(probe.stderr.strip().splitlines() or ['cannot run it'])[-1]})")
    import tempfile

    import nbformat
    import pandas as pd
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from ..data import load_test, read_raw
    from ..ensemble import check_submission
    from ..io import write_table
    from ..synthetic import make_synthetic
    from ..ui import console, table

    kernel_dir = Path(kernel_dir)
    meta_path = kernel_dir / "kernel" / "kernel-metadata.json"
    if not meta_path.exists():
        raise KKError(f"{kernel_dir} is not a kernel built by kk kernel (no kernel/kernel-metadata.json)")
    meta = json.loads(meta_path.read_text())
    nb_path = kernel_dir / "kernel" / meta["code_file"]
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="kk-dry-run-"))
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
    for ds in sorted((kernel_dir / "datasets").iterdir()):
        owner, slug = json.loads((ds / "dataset-metadata.json").read_text())["id"].split("/")
        mount = root / "input" / "datasets" / owner / slug
        mount.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(ds.resolve(), mount)  # read-only in spirit: the notebook writes only to working/
    (root / "working").mkdir(exist_ok=True)

    env = {"KAGGLE_ROOT": str(root), "KK_SITE": str(tmp / "site"), "KK_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "PYTHONNOUSERSITE": "1"}
    network = _offline_kernelspec(tmp, env, python)
    old_path = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp / "jupyter") + (os.pathsep + old_path if old_path else "")
    nb = nbformat.read(str(nb_path), as_version=4)
    km = KernelManager(kernel_name="kk-offline", transport="ipc", ip=str(tmp / "zmq"))
    t0 = time.time()
    try:
        with console.status(f"running {nb_path.name} offline in {root} ..."):
            NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(root / "working")}}).execute()
    except CellExecutionError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise KKError(f"the kernel failed in the dry run: {lines[-1] if lines else e} (notebook run kept in {tmp})") from None
    finally:
        if old_path is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old_path
        nbformat.write(nb, str(tmp / "executed.ipynb"))
    wall = time.time() - t0
    sub_path = root / "working" / "submission.csv"
    if not sub_path.exists():
        raise KKError(f"the kernel ran but wrote no {sub_path}")
    sub = pd.read_csv(sub_path, dtype={"id": str})
    check_submission(sub, test_df["id"].to_numpy(), comp / "sample_submission.csv", task=task)

    report = _report_from_outputs(nb)
    model_estimate = flops_estimate(kernel_dir, test_df)
    per_row_pass = report.get("seconds_per_row_pass", wall / max(1, len(test_df)))
    passes = report.get("passes", 2)
    # Fixed costs (start-up, install, model loading) + per-row prediction cost scaled to the hidden test set.
    fixed_s = wall - per_row_pass * len(test_df) * passes
    estimate_h = (fixed_s + per_row_pass * HIDDEN_TEST_ROWS * passes / gpu_factor) / 3600
    result = {"submission": str(sub_path), "task": task.name, "rows": len(sub), "wall_s": round(wall, 1), "network": network,
              "inference_s": report.get("seconds"), "passes_per_row": passes, "estimate_hidden_h": estimate_h,
              "fits_9h": estimate_h < KAGGLE_LIMIT_H, "gpu_factor": gpu_factor, "work_dir": str(tmp),
              "model_estimate": model_estimate}
    console.print(table(
        f"dry run of {kernel_dir}",
        ["check", "value"],
        [["network", network], ["notebook wall time (s)", f"{wall:.1f}"], ["submission rows", len(sub)],
         ["prediction (s per row and pass)", f"{per_row_pass:.4f}"],
         ["format vs sample_submission", "ok"], ["fold x TTA passes per row", passes],
         [f"estimate for {HIDDEN_TEST_ROWS:,} rows from FLOPs (h)", _describe_model_estimate(model_estimate)],
         [f"measured here, scaled to {HIDDEN_TEST_ROWS:,} rows (h)", f"{estimate_h:.2f} (x1/{gpu_factor:g} GPU factor; limit {KAGGLE_LIMIT_H:g} h)"],
         ["fits Kaggle's limit", "yes" if result["fits_9h"] else "NO"]],
    ))
    return result


def kernel_task(kernel_dir: Path):
    """The task a built kernel is for (its manifest; kernels built before tasks existed are LMSYS's)."""
    from ..task import get_task

    art = next((d for d in (Path(kernel_dir) / "datasets").iterdir() if (d / MANIFEST).exists()), None)
    if art is None:
        raise KKError(f"{kernel_dir} has no artifacts dataset (no datasets/*/{MANIFEST}); rebuild it with kk kernel")
    return get_task(json.loads((art / MANIFEST).read_text()).get("task", "lmsys"))


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


# The assumption the FLOPs estimate rests on, stated once: a T4 does 65 dense fp16 TFLOP/s at peak;
# encoder inference with length-sorted batches reaches about a third of it; Kaggle gives two T4s,
# each predicting its own folds.
T4_PEAK_TFLOPS = 65.0
T4_UTILISATION = 0.35
KAGGLE_GPUS = 2


def flops_estimate(kernel_dir: Path, test_df) -> dict | None:
    """Hours for the hidden test from the models' size and the test's token count: 2 x (non-embedding
    parameters) FLOPs per token plus attention (4 x layers x length x hidden), times the rows' tokens
    under each fold's formatter, times folds and TTA passes, over the T4 throughput assumed above.
    None where a backbone is not in the artifacts (attached from Kaggle: its config is not here)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ..formatting import Formatter
    from ..predict import fold_config
    from ..task import get_task

    art = next((d for d in (kernel_dir / "datasets").iterdir() if (d / "kk_manifest.json").exists()), None)
    if art is None:
        return None
    manifest = json.loads((art / "kk_manifest.json").read_text())
    total_flops, runs = 0.0, []
    for entry in manifest["runs"]:
        if "path" not in entry.get("backbone", {}):
            return None
        fold = art / entry["name"] / f"fold_{entry['folds'][0]}"
        cfg = fold_config(fold)
        mconf = AutoConfig.from_pretrained(art / entry["backbone"]["path"])
        mconf.num_labels = get_task(cfg.task).n_classes
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(mconf)
        embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
        params = sum(p.numel() for p in model.parameters()) - embed
        fmt = Formatter.from_config(AutoTokenizer.from_pretrained(fold), cfg.model)
        seqs, _ = fmt.sequences(fmt.encode_rows(test_df))
        lengths = np.array([len(x) for x in seqs], dtype=np.float64)
        layers = getattr(mconf, "num_hidden_layers", 0)
        hidden = getattr(mconf, "hidden_size", 0)
        per_row = float(np.mean(2 * params * lengths + 4 * layers * hidden * lengths**2))
        passes = len(entry["folds"]) * (2 if cfg.predict.tta else 1)
        total_flops += per_row * HIDDEN_TEST_ROWS * passes
        runs.append({"run": entry["name"], "params": int(params), "mean_tokens": float(lengths.mean()),
                     "passes": passes})
    hours = total_flops / (T4_PEAK_TFLOPS * 1e12 * T4_UTILISATION * KAGGLE_GPUS) / 3600
    return {"hours": hours, "tflop": total_flops / 1e12, "runs": runs,
            "assumption": f"{KAGGLE_GPUS} x T4 at {T4_UTILISATION:.0%} of {T4_PEAK_TFLOPS:g} fp16 TFLOP/s"}


def _describe_model_estimate(est: dict | None) -> str:
    if est is None:
        return "unknown (a backbone attached from Kaggle: its size is not known here)"
    return f"{est['hours']:.2f} ({est['tflop']:,.0f} TFLOP; {est['assumption']}; model loading not included)"


# --- pushing ------------------------------------------------------------------------------------------------------


