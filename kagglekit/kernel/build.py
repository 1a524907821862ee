"""Runs on the user's machine: builds the notebook folder and the artifact and wheel datasets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import KKError
from ..task import LMSYS
from .common import FOLD_FILES, MACHINE_SHAPES, MANIFEST, WHEELS_SENTINEL
from .notebook import make_notebook

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
    root = Path(__file__).resolve().parents[2]
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
            shutil.copyfile(src / f, dst / f)  # the umask's normal mode, not the source's (safetensors writes 0600)


def build_kernel(runs: list, name: str, out=None, user: str | None = None, backbone_source: str | None = None,
                 folds="all", extra_wheels: list | None = None, force: bool = False, fit: bool = True,
                 train_path=None, machine_shape: str = "NvidiaTeslaT4", pin_deps: bool = False) -> Path:
    """Write the notebook and its two datasets; returns ``kernels/<name>``.

    ``machine_shape`` is written explicitly: a GPU kernel pushed without it may get a P100, on which
    Kaggle's current torch (CUDA 12.8 builds, no sm_60 kernels) fails at the first CUDA call."""
    import nbformat

    if backbone_source:
        from .offline import check_source_handle

        check_source_handle(backbone_source)
    if machine_shape not in MACHINE_SHAPES:
        raise KKError(f"--machine-shape must be one of {', '.join(MACHINE_SHAPES)} (got {machine_shape!r})")

    from ..data import load_train
    from ..ensemble import calibrate, common_oof, load_run_oof, run_task
    from ..io import atomic_dir, write_json
    from ..predict import fold_config, trained_folds, warn_missing_folds
    from ..ui import info

    if not runs:
        raise KKError("give at least one --run")
    slug = slugify(name)
    user = kaggle_user(user)
    out = Path(out) if out else Path("kernels") / slug
    if out.exists() and not force:
        raise KKError(f"{out} already exists; pass --force to rebuild it")
    runs = [Path(r) for r in runs]
    run_folds = [(r, trained_folds(r, folds)) for r in runs]
    task = run_task(runs, folds)  # the competition the kernel enters: its test file, input folder, submission
    if folds in (None, "all"):
        for r, found in run_folds:
            warn_missing_folds(r, [k for k, _ in found])

    # Weights and temperature are fitted on the runs' OOF now, so the kernel needs no labels.
    weights, temperature = [1.0] * len(runs), 1.0
    first_cfg = fold_config(run_folds[0][1][0][1])
    try:
        train_df, _ = load_train(train_path or first_cfg.data.train, first_cfg.data.bad_rows, task)
    except KKError as e:
        from ..ui import warn

        warn(f"no OOF calibration in the kernel (equal weights, temperature 1): {e}")
        train_df = None
    if fit and train_df is not None:
        labels = dict(zip(train_df["id"], train_df["label"]))
        oofs, y, oof_folds = common_oof([load_run_oof(r, folds, labels, task=task) for r in runs], labels, with_folds=True)
        if len(y):
            w, temperature, _, _ = calibrate(oofs, y, folds=oof_folds)
            weights = w.tolist()

    check_fits_t4(run_folds, task.n_classes)

    with atomic_dir(out) as tmp:
        art = tmp / "datasets" / f"{slug}-artifacts"
        whl = tmp / "datasets" / f"{slug}-wheels"
        manifest = {"name": slug, "task": task.name, "runs": [], "weights": weights, "temperature": temperature, "method": "mean",
                    "backbone_source": backbone_source, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        copied_backbones: dict[str, str] = {}
        used: set[str] = set()
        for r, fl in run_folds:
            rname = r.name if r.name not in used else f"{r.name}-{len(used)}"  # two runs named alike stay apart
            used.add(rname)
            entry = {"name": rname, "folds": [], "versions": trained_versions(fl[0][1]),
                     "quantization": fold_config(fl[0][1]).model.quantization}
            for k, path in fl:
                cfg = fold_config(path)
                backbone = cfg.model.backbone
                if Path(backbone).expanduser().is_dir():
                    src = str(Path(backbone).expanduser().resolve())
                    if src not in copied_backbones:
                        rel = f"backbones/{len(copied_backbones)}-{Path(src).name}"
                        shutil.copytree(src, art / rel, copy_function=shutil.copyfile)
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
        bundle_dependencies(manifest, whl, pin_deps)
        write_json(whl / WHEELS_SENTINEL, {"kagglekit": wheel.name, "wheels": sorted(p.name for p in whl.glob("*.whl"))})
        write_json(whl / "dataset-metadata.json", _dataset_metadata(user, f"{slug}-wheels", f"{slug} wheels"))

        kdir = tmp / "kernel"
        kdir.mkdir(parents=True)
        nb = make_notebook(slug, task)
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
            "machine_shape": machine_shape,
            "enable_internet": False,  # explicit: the kaggle CLI's own default is true
            "dataset_sources": [f"{user}/{slug}-artifacts", f"{user}/{slug}-wheels"],
            "competition_sources": [task.competition],
            "kernel_sources": [],
            "model_sources": [],
        }
        if backbone_source:
            key = "model_sources" if backbone_source.count("/") > 1 else "dataset_sources"
            meta[key].append(backbone_source)
        write_json(kdir / "kernel-metadata.json", meta)
    info(f"wrote {out}: {task.name}, {sum(len(e['folds']) for e in manifest['runs'])} fold(s), weights {weights}, "
         f"temperature {temperature:.3f}")
    return out




# --- what Kaggle's image lacks travels with the kernel --------------------------------------------------------------

# Kaggle's image (docker-python, 2026-08): Python 3.12, x86-64 manylinux; no bitsandbytes.
KAGGLE_PYTHON = "3.12"
KAGGLE_PLATFORMS = ("manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PINNABLE = ("transformers", "peft", "tokenizers", "accelerate")


def trained_versions(fold_path: Path) -> dict:
    """The library versions a fold was trained with (metrics.json), else this environment's."""
    from ..versions import library_versions

    try:
        recorded = json.loads((Path(fold_path) / "metrics.json").read_text()).get("versions")
    except (OSError, ValueError):
        recorded = None
    return recorded or library_versions()


def download_wheels(specs: list[str], dest: Path) -> None:
    """Wheels for Kaggle's Python and platform (not this machine's), without their dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           KAGGLE_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for p in KAGGLE_PLATFORMS:
        cmd += ["--platform", p]
    proc = subprocess.run(cmd + specs, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["pip download failed"]
        raise OSError(last[0])


def bundle_dependencies(manifest: dict, whl: Path, pin_deps: bool) -> None:
    """bitsandbytes for quantized runs (Kaggle's image has none), and with ``pin_deps`` the exact
    transformers/peft/tokenizers/accelerate the runs were trained with: the notebook installs them
    ahead of the image's own before anything imports them."""
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in whl.glob("*.whl")}
    quantized = [e["name"] for e in manifest["runs"] if e.get("quantization", "none") != "none"]
    if quantized and "bitsandbytes" not in have:
        version = next((e["versions"].get("bitsandbytes") for e in manifest["runs"] if e["versions"].get("bitsandbytes")), None)
        spec = f"bitsandbytes=={version}" if version else "bitsandbytes"
        try:
            download_wheels([spec], whl)
        except OSError as e:
            raise KKError(f"run {quantized[0]} is quantized and Kaggle's image has no bitsandbytes; downloading a wheel for "
                          f"Python {KAGGLE_PYTHON} failed ({e}): attach one with --wheel bitsandbytes-<version>-py3-none-"
                          f"manylinux_2_24_x86_64.whl (pip download --no-deps --only-binary=:all: --python-version "
                          f"{KAGGLE_PYTHON} --platform manylinux_2_24_x86_64 {spec})") from None
    if pin_deps:
        versions = manifest["runs"][0]["versions"]
        specs = [f"{name}=={versions[name]}" for name in PINNABLE if versions.get(name) and name not in have]
        try:
            download_wheels(specs, whl)
        except OSError as e:
            raise KKError(f"--pin-deps: downloading {' '.join(specs)} for Python {KAGGLE_PYTHON} failed ({e})") from None


T4_BYTES = int(14.5 * 1024**3)  # a T4's 15 GB less what the CUDA context keeps


def check_fits_t4(run_folds, num_labels: int = LMSYS.n_classes) -> None:
    """Refuse, in one line with the fix, a kernel whose largest fold model cannot fit one T4."""
    from ..modeling import FP32_INFERENCE_MAX_BYTES, count_parameters, estimate_inference_bytes
    from ..predict import fold_config

    for r, fl in run_folds:
        cfg = fold_config(fl[0][1])
        if not Path(cfg.model.backbone).expanduser().is_dir():
            continue  # attached from Kaggle: its size is not known here
        params = count_parameters(cfg.model.backbone, num_labels)
        if params is None:
            continue
        precision = 4 if 4 * params <= FP32_INFERENCE_MAX_BYTES else 2
        need = estimate_inference_bytes(params, cfg.model.quantization, precision)
        if need > T4_BYTES:
            raise KKError(f"run {r}: its backbone ({params / 1e9:.1f}B parameters, {cfg.model.quantization if cfg.model.quantization != 'none' else f'{precision * 8}-bit weights'}) "
                          f"needs ~{need / 1024**3:.1f} GB on one T4 ({T4_BYTES / 1024**3:.1f} GB usable): "
                          "train it with model.quantization: 4bit (or 8bit)")
