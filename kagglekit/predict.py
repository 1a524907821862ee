"""`kk predict`: one fold's test probabilities, with swap TTA and length-sorted batches.

Each fold writes ``fold_K/test.csv`` (id + the task's class probabilities) and
``fold_K/test.json`` (which test file, by sha256, whether TTA was on, the inference settings, and
which training of the fold made it: its generation), so that ensembling never re-runs a model that
already predicted the same file, and never reuses another model's. Inference settings other than
the fold's own (``--set predict.max_length=8192``, ``predict.quantization=8bit``...) are cached beside
them as ``fold_K/test.<key>.csv/.json``, so predictions at several settings coexist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import KKError
from .task import get_task, same_task


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trained_folds(run_dir: str | os.PathLike, folds: str | list[int] | None = "all") -> list[tuple[int, Path]]:
    """(fold, folder) of every finished fold of a run (or of the ``folds`` asked for)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KKError(f"run folder {run_dir} does not exist (train a fold first: kk train --fold 0)")
    found = {}
    for d in run_dir.glob("fold_*"):
        try:
            k = int(d.name.split("_", 1)[1])
        except ValueError:
            continue
        if (d / "metrics.json").exists():
            found[k] = d
    if folds in (None, "all"):
        if not found:
            raise KKError(f"{run_dir} has no trained fold (no fold_*/metrics.json)")
        chosen = sorted(found.items())
    else:
        wanted = parse_fold_list(folds)
        missing = [k for k in wanted if k not in found]
        if missing:
            raise KKError(f"fold {missing[0]} of {run_dir} is not trained (trained: {', '.join(map(str, sorted(found))) or 'none'})")
        chosen = [(k, found[k]) for k in wanted]
    for _, d in chosen:
        read_metrics(d)  # a damaged fold is one line naming its file, before any work
    return chosen


def read_metrics(fold_path) -> dict:
    """A fold's metrics.json, checked: a JSON object with a numeric ``val_log_loss`` and ``n_val`` (what a
    finished training writes); anything else (cut off, a list, keys missing) is one line naming the file."""
    import math

    f = Path(fold_path) / "metrics.json"
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise KKError(f"{f}: not valid JSON (cut off or damaged); retrain the fold with kk train --force") from None
    if not isinstance(m, dict):
        raise KKError(f"{f}: expected a JSON object of metrics, found a {type(m).__name__}; retrain the fold with kk train --force")
    for key in ("val_log_loss", "n_val"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise KKError(f"{f}: {key} is {'missing' if key not in m else f'not a number ({v!r})'}; retrain the fold with kk train --force")
    return m


def fold_generation(fold_path) -> str:
    """Which training made the weights in ``fold_path``: the id ``kk train`` (or ``kk merge``) writes into
    metrics.json, or for a fold trained before there were ids, the hash of its metrics.json (every training
    writes other metrics: wall time, rates). A forced retrain that swaps a new fold in changes it."""
    m = read_metrics(fold_path)
    if isinstance(m.get("generation"), str) and m["generation"]:
        return m["generation"]
    return "metrics-" + file_sha256(Path(fold_path) / "metrics.json")


def warn_missing_folds(run_dir, trained: list[int]) -> list[int]:
    """Warn, naming them, about folds of the run's folds file that have no trained model: an ensemble
    of 3 of 5 folds is legitimate but should never happen by accident. Returns the missing folds."""
    from .ui import warn

    try:
        if trained and "merged_from" in read_metrics(Path(run_dir) / f"fold_{trained[0]}"):
            return []  # a merged run is one model: the folds file is its source's
    except (KKError, OSError):
        pass
    expected = set(range(max(trained) + 1)) if trained else set()
    for d in Path(run_dir).glob("fold_*"):  # a fold folder without metrics.json: unfinished or damaged
        if d.is_dir() and d.name[5:].isdigit():
            expected.add(int(d.name[5:]))
    try:
        import pandas as pd

        cfg = fold_config(Path(run_dir) / f"fold_{trained[0]}")
        expected |= {int(f) for f in pd.read_csv(cfg.data.folds, usecols=["fold"])["fold"].unique()}
    except (KKError, OSError, ValueError, KeyError, IndexError):
        pass  # the folds file moved or is unreadable: judge by the fold numbers alone
    missing = sorted(expected - set(trained))
    if missing:
        warn(f"{run_dir}: fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} not trained; "
             f"using {len(trained)} fold(s): {', '.join(map(str, trained))}")
    return missing


def parse_fold_list(folds) -> list[int]:
    if isinstance(folds, (list, tuple)):
        return [int(f) for f in folds]
    try:
        return [int(f) for f in str(folds).split(",") if f.strip() != ""]
    except ValueError:
        raise KKError(f"--folds must be 'all' or a list like 0,2,4 (got {folds!r})") from None


def fold_config(fold_path: Path):
    from .config import config_from_dict, read_yaml

    return config_from_dict(read_yaml(fold_path / "config.yaml"), str(fold_path / "config.yaml"))


def inference_config(fold_path: Path, overrides: list[str] | None = None):
    """A fold's config with ``--set predict.*`` overrides (others refused); its config.yaml stays as trained."""
    from .config import apply_predict_overrides

    return apply_predict_overrides(fold_config(Path(fold_path)), overrides)


def inference_settings(cfg) -> dict:
    """The settings that change a fold's predictions beyond its weights: what the prediction cache tells apart."""
    m = cfg.inference_model()
    return {"max_length": m.max_length, "quantization": m.quantization, "precision": m.precision}


class FoldModel:
    """A trained fold loaded for inference: model, tokenizer, formatter, device. ``overrides``: ``predict.*``
    settings (``predict.max_length/quantization/precision`` replace the trained ``model.*`` values).
    ``threads``: torch's CPU threads (default: the fold's ``predict.threads``)."""

    def __init__(self, fold_path: Path, backbone: str | None = None, precision: str | None = None, device: str | None = None,
                 overrides: list[str] | None = None, threads: int | None = None):
        from .formatting import Formatter
        from .modeling import device_and_dtype, load_trained, quiet_libraries

        quiet_libraries()
        self.path = Path(fold_path)
        self.cfg = inference_config(self.path, overrides)
        threads = self.cfg.predict.threads if threads is None else threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.task = get_task(self.cfg.task)

        model_cfg = self.cfg.inference_model()
        self.device, self.dtype = device_and_dtype(precision or model_cfg.precision, device)
        try:
            self.model, self.tokenizer = load_trained(self.path, self.cfg.model_copy(update={"model": model_cfg}), self.device,
                                                      self.dtype, backbone)
        except Exception as e:
            from .memory import OutOfMemory, is_oom

            if not is_oom(e):
                raise
            raise OutOfMemory(f"out of GPU memory loading {self.path} on {self.device}: free the GPU (another model "
                              "loaded?), or predict with --set predict.quantization=4bit") from None
        # The truncation rules apply at the inference length.
        self.formatter = Formatter.from_config(self.tokenizer, model_cfg)

    def predict(self, df, tta: bool | str = True, batch_size: int | None = None, progress=None, description="predict",
                cache: dict | None = None) -> dict:
        """``tta``: True, False or "uncertain" (the swapped order on the fold's predict.tta_share least
        confident rows, kagglekit.tta)."""
        from .inference import predict_pairs

        return predict_pairs(self.model, self.formatter, df, batch_size or self.cfg.predict.batch_size, tta,
                             self.device, self.dtype, progress, description, cache=cache,
                             max_tokens=self.cfg.predict.max_tokens, tta_share=self.cfg.predict.tta_share, task=self.task)

    def release(self) -> None:
        """Free the model's memory now (the next fold can load into it); the object cannot predict afterwards."""
        from .memory import free_memory

        self.model = None
        free_memory(self.device)  # collected now, not when the cyclic GC gets round to it


def predict_fold(run_dir, fold: int, test_path, tta: bool | str = True, batch_size: int | None = None, force: bool = False,
                 backbone: str | None = None, test_df=None, overrides: list[str] | None = None, threads: int | None = None):
    """Test probabilities of one fold as a frame ``id`` + the task's probability columns
    (``winner_model_a, winner_model_b, winner_tie`` for LMSYS).

    Reuses the cached prediction when the same training of the fold (its generation) made it from the same
    test file with the same TTA and inference settings (unless ``force``). ``overrides``: ``--set predict.*``
    for this prediction only. ``threads``: torch's CPU threads (default: the fold's ``predict.threads``).
    """
    import pandas as pd

    from .data import load_test
    from .io import check_writable, file_lock, write_csv, write_json
    from .ui import progress

    (k, path), = trained_folds(run_dir, [fold])
    task = get_task(fold_config(path).task)
    if not Path(test_path).is_file():
        raise KKError(f"test file {test_path} does not exist" if not Path(test_path).exists()
                      else f"{test_path} is a folder, expected {task.test_file}")
    sha = file_sha256(test_path)
    cfg = inference_config(path, overrides)  # a --set typo fails here, before any model loads
    if tta == "uncertain":  # the cache must tell the share apart too
        tta = f"uncertain:{cfg.predict.tta_share:g}"
    out_path, meta_path = cache_paths(path, cfg)
    generation = fold_generation(path)  # read before the weights: a retrain swapped in later is seen below
    expected = cache_key(sha, tta, cfg, generation)
    if not force:
        cached = _cached_prediction(out_path, meta_path, expected, task)
        if cached is not None:
            return cached
    check_writable(path, f"fold {k}")
    with file_lock(path / ".predict.lock", f"fold {k} of {run_dir} (kk predict)"):
        if test_df is None:
            test_df, report = load_test(test_path, task=task)
            report.print_warnings()
        fm = FoldModel(path, backbone, overrides=overrides, threads=threads)
        with progress() as bar:
            res = fm.predict(test_df, "uncertain" if str(tta).startswith("uncertain") else tta, batch_size, bar, f"fold {k}")
        fm.release()  # kk ensemble predicts the next fold next: its model must not load beside this one
        probs = res["probs"]
        if not np.isfinite(probs).all():
            raise KKError(f"fold {k} of {run_dir} predicted NaN probabilities for {test_path}")
        out = pd.DataFrame({"id": test_df["id"].to_numpy(), **{c: probs[:, j] for j, c in enumerate(task.prob_columns)}})
        # `kk train --force` swaps a retrained fold in by renaming folders: if that happened while this model
        # predicted, these are the old model's probabilities and the folder at `path` is the new fold's.
        _check_generation(path, generation, f"fold {k} of {run_dir}")
        # The pair test.csv + test.json is replaced file by file; test.json names the sha256 of the
        # test.csv it belongs to, so a kill between the two renames is a cache miss, never a wrong pairing.
        meta_path.unlink(missing_ok=True)
        write_csv(out_path, out)
        write_json(meta_path, {"test_file": str(test_path), **expected, "rows": len(out),
                               "output_sha256": file_sha256(out_path), "truncation": res["stats"].summary()})
    return out


def cache_key(sha: str, tta: bool | str, cfg, generation: str) -> dict:
    """What a cached prediction must have been made with to be reused (all of it is written to its test.json):
    the test file, TTA, the inference settings, and this training of the fold (a cache older than generation
    ids, or another training's, never matches)."""
    return {"sha256": sha, "tta": tta, "inference": inference_settings(cfg), "generation": generation}


def cache_paths(fold_path: Path, cfg) -> tuple[Path, Path]:
    """(csv, json) of the prediction cache for these inference settings: ``test.csv/.json`` at the fold's own
    (its config.yaml's), ``test.<key>.csv/.json`` at others (the key a hash of the settings), so both can be kept."""
    settings = inference_settings(cfg)
    if settings == inference_settings(fold_config(fold_path)):
        return fold_path / "test.csv", fold_path / "test.json"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return fold_path / f"test.{key}.csv", fold_path / f"test.{key}.json"


def _check_generation(path: Path, generation: str, what: str) -> None:
    try:
        now = fold_generation(path)
    except (KKError, OSError):
        now = None  # mid-swap, or damaged: not the fold these predictions came from either
    if now != generation:
        raise KKError(f"{what} was retrained while it predicted (its weights changed under it); its predictions were "
                      "not written: run kk predict again")


def _cached_prediction(out_path: Path, meta_path: Path, expected: dict, task):
    """The cached fold prediction when its test.json matches every entry of ``expected`` (:func:`cache_key`), else None."""
    import pandas as pd

    from .data import read_probs
    from .ui import warn

    if not (out_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        warn(f"{meta_path} is corrupt ({e}); predicting again")
        return None
    if any(meta.get(k) != v for k, v in expected.items()):
        return None
    if meta.get("output_sha256") != file_sha256(out_path):
        warn(f"{out_path} does not match {meta_path}; predicting again")
        return None
    try:
        ids, probs = read_probs(out_path, "fold test predictions", task)
    except KKError as e:
        warn(f"{e}; predicting again")
        return None
    return pd.DataFrame({"id": ids, **{c: probs[:, j] for j, c in enumerate(task.prob_columns)}})


class Predictor:
    """Fold models of one run, averaged, with swap TTA: the Python API for a single pair.

    >>> p = Predictor.from_run("runs/deberta-v3-base", folds="all")
    >>> p.predict_one("What is 2+2?", "4", "5")
    {'winner_model_a': 0.61, 'winner_model_b': 0.12, 'winner_tie': 0.27}

    ``from_run`` keeps no model in memory between calls: every ``predict_frame`` / ``predict_one`` loads,
    predicts with and frees one fold at a time, so K folds of an LLM never share the GPU. The price is one
    load per fold per call: predict many pairs in one ``predict_frame`` call. ``Predictor([FoldModel...])``
    uses fold models the caller has loaded (and keeps them).
    """

    def __init__(self, fold_models: list, tta: bool = True, backbone: str | None = None):
        if not fold_models:
            raise KKError("Predictor needs at least one trained fold")
        self.fold_models = fold_models  # FoldModel objects, or fold folders loaded one at a time
        self.tta = tta
        self.backbone = backbone
        self.task = same_task([fm.task.name if isinstance(fm, FoldModel) else fold_config(Path(fm)).task for fm in fold_models],
                              "folds")


    @classmethod
    def from_run(cls, run_dir, folds="all", tta: bool = True, backbone: str | None = None) -> Predictor:
        return cls([p for _, p in trained_folds(run_dir, folds)], tta, backbone)

    def predict_frame(self, df) -> np.ndarray:
        """Mean of the folds' probabilities for parsed rows."""
        probs = []
        for fold in self.fold_models:
            fm = fold if isinstance(fold, FoldModel) else FoldModel(fold, self.backbone)
            probs.append(fm.predict(df, self.tta)["probs"])
            if fm is not fold:
                fm.release()  # before the next fold loads
        return np.mean(probs, axis=0)

    def predict_one(self, prompt, response_a, response_b) -> dict:
        """``prompt``/``response_*``: a string or a list of turns."""
        import pandas as pd

        from .formatting import _as_turns

        df = pd.DataFrame({"id": ["0"], "prompt": [_as_turns(prompt)], "response_a": [_as_turns(response_a)],
                           "response_b": [_as_turns(response_b)]})
        if not (len(df["prompt"][0]) == len(df["response_a"][0]) == len(df["response_b"][0])):
            raise KKError("prompt, response_a and response_b must have the same number of turns")
        probs = self.predict_frame(df)[0]
        return {c: float(probs[j]) for j, c in enumerate(self.task.prob_columns)}
