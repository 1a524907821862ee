"""`kk kernel`: package inference as an offline Kaggle notebook, and dry-run it here.

Kaggle code competitions run the notebook with the internet off and score what it
writes to ``/kaggle/working/submission.csv``. ``build_kernel`` writes::

    kernels/<name>/
      kernel/<name>.ipynb, kernel-metadata.json    what `kaggle kernels push -p` takes
      datasets/<name>-artifacts/                   fold adapters, resolved configs, tokenizers,
                                                   local backbones, kk_manifest.json, dataset-metadata.json
      datasets/<name>-wheels/                      kagglekit's wheel (+ extra wheels), kk_wheels.json,
                                                   dataset-metadata.json

The notebook finds its inputs by sentinel files (whichever mount layout Kaggle
uses), installs kagglekit from the bundled wheels without the network, and calls
:func:`run_offline` here: the same fold models, swap TTA, length-sorted batches,
combination and submission checks as ``kk ensemble``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import KKError

COMPETITION = "llm-classification-finetuning"
MANIFEST = "kk_manifest.json"
WHEELS_SENTINEL = "kk_wheels.json"
HIDDEN_TEST_ROWS = 25_000
KAGGLE_LIMIT_H = 9.0
# Files of a fold that inference needs (checkpoints and logs stay home).
FOLD_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json", "config.yaml",
              "metrics.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spm.model",
              "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")


# --- who pushes ---------------------------------------------------------------------------------------------------


def kaggle_user(explicit: str | None = None) -> str:
    """--user, else KAGGLE_USERNAME, else the username in kaggle.json. Only the name is ever read out."""
    if explicit:
        return explicit
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    cfg_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    f = cfg_dir / "kaggle.json"
    if f.exists():
        try:
            name = json.loads(f.read_text()).get("username")
        except ValueError:
            raise KKError(f"{f} is not valid JSON") from None
        if name:
            return name
    raise KKError("no Kaggle user name: pass --user, set KAGGLE_USERNAME, or put kaggle.json in ~/.kaggle")


def slugify(name: str) -> str:
    import re

    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if len(slug) < 3:
        raise KKError(f"--name {name!r} must give a slug of at least 3 letters, digits or dashes")
    return slug[:50]


# --- building -----------------------------------------------------------------------------------------------------


def build_wheel(dest: Path) -> Path:
    """kagglekit's own wheel, built from the source tree this package was imported from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise KKError(f"cannot find kagglekit's source (no pyproject.toml beside {root}); install it with pip install -e .")
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(root)],
                          capture_output=True, text=True)
    wheels = sorted(dest.glob("kagglekit-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise KKError(f"building kagglekit's wheel failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return wheels[-1]


def _dataset_metadata(user: str, slug: str, title: str) -> dict:
    return {"title": title[:50], "id": f"{user}/{slug}", "licenses": [{"name": "CC0-1.0"}]}


def _copy_fold(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in FOLD_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def build_kernel(runs: list, name: str, out=None, user: str | None = None, backbone_source: str | None = None,
                 folds="all", extra_wheels: list | None = None, force: bool = False, fit: bool = True,
                 train_path=None) -> Path:
    """Write the notebook and its two datasets; returns ``kernels/<name>``."""
    import nbformat

    from .data import load_train
    from .ensemble import calibrate, common_oof, load_run_oof
    from .io import atomic_dir, write_json
    from .predict import fold_config, trained_folds
    from .ui import info

    if not runs:
        raise KKError("give at least one --run")
    slug = slugify(name)
    user = kaggle_user(user)
    out = Path(out) if out else Path("kernels") / slug
    if out.exists() and not force:
        raise KKError(f"{out} already exists; pass --force to rebuild it")
    runs = [Path(r) for r in runs]
    run_folds = [(r, trained_folds(r, folds)) for r in runs]

    # Weights and temperature are fitted on the runs' OOF now, so the kernel needs no labels.
    weights, temperature = [1.0] * len(runs), 1.0
    first_cfg = fold_config(run_folds[0][1][0][1])
    try:
        train_df, _ = load_train(train_path or first_cfg.data.train, first_cfg.data.bad_rows)
    except KKError as e:
        from .ui import warn

        warn(f"no OOF calibration in the kernel (equal weights, temperature 1): {e}")
        train_df = None
    if fit and train_df is not None:
        labels = dict(zip(train_df["id"], train_df["label"]))
        oofs, y = common_oof([load_run_oof(r, folds, labels) for r in runs], labels)
        if len(y):
            w, temperature, _ = calibrate(oofs, y)
            weights = w.tolist()

    with atomic_dir(out) as tmp:
        art = tmp / "datasets" / f"{slug}-artifacts"
        whl = tmp / "datasets" / f"{slug}-wheels"
        manifest = {"name": slug, "runs": [], "weights": weights, "temperature": temperature, "method": "mean",
                    "backbone_source": backbone_source, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        copied_backbones: dict[str, str] = {}
        used: set[str] = set()
        for r, fl in run_folds:
            rname = r.name if r.name not in used else f"{r.name}-{len(used)}"  # two runs named alike stay apart
            used.add(rname)
            entry = {"name": rname, "folds": []}
            for k, path in fl:
                cfg = fold_config(path)
                backbone = cfg.model.backbone
                if Path(backbone).expanduser().is_dir():
                    src = str(Path(backbone).expanduser().resolve())
                    if src not in copied_backbones:
                        rel = f"backbones/{len(copied_backbones)}-{Path(src).name}"
                        shutil.copytree(src, art / rel)
                        copied_backbones[src] = rel
                    entry["backbone"] = {"path": copied_backbones[src]}
                elif backbone_source:
                    entry["backbone"] = {"source": backbone_source, "name": backbone}
                else:
                    raise KKError(f"{path}: backbone {backbone!r} is not a local folder and Kaggle kernels run offline; "
                                  "pass --backbone-source <owner>/<slug> of a Kaggle dataset or model holding it")
                _copy_fold(path, art / rname / f"fold_{k}")
                entry["folds"].append(k)
            manifest["runs"].append(entry)
        write_json(art / MANIFEST, manifest)
        write_json(art / "dataset-metadata.json", _dataset_metadata(user, f"{slug}-artifacts", f"{slug} artifacts"))

        wheel = build_wheel(whl)
        for w in extra_wheels or []:
            if not Path(w).exists():
                raise KKError(f"--wheel {w} does not exist")
            shutil.copy2(w, whl / Path(w).name)
        write_json(whl / WHEELS_SENTINEL, {"kagglekit": wheel.name, "wheels": sorted(p.name for p in whl.glob("*.whl"))})
        write_json(whl / "dataset-metadata.json", _dataset_metadata(user, f"{slug}-wheels", f"{slug} wheels"))

        kdir = tmp / "kernel"
        kdir.mkdir(parents=True)
        nb = make_notebook(slug)
        nbformat.validate(nb)
        nbformat.write(nb, str(kdir / f"{slug}.ipynb"))
        meta = {
            "id": f"{user}/{slug}",
            "title": slug,
            "code_file": f"{slug}.ipynb",
            "language": "python",
            "kernel_type": "notebook",
            "is_private": True,
            "enable_gpu": True,
            "enable_internet": False,  # explicit: the kaggle CLI's own default is true
            "dataset_sources": [f"{user}/{slug}-artifacts", f"{user}/{slug}-wheels"],
            "competition_sources": [COMPETITION],
            "kernel_sources": [],
            "model_sources": [],
        }
        if backbone_source:
            key = "model_sources" if backbone_source.count("/") > 1 else "dataset_sources"
            meta[key].append(backbone_source)
        write_json(kdir / "kernel-metadata.json", meta)
    info(f"wrote {out}: {sum(len(e['folds']) for e in manifest['runs'])} fold(s), weights {weights}, temperature {temperature:.3f}")
    return out


NOTEBOOK_INTRO = """# {slug}: kagglekit offline inference

Built by `kk kernel` (kagglekit {version}). Runs with the internet off: installs kagglekit from the attached
wheels dataset, loads every fold's adapter from the artifacts dataset, predicts `test.csv` with A/B swap
test-time augmentation and length-sorted batches (fp16 on T4, both GPUs when there are two), and writes
`/kaggle/working/submission.csv`."""

CELL_FIND = '''import os, sys, json, time, subprocess
from pathlib import Path

ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # the dry run points this at a fake tree
INPUT, WORK = ROOT / "input", ROOT / "working"
T0 = time.time()

def find(name, must_have=None, max_depth=6):
    """First folder under /kaggle/input holding `name` (and `must_have`), whatever the mount layout."""
    for dirpath, dirnames, filenames in os.walk(INPUT, followlinks=True):
        if dirpath[len(str(INPUT)):].count(os.sep) >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        if name in filenames and (must_have is None or must_have in filenames):
            return Path(dirpath)
    raise FileNotFoundError(f"no {name} under {INPUT}: is the dataset attached?")

WHEELS = find("kk_wheels.json")
ARTIFACTS = find("kk_manifest.json")
COMPETITION = find("test.csv", must_have="sample_submission.csv")
print("wheels:", WHEELS, "\\nartifacts:", ARTIFACTS, "\\ncompetition:", COMPETITION)'''

CELL_INSTALL = '''# Offline install: no index, only the attached wheels. Kaggle's image already has torch, transformers, peft.
SITE = Path(os.environ.get("KK_SITE", "/tmp/kk_site"))
wheels = [str(WHEELS / w) for w in json.loads((WHEELS / "kk_wheels.json").read_text())["wheels"]]
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", str(SITE), *wheels], check=True)
sys.path.insert(0, str(SITE))
import kagglekit
print("kagglekit", kagglekit.__version__)'''

CELL_RUN = '''from kagglekit.kernel import run_offline

report = run_offline(ARTIFACTS, COMPETITION / "test.csv", WORK / "submission.csv",
                     sample_submission=COMPETITION / "sample_submission.csv", input_root=INPUT)
print(json.dumps({k: v for k, v in report.items() if k != "timings"}, indent=1))'''

CELL_DONE = '''import pandas as pd
sub = pd.read_csv(WORK / "submission.csv")
print(sub.shape, "in", round(time.time() - T0, 1), "s")
sub.head()'''


def make_notebook(slug: str):
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from . import __version__

    nb = new_notebook(
        cells=[new_markdown_cell(NOTEBOOK_INTRO.format(slug=slug, version=__version__)), new_code_cell(CELL_FIND),
               new_code_cell(CELL_INSTALL), new_code_cell(CELL_RUN), new_code_cell(CELL_DONE)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "language_info": {"name": "python"}},
    )
    nb.nbformat, nb.nbformat_minor = 4, 5  # v4.5: cells carry ids
    return nb


# --- what the notebook runs ---------------------------------------------------------------------------------------


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

    from .data import load_test
    from .ensemble import apply_temperature, combine, finalize_probs, write_submission
    from .predict import FoldModel

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


def _offline_kernelspec(tmp: Path, env: dict) -> str:
    """A Jupyter kernel started inside a new network namespace (`unshare -n`) when the system allows it."""
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
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


def dry_run(kernel_dir, test_csv=None, timeout: int = 3600, gpu_factor: float = 1.0, keep: str | None = None) -> dict:
    """Run the kernel as Kaggle would, offline, in a fake /kaggle tree; check the submission it writes."""
    import tempfile

    import nbformat
    import pandas as pd
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .data import load_test
    from .ensemble import check_submission
    from .synthetic import make_synthetic
    from .ui import console, table

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
    comp = root / "input" / "competitions" / COMPETITION
    comp.mkdir(parents=True, exist_ok=True)
    if test_csv is not None:
        test_df, _ = load_test(test_csv)  # the same checks as everywhere: a bad file is one clear line
        shutil.copy2(test_csv, comp / "test.csv")
    else:
        make_synthetic(50, seed=7, with_labels=False).to_csv(comp / "test.csv", index=False)
        test_df, _ = load_test(comp / "test.csv")
    sample = pd.DataFrame({"id": test_df["id"], "winner_model_a": 1 / 3, "winner_model_b": 1 / 3, "winner_tie": 1 / 3})
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
    network = _offline_kernelspec(tmp, env)
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
    check_submission(sub, test_df["id"].to_numpy(), comp / "sample_submission.csv")

    report = _report_from_outputs(nb)
    per_row_pass = report.get("seconds_per_row_pass", wall / max(1, len(test_df)))
    passes = report.get("passes", 2)
    # Fixed costs (start-up, install, model loading) + per-row prediction cost scaled to the hidden test set.
    fixed_s = wall - per_row_pass * len(test_df) * passes
    estimate_h = (fixed_s + per_row_pass * HIDDEN_TEST_ROWS * passes / gpu_factor) / 3600
    result = {"submission": str(sub_path), "rows": len(sub), "wall_s": round(wall, 1), "network": network,
              "inference_s": report.get("seconds"), "passes_per_row": passes, "estimate_hidden_h": estimate_h,
              "fits_9h": estimate_h < KAGGLE_LIMIT_H, "gpu_factor": gpu_factor, "work_dir": str(tmp)}
    console.print(table(
        f"dry run of {kernel_dir}",
        ["check", "value"],
        [["network", network], ["notebook wall time (s)", f"{wall:.1f}"], ["submission rows", len(sub)],
         ["prediction (s per row and pass)", f"{per_row_pass:.4f}"],
         ["format vs sample_submission", "ok"], ["fold x TTA passes per row", passes],
         [f"estimate for {HIDDEN_TEST_ROWS:,} rows (h)", f"{estimate_h:.2f} (x1/{gpu_factor:g} GPU factor; limit {KAGGLE_LIMIT_H:g} h)"],
         ["fits Kaggle's limit", "yes" if result["fits_9h"] else "NO"]],
    ))
    return result


def _report_from_outputs(nb) -> dict:
    """The JSON run_offline's cell printed, parsed back."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "run_offline" in cell.source:
            for o in cell.get("outputs", []):
                if o.get("output_type") == "stream" and o.get("name") == "stdout":
                    try:
                        return json.loads(o["text"])
                    except ValueError:
                        continue
    return {}


# --- pushing ------------------------------------------------------------------------------------------------------


def push(kernel_dir) -> None:
    """Create or version both datasets, then push the notebook, through the official kaggle CLI."""
    kernel_dir = Path(kernel_dir)
    if not (kernel_dir / "kernel" / "kernel-metadata.json").exists():
        raise KKError(f"{kernel_dir} is not a kernel built by kk kernel")
    exe = shutil.which("kaggle")
    if exe is None:
        raise KKError("the kaggle CLI is not installed (pip install kaggle) and configured (~/.kaggle/kaggle.json)")
    from .ui import info

    def run(args):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        return proc.returncode, (proc.stdout + proc.stderr).strip()

    for ds in sorted((kernel_dir / "datasets").iterdir()):
        # --dir-mode zip: without it `kaggle datasets create` silently skips sub-folders (the fold folders).
        rc, text = run(["datasets", "create", "-p", str(ds), "--dir-mode", "zip"])
        if rc != 0 or "already exists" in text.lower():
            rc, text = run(["datasets", "version", "-p", str(ds), "-m", "kagglekit update", "--dir-mode", "zip"])
        if rc != 0:
            raise KKError(f"kaggle datasets failed for {ds.name}: {text.splitlines()[-1] if text else rc}")
        info(f"dataset {ds.name}: {text.splitlines()[-1] if text else 'ok'}")
    rc, text = run(["kernels", "push", "-p", str(kernel_dir / "kernel")])
    if rc != 0:
        raise KKError(f"kaggle kernels push failed: {text.splitlines()[-1] if text else rc}")
    info(text)
