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
from .common import FOLD_FILES, MACHINE_SHAPES, MANIFEST, WHEELS_SENTINEL, check_budget_h
from .notebook import make_notebook

# --- who pushes ---------------------------------------------------------------------------------------------------


# Kaggle user names as they appear in dataset, model and kernel ids ("owner/slug"): letters, digits,
# hyphens and underscores, 1-50 characters, starting with a letter or digit. Kaggle publishes no formal
# rule that could be found; its API splits ids on "/" (kaggle-api, validate_dataset_string and
# validate_kernel_string), so a name holding "/", "." or a space cannot form a valid id, and a path such
# as "../../x" would escape the kernel's folders. This is the conservative reading.
USER_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}"


def kaggle_user(explicit: str | None = None) -> str:
    """--user, else KAGGLE_USERNAME, else the username in kaggle.json, checked (:data:`USER_NAME`).
    Only the name is ever read out."""
    import re

    name, where = explicit, "--user"
    if not name and os.environ.get("KAGGLE_USERNAME"):
        name, where = os.environ["KAGGLE_USERNAME"], "KAGGLE_USERNAME"
    if not name:
        cfg_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
        f = cfg_dir / "kaggle.json"
        if f.exists():
            try:
                data = json.loads(f.read_text())
                name = data.get("username") if isinstance(data, dict) else None
            except (ValueError, UnicodeDecodeError):
                raise KKError(f"{f} is not valid JSON") from None
            where = str(f)
    if not name:
        raise KKError("no Kaggle user name: pass --user, set KAGGLE_USERNAME, or put kaggle.json in ~/.kaggle")
    if not isinstance(name, str) or not re.fullmatch(USER_NAME, name):
        raise KKError(f"{where}: {name!r} is not a Kaggle user name (letters, digits, '-' or '_', at most 50, "
                      "starting with a letter or digit)")
    return name


def slugify(name: str, pad: bool = False) -> str:
    """The kernel's slug: lowercase letters, digits and dashes, 5-50 characters (the kaggle CLI refuses a
    kernel slug under five characters: kaggle-api, validate_kernel_string). ``pad``: a default name (a run's
    folder) too short for that becomes ``<name>-kernel`` rather than an error about a --name never given."""
    import re

    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-")
    if len(slug) < 5 and pad:
        slug = f"{slug}-kernel".strip("-")
    if len(slug) < 5:
        raise KKError(f"--name {name!r} must give a slug of at least 5 letters, digits or dashes (Kaggle's minimum)")
    return slug


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


def check_wheel(path) -> Path:
    """A --wheel file must be a wheel: a PEP 427 file name (name-version(-build)?-python-abi-platform.whl)
    and a zip archive holding ``<name>-<version>.dist-info/METADATA``. One line otherwise."""
    import zipfile

    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    path = Path(path)
    if not path.is_file():
        raise KKError(f"--wheel {path} does not exist" if not path.exists() else f"--wheel {path} is not a file")
    try:
        parse_wheel_filename(path.name)
    except InvalidWheelFilename as e:
        raise KKError(f"--wheel {path}: not a wheel file name ({e})") from None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise KKError(f"--wheel {path}: not a valid wheel archive ({e})") from None
    if bad is not None:
        raise KKError(f"--wheel {path}: damaged archive member {bad}")
    if not any(n.count("/") == 1 and n.split("/")[0].endswith(".dist-info") and n.endswith("/METADATA") for n in names):
        raise KKError(f"--wheel {path}: no *.dist-info/METADATA inside: not a wheel")
    return path


def _dataset_metadata(user: str, slug: str, title: str) -> dict:
    return {"title": title[:50], "id": f"{user}/{slug}", "licenses": [{"name": "CC0-1.0"}]}


def _copy_fold(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in FOLD_FILES:
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)  # the umask's normal mode, not the source's (safetensors writes 0600)


def check_machine_shape(machine_shape: str) -> str:
    """The accelerator kernel-metadata.json names. A P100 is refused: Kaggle's image has torch built for
    CUDA 12.8 without kernels for its sm_60, so the notebook would stop at its first CUDA call."""
    if machine_shape == "NvidiaTeslaP100":
        raise KKError("--machine-shape NvidiaTeslaP100: Kaggle's torch (CUDA 12.8 builds) has no kernels for the P100's "
                      "sm_60 and the notebook would stop at its first CUDA call; use NvidiaTeslaT4 (2 x T4)")
    if machine_shape not in MACHINE_SHAPES:
        raise KKError(f"--machine-shape must be one of {', '.join(s for s in MACHINE_SHAPES if s != 'NvidiaTeslaP100')} "
                      f"(got {machine_shape!r})")
    return machine_shape


def build_kernel(runs: list, name: str | None, out=None, user: str | None = None, backbone_source: str | None = None,
                 folds="all", extra_wheels: list | None = None, force: bool = False, fit: bool = True,
                 train_path=None, machine_shape: str = "NvidiaTeslaT4", pin_deps: bool = False,
                 time_budget_h: float | None = None, plan_only: bool = False, rows_for_estimate=None,
                 overrides: list[str] | None = None) -> Path | None:
    """Write the notebook and its two datasets; returns ``kernels/<name>`` (``name`` None: the first run's folder name). ``overrides``: ``--set predict.*``
    inference settings, written into the kernel's copy of each fold's config.yaml (the run's stay as trained).

    First the plan is printed (per run: one fold per GPU, split over both, or refused with the fix; rows
    x folds x passes -> hours against the time budget); ``plan_only`` stops there (``kk kernel --plan``).
    ``machine_shape`` is written explicitly: a GPU kernel pushed without it may get a P100, on which
    Kaggle's current torch (CUDA 12.8 builds, no sm_60 kernels) fails at the first CUDA call.
    ``time_budget_h``: the notebook's budget (default: the smallest predict.time_budget_h of the runs).
    ``rows_for_estimate``: a CSV whose rows' token counts the estimate uses (default: the run's data)."""
    import nbformat

    if backbone_source:
        from .offline import check_source_handle

        check_source_handle(backbone_source)
    check_machine_shape(machine_shape)
    wheels = [check_wheel(w) for w in extra_wheels or []]  # checked before any long work

    from ..data import load_train
    from ..ensemble import choose_calibration
    from ..io import atomic_dir, claim_output_dir, mark_output_dir, write_json, write_text
    from ..modeling import fold_base_weights
    from ..quantize import gptq_bits
    from ..runs import oof_set, open_runs, runs_task
    from ..ui import info
    from ..versions import library_versions

    if not runs:
        raise KKError("give at least one --run")
    slug = slugify(name or Path(runs[0]).resolve().name, pad=name is None)  # default: the first run's folder
    user = kaggle_user(user) if not plan_only else None
    out = Path(out) if out else Path("kernels") / slug
    if not plan_only:  # --plan writes nothing
        claim_output_dir(out, force, "kernel", sources=[Path(r) for r in runs])  # --force replaces an earlier kernel only
    runs = open_runs([Path(r) for r in runs], folds)
    task = runs_task(runs)  # the competition the kernel enters: its test file, input folder, submission
    first_cfg = runs[0].folds[0].inference(overrides, "kk kernel")  # a bad --set fails before anything is built
    budget_h = check_budget_h(time_budget_h if time_budget_h is not None else
                              min(r.folds[0].inference(overrides).predict.time_budget_h for r in runs))

    plan = kernel_plan(runs, backbone_source, machine_shape, budget_h, rows_for_estimate, overrides)
    print_plan(plan, machine_shape, budget_h)
    for row in plan:
        if row["placement"] is not None and row["placement"].kind == "refused":
            raise KKError(f"run {row['path']}: {row['placement'].reason}")
    if plan_only:
        return None

    # Weights and temperature are fitted on the runs' OOF now (as kk ensemble fits them), so the kernel needs no labels.
    weights, temperature = [1.0] * len(runs), 1.0
    try:
        train_df, train_report = load_train(train_path or first_cfg.data.train, first_cfg.data.bad_rows, task)
    except KKError as e:
        from ..ui import warn

        warn(f"no OOF calibration in the kernel (equal weights, temperature 1): {e}")
        train_df = None
    if fit and train_df is not None:
        oof = oof_set(runs, train_df, {rid for rid, _ in train_report.skipped})
        if len(oof.y):  # never fitted on a merged run's borrowed OOF (choose_calibration says what it did)
            w, temperature, _, _, note = choose_calibration(oof)
            weights = w.tolist()
            info(f"calibration: {note}")

    with atomic_dir(out) as tmp:
        mark_output_dir(tmp, "kernel")
        art = tmp / "datasets" / f"{slug}-artifacts"
        whl = tmp / "datasets" / f"{slug}-wheels"
        manifest = {"name": slug, "task": task.name, "runs": [], "weights": weights, "temperature": temperature, "method": "mean",
                    "backbone_source": backbone_source, "time_budget_h": budget_h,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"), "predict": list(overrides or [])}
        copied_backbones: dict[str, str] = {}
        used: set[str] = set()
        for run in runs:
            rname = run.path.name if run.path.name not in used else f"{run.path.name}-{len(used)}"  # two runs named alike stay apart
            used.add(rname)
            cfg0 = run.folds[0].inference(overrides)
            entry = {"name": rname, "folds": [], "versions": run.folds[0].metrics.get("versions") or library_versions(),
                     "quantization": cfg0.inference_model().quantization, "tta": cfg0.predict.tta, "engine": cfg0.predict.engine,
                     "gptq": gptq_bits(run.folds[0].path),
                     "tta_share": cfg0.predict.tta_share}
            for fold in run.folds:
                cfg = fold.inference(overrides)
                backbone = fold_base_weights(fold.path, cfg.model)  # model.init_from's full weights when the fold started there
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
                    raise KKError(f"{fold.path}: backbone {backbone!r} is not a local folder and Kaggle kernels run offline; "
                                  "pass --backbone-source <owner>/<slug> of a Kaggle dataset or model holding it")
                _copy_fold(fold.path, art / rname / f"fold_{fold.index}")
                if overrides:  # the kernel predicts with these settings; the run's own config.yaml is untouched
                    write_text(art / rname / f"fold_{fold.index}" / "config.yaml", cfg.to_yaml())
                entry["folds"].append(fold.index)
            manifest["runs"].append(entry)
        write_json(art / MANIFEST, manifest)
        write_json(art / "dataset-metadata.json", _dataset_metadata(user, f"{slug}-artifacts", f"{slug} artifacts"))

        wheel = build_wheel(whl)
        for w in wheels:
            shutil.copy2(w, whl / w.name)
        bundle_dependencies(manifest, whl, pin_deps)
        write_json(whl / WHEELS_SENTINEL, {"kagglekit": wheel.name, "wheels": sorted(p.name for p in whl.glob("*.whl"))})
        write_json(whl / "dataset-metadata.json", _dataset_metadata(user, f"{slug}-wheels", f"{slug} wheels"))

        kdir = tmp / "kernel"
        kdir.mkdir(parents=True)
        nb = make_notebook(slug, budget_h, task)
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
    info(f"wrote {out}: {task.name}, {sum(len(e['folds']) for e in manifest['runs'])} fold(s), weights {weights}, temperature {temperature:.3f}, "
         f"time budget {budget_h:g} h")
    return out


# --- the plan: where each run goes, how long it takes --------------------------------------------------------------


def _backbone_config(backbone: str):
    """Where a backbone's config.json can be read here: its local folder, else the local Hugging Face cache
    (never the network). None when it is only on Kaggle: the notebook checks it there."""
    if Path(backbone).expanduser().is_dir():
        return str(Path(backbone).expanduser())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(backbone, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None


def kernel_plan(runs, backbone_source, machine_shape: str, budget_h: float, rows_for_estimate=None,
                overrides: list[str] | None = None) -> list[dict]:
    """Per run: where its model goes on the machine's GPUs and the hours of its passes over the hidden test rows
    (kagglekit.kernel.plan.estimate_run), at the inference settings (``--set predict.*``)."""
    from ..modeling import fold_base_weights
    from .plan import estimate_run

    rows = []
    for run in runs:
        cfg = run.folds[0].inference(overrides)
        backbone = fold_base_weights(run.folds[0].path, cfg.inference_model())
        conf = _backbone_config(backbone)
        row = {"run": run.path.name, "path": str(run.path),
               **estimate_run(run.folds, conf, machine_shape, rows_for_estimate, overrides)}
        if conf is None:
            row["note"] = f"{backbone} is attached from Kaggle: the notebook places it from its config there"
        rows.append(row)
    return rows


def print_plan(plan: list[dict], machine_shape: str, budget_h: float) -> None:
    """The plan as a table, then the totals against the budget (kk kernel, kk kernel --plan)."""
    from ..ui import console, duration, info, table, warn
    from .common import HIDDEN_TEST_ROWS, KAGGLE_LIMIT_H
    from .plan import T4_FP16_UTILISATION, T4_PEAK_TFLOPS, THROUGHPUT

    body = []
    for row in plan:
        pl, h = row["placement"], row["hours"]
        passes = f"{HIDDEN_TEST_ROWS:,} x {row['folds']} x {1 + row['share']:g}"
        body.append([row["run"], row["folds"], f"{row['tta']}" + (f" ({row['share']:.0%})" if row["tta"] == "uncertain" else ""),
                     pl.weights if pl else row["quantization"], pl.describe() if pl else row.get("note", ""),
                     f"{row['tokens']:.0f}" if row["tokens"] else "?", passes,
                     f"{h['pass1_h']:.2f}" if h else "?", f"{h['total_h']:.2f}" if h else "?"])
    console.print(table(f"kernel plan on {machine_shape} (budget {budget_h:g} h, Kaggle's limit {KAGGLE_LIMIT_H:g} h)",
                        ["run", "folds", "TTA", "weights", "placement", "tokens/row", "rows x folds x passes",
                         "pass 1 (h)", "all passes (h)"], body))
    known = [row["hours"] for row in plan if row["hours"]]
    if not known:
        return
    first, total = sum(h["pass1_h"] for h in known), sum(h["total_h"] for h in known)
    basis = (f"estimate: FLOPs of the rows' real token counts over a T4 at {T4_FP16_UTILISATION:.0%} of "
             f"{T4_PEAK_TFLOPS:g} fp16 TFLOP/s x {', '.join(f'{k} {v:g}' for k, v in THROUGHPUT.items() if k != 'fp32')}; "
             "model loading not included")
    info(f"pass 1 ~{duration(first * 3600)}, all passes ~{duration(total * 3600)}, budget {budget_h:g} h ({basis})")
    if first > budget_h:
        warn(f"pass 1 alone (~{duration(first * 3600)}) exceeds the {budget_h:g} h budget: the notebook still runs it, but drops the "
             f"folds it measures would end past Kaggle's {KAGGLE_LIMIT_H:g} h; package fewer folds (--folds) or lighter models")
    elif total > budget_h:
        info(f"the swapped-order pass does not all fit: the notebook runs it on the least confident rows it has time for "
             f"(~{(budget_h - first) / max(total - first, 1e-9):.0%} of what predict.tta asks)")


# --- what Kaggle's image lacks travels with the kernel --------------------------------------------------------------

# Kaggle's image (docker-python, 2026-08): Python 3.12, x86-64 manylinux; no bitsandbytes, compressed-tensors, vllm.
KAGGLE_PYTHON = "3.12"
KAGGLE_PLATFORMS = ("manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PINNABLE = ("transformers", "peft", "tokenizers", "accelerate")


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
    """bitsandbytes for quantized runs, compressed-tensors for GPTQ runs, vllm for predict.engine: vllm (Kaggle's
    image has none of them; vllm's own dependencies are the user's to attach with --wheel), and with ``pin_deps`` the exact
    transformers/peft/tokenizers/accelerate the runs were trained with: the notebook installs them
    ahead of the image's own before anything imports them."""
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in whl.glob("*.whl")}
    runs = manifest["runs"]
    needs = {"bitsandbytes": [e["name"] for e in runs if e.get("quantization", "none") != "none"],
             "compressed-tensors": [e["name"] for e in runs if e.get("gptq")], "vllm": [e["name"] for e in runs if e.get("engine") == "vllm"]}
    needs["loguru"] = needs["compressed-tensors"]  # compressed-tensors' one dependency the image lacks
    for name, which in needs.items():
        if not which or name in have:
            continue
        ver = next((e["versions"].get(name) for e in runs if e["versions"].get(name)), None)
        spec = f"{name}=={ver}" if ver else name
        try:
            download_wheels([spec], whl)
        except OSError as e:
            raise KKError(f"run {which[0]} needs {name} and Kaggle's image has no {name}; downloading a wheel for "
                          f"Python {KAGGLE_PYTHON} failed ({e}): attach one with --wheel {name.replace('-', '_')}-<version>-py3-none-"
                          f"manylinux_2_24_x86_64.whl (pip download --no-deps --only-binary=:all: --python-version "
                          f"{KAGGLE_PYTHON} --platform manylinux_2_24_x86_64 {spec})") from None
    if pin_deps:
        versions = manifest["runs"][0]["versions"]
        specs = [f"{name}=={versions[name]}" for name in PINNABLE if versions.get(name) and name not in have]
        try:
            download_wheels(specs, whl)
        except OSError as e:
            raise KKError(f"--pin-deps: downloading {' '.join(specs)} for Python {KAGGLE_PYTHON} failed ({e})") from None
